"""Inference with the backbone's BatchNorms folded into its convolutions.

In eval mode a BatchNorm after a convolution is a per-channel affine map,
``y * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``, so it can
be folded into the convolution (``W * s``, bias ``(b - mean) * s + beta``,
computed by ``torch.nn.utils.fusion.fuse_conv_bn_weights``): one elementwise
pass over every ResNet activation less (~3-4% of a Deformable DETR R50
inference on the CPU). mmcv's ``fuse_conv_bn`` does the same in place but
pairs a BatchNorm with whichever convolution was registered just before it,
which says nothing about the data flow; here only known pairs are folded.

The detector's own modules stay untouched (same state dict, same training
behaviour): :class:`FoldedBatchNormCache` keeps a folded *copy* of the
backbone, outside the module tree, and rebuilds it whenever a parameter or
buffer of the original changes (:class:`TensorSnapshot`: ``load_state_dict``,
an optimizer step, ``.to()``, EMA swaps through ``.data``).

Only pairs known to be applied in sequence are folded: adjacent
(``Conv2d``, BatchNorm) children of an ``nn.Sequential`` (ResNet's deep stem
and downsample branches), and, by their names, the stem and the
``conv<i>`` / ``norm<i>`` pairs of mmdet's ResNet blocks. Anything else runs
unfolded.
"""

import copy
from typing import Iterator, List, Optional, Tuple

import torch
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .tensor_snapshot import TensorSnapshot

__all__ = ['FoldedBatchNormCache', 'conv_bn_pairs', 'fold_batchnorms']

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain 2-D convolution followed by an eval-mode BatchNorm with
    running statistics, over the same channels."""
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, _BatchNorm)
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


def conv_bn_pairs(module: nn.Module) -> Iterator[Tuple[nn.Module, str, str]]:
    """The (conv, BatchNorm) pairs of ``module`` whose BatchNorm is applied
    right to the convolution's output.

    Yields:
        tuple: ``(parent, conv_name, bn_name)``, the two children's names in
        ``parent``.
    """
    for parent in module.modules():
        names: List[Tuple[str, str]] = []
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            names = [(a, b) for (a, _), (b, _) in zip(children, children[1:])]
        elif isinstance(parent, ResNet) and not parent.deep_stem:
            names = [('conv1', parent.norm1_name)]
        elif isinstance(parent, Bottleneck):
            names = [(f'conv{i}', getattr(parent, f'norm{i}_name')) for i in (1, 2, 3)]
        elif isinstance(parent, BasicBlock):
            names = [(f'conv{i}', getattr(parent, f'norm{i}_name')) for i in (1, 2)]
        for conv_name, bn_name in names:
            conv = getattr(parent, conv_name, None)
            bn = getattr(parent, bn_name, None)
            if conv is not None and bn is not None and _foldable(conv, bn):
                yield parent, conv_name, bn_name


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every pair of :func:`conv_bn_pairs` folded
    (the BatchNorm replaced by ``nn.Identity``), in eval mode and without
    gradients. ``module`` itself is unchanged."""
    folded = copy.deepcopy(module)
    folded.eval()  # (mmdet's ResNet.train returns None: no chaining)
    folded.requires_grad_(False)
    with torch.no_grad():
        for parent, conv_name, bn_name in list(conv_bn_pairs(folded)):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            setattr(parent, bn_name, nn.Identity())
    return folded


def _tensors(module: nn.Module) -> List[Tensor]:
    return list(module.parameters()) + list(module.buffers())


class FoldedBatchNormCache:
    """The folded copy (:func:`fold_batchnorms`) of one module, rebuilt when
    the module changes. A plain object, so that a ``nn.Module`` holding it
    does not register the copy (no extra state-dict keys or parameters)."""

    def __init__(self) -> None:
        self._snapshot: Optional[TensorSnapshot] = None
        self._folded: Optional[nn.Module] = None

    def get(self, module: nn.Module) -> nn.Module:
        tensors = _tensors(module)
        if self._folded is None or not self._snapshot.matches(tensors):
            self._folded = self._snapshot = None  # free the stale copy first
            self._folded = fold_batchnorms(module)
            self._snapshot = TensorSnapshot(tensors)
        return self._folded

    def __call__(self, module: nn.Module, *inputs: Tensor):
        return self.get(module)(*inputs)

    def __deepcopy__(self, memo: dict) -> 'FoldedBatchNormCache':
        return FoldedBatchNormCache()  # a copied detector folds its own weights
