"""``nn.Linear`` with a oneDNN-prepacked weight for CPU inference.

ATen's CPU ``addmm`` first copies the bias into the output and then runs
the GEMM on the plain (out, in) weight. oneDNN's linear with a weight
reordered once into its blocked layout (the path ``torch.compile`` takes on
CPU after freezing) adds the bias in the GEMM and runs ~7-30% faster on the
(tokens, 256) x (256, 256 / 384 / 1024) products of the deformable encoder
(``tools/analysis_tools/benchmark_train_step.py``: the encoder's inference
~13% faster).

:func:`linear` uses it only where it is exact to float32 rounding and
cannot go stale: float32 CPU tensors, gradients disabled, no autocast, not
under ``torch.compile``, a plain ``nn.Linear`` (or mmcv's wrapper of it)
without forward hooks;
everywhere else it calls the module. The packed
weight is cached per module (in a weak dictionary, so modules, their state
dicts and their deep copies are untouched) and rebuilt whenever the weight
is modified in place, replaced, moved or converted.
"""

import warnings
import weakref
from typing import Tuple

import torch
from mmcv.cnn.bricks.wrappers import Linear as MMCVLinear
from torch import Tensor, nn

from .tensor_snapshot import TensorSnapshot

__all__ = ['linear']

# Rows the reorder is tuned for: one image's encoder tokens (the packed
# layout is valid for any number of rows).
_ROWS_HINT = 8192

_packed: 'weakref.WeakKeyDictionary[nn.Linear, Tuple[TensorSnapshot, Tensor]]' = (
    weakref.WeakKeyDictionary()
)
# Forwards that compute F.linear(x, weight, bias): nn.Linear's, and mmcv's
# wrapper (used by mmcv's FFN), which only special-cases empty inputs on old
# torch versions.
_PLAIN_FORWARDS = (nn.Linear.forward, MMCVLinear.forward)
_available = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, '_linear_pointwise')
    and hasattr(torch.ops.mkldnn, '_reorder_linear_weight')
)


def _packed_weight(module: nn.Linear) -> Tensor:
    entry = _packed.get(module)
    if entry is None or not entry[0].matches([module.weight]):
        packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _ROWS_HINT)
        entry = (TensorSnapshot([module.weight]), packed)
        _packed[module] = entry
    return entry[1]


def _use_packed(x: Tensor, module: nn.Linear) -> bool:
    return (
        _available
        and type(module).forward in _PLAIN_FORWARDS  # not a subclass that changes the math
        and not module._forward_hooks  # hooks see the call as usual
        and not module._forward_pre_hooks
        and not torch.is_grad_enabled()
        and x.device.type == 'cpu'
        and x.dtype == torch.float32
        and module.weight.dtype == torch.float32
        and (module.bias is None or module.bias.dtype == torch.float32)
        and not torch.is_autocast_enabled('cpu')
        and not torch.compiler.is_compiling()
    )


def linear(x: Tensor, module: nn.Linear) -> Tensor:
    """``module(x)`` for an ``nn.Linear`` (same result up to float32
    rounding), with the prepacked oneDNN weight in CPU float32 inference.

    Args:
        x (Tensor): has shape (..., in_features).
        module (nn.Linear): The layer.

    Returns:
        Tensor: has shape (..., out_features).
    """
    global _available
    if _use_packed(x, module):
        try:
            return torch.ops.mkldnn._linear_pointwise(
                x, _packed_weight(module), module.bias, 'none', [], ''
            )
        except RuntimeError as e:  # pragma: no cover - torch builds without the op's kernels
            _available = False
            warnings.warn(f'oneDNN linear unavailable ({e}); using nn.Linear', stacklevel=2)
    return module(x)
