"""Compiled operators of mmdet_deform.

Importable with torch alone (no mmcv/mmdet), so kernels can be checked on a
bare GPU machine. Importing this package registers
``torch.ops.mmdet_deform.ms_deform_attn`` and
``torch.ops.mmdet_deform._ms_deform_attn_backward``, and the CPU dropout
``torch.ops.mmdet_deform.dropout`` / ``_dropout_backward`` (from
``mmdet_deform._C``) together with their fake kernels and autograd formulas.
"""

from ._extension import has_cuda_kernel, has_extension, require_extension
from .dropout import Dropout, dropout, dropout_pytorch
from .ms_deform_attn import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_pytorch
from .precision import at_least_float32

__all__ = [
    'Dropout',
    'MultiScaleDeformableAttention',
    'at_least_float32',
    'dropout',
    'dropout_pytorch',
    'has_cuda_kernel',
    'has_extension',
    'ms_deform_attn',
    'ms_deform_attn_pytorch',
    'require_extension',
]
