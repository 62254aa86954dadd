"""Multi-scale deformable attention in standard ONNX operators.

``torch.onnx.export`` (the ``torch.export``-based exporter, the default since
torch 2.9) meets ``torch.ops.mmdet_deform.ms_deform_attn`` in the exported
program; :func:`onnx_translation_table` tells it how to write the op with
operators of the default ONNX domain only, so that stock ONNX Runtime or
OpenVINO run the file without a custom-op library::

    from mmdet_deform.ops.onnx import onnx_translation_table

    torch.onnx.export(model, args, 'model.onnx', opset_version=20,
                      custom_translation_table=onnx_translation_table())

The translation is one ``GridSample`` per level (bilinear, zero padding,
``align_corners=0``: the sampling convention of the op, a normalised location
``(x, y)`` reading pixel ``(x * w - 0.5, y * h - 0.5)``), weighted by the
attention weights and summed over levels and points. The maps' sizes are read
from ``spatial_shapes`` and ``level_start_index`` at run time, so the graph
keeps dynamic image sizes and numbers of queries; the numbers of heads,
levels and points and the head dimension are fixed by the exported program.
Locations are clipped to ``[-1, 2]`` before sampling (every point outside that
range reads only zero padding, as before clipping) and non-finite ones are
moved outside the map, so they contribute zero, as in the compiled kernels.

The functions are written against ONNX opset 18 (as torch's own translations
are); the exporter converts the model to the requested opset
(:data:`MIN_OPSET` to :data:`MAX_OPSET`, ``GridSample``'s ``bilinear`` mode
becoming ``linear`` from opset 20).

Needs ``onnxscript`` (``pip install onnxscript``, part of the ``deploy``
extra); imports torch and onnxscript only.
"""

from typing import Callable, Dict

import torch

try:
    from onnxscript.onnx_opset import opset18 as op
except ImportError as e:  # pragma: no cover - exercised where onnxscript is missing
    raise ImportError(
        'mmdet_deform.ops.onnx needs onnxscript (the ONNX exporter of torch uses it): '
        '`pip install onnxscript onnx onnxruntime` or `pip install -e .[deploy]`'
    ) from e

__all__ = ['MAX_OPSET', 'MIN_OPSET', 'check_opset', 'ms_deform_attn_onnx', 'onnx_translation_table']

#: Opsets the translation is exported and tested at: the exporter writes
#: opset 18 natively (lower ones need a down-conversion that can fail) and
#: torch 2.13 knows up to 23.
MIN_OPSET = 18
MAX_OPSET = 23

# the clipped range of normalised locations: outside [0, 1] by a full map,
# so that every bilinear corner of a clipped point is outside the map
_LOCATION_MIN = -1.0
_LOCATION_MAX = 2.0


def check_opset(opset_version: int) -> int:
    """Return ``opset_version`` if the translation supports it.

    Raises:
        ValueError: naming the supported range otherwise.
    """
    if (
        isinstance(opset_version, bool)
        or not isinstance(opset_version, int)
        or not MIN_OPSET <= opset_version <= MAX_OPSET
    ):
        raise ValueError(
            f'opset_version must be an int from {MIN_OPSET} to {MAX_OPSET} (ms_deform_attn is '
            f'written with GridSample and the exporter writes opset {MIN_OPSET} natively), '
            f'got {opset_version!r}'
        )
    return opset_version


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _static_dim(value, axis: int, name: str) -> int:
    dim = value.shape[axis]
    if not isinstance(dim, int):
        raise ValueError(
            f'ms_deform_attn can only be exported with a static {name} (axis {axis} of shape '
            f'{value.shape}); mark only the batch, key and query axes dynamic'
        )
    return dim


def ms_deform_attn_onnx(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """The ONNX graph of ``mmdet_deform::ms_deform_attn`` (traced with onnxscript
    by the exporter; the arguments are the exporter's symbolic values).

    Args:
        value: has shape (bs, num_keys, num_heads, head_dim).
        spatial_shapes: int64 (h, w) of every level, has shape (num_levels, 2).
        level_start_index: int64, has shape (num_levels,).
        sampling_locations: normalised (x, y), has shape
            (bs, num_queries, num_heads, num_levels, num_points, 2).
        attention_weights: has shape (bs, num_queries, num_heads, num_levels, num_points).

    Returns:
        The attended values, has shape (bs, num_queries, num_heads * head_dim).
    """
    num_heads = _static_dim(value, 2, 'number of heads')
    head_dim = _static_dim(value, 3, 'head dimension')
    num_levels = _static_dim(sampling_locations, 3, 'number of levels')
    num_points = _static_dim(sampling_locations, 4, 'number of points')
    num_keys = op.Shape(value, start=1, end=2)  # (1,)
    num_queries = op.Shape(sampling_locations, start=1, end=2)  # (1,)

    # (bs, num_keys, nh, hd) -> (bs, nh, hd, num_keys) -> (bs*nh, hd, num_keys)
    value = op.Transpose(value, perm=[0, 2, 3, 1])
    value = op.Reshape(value, op.Concat(_ints(-1, head_dim), num_keys, axis=0))

    # GridSample's grid: 2 * location - 1, clipped, NaN moved outside
    # (bs, nq, nh, nl, np, 2) -> (nl, bs, nh, nq, np, 2)
    grid = op.Transpose(sampling_locations, perm=[3, 0, 2, 1, 4, 5])
    grid = op.Clip(
        grid,
        op.CastLike(op.Constant(value_float=_LOCATION_MIN), grid),
        op.CastLike(op.Constant(value_float=_LOCATION_MAX), grid),
    )
    grid = op.Where(op.IsNaN(grid), op.CastLike(op.Constant(value_float=_LOCATION_MIN), grid), grid)
    one = op.CastLike(op.Constant(value_float=1.0), grid)
    grid = op.Sub(op.Add(grid, grid), one)
    grid_shape = op.Concat(_ints(-1), num_queries, _ints(num_points, 2), axis=0)
    # (bs, nq, nh, nl, np) -> (nl, bs, nh, nq, np)
    weights = op.Transpose(attention_weights, perm=[3, 0, 2, 1, 4])
    weights_shape = op.Concat(_ints(-1, 1), num_queries, _ints(num_points), axis=0)

    output = None
    for level in range(num_levels):
        index = _ints(level)
        hw = op.Reshape(op.Gather(spatial_shapes, index, axis=0), _ints(2))  # (h, w)
        start = op.Gather(level_start_index, index, axis=0)  # (1,)
        end = op.Add(start, op.ReduceProd(hw, keepdims=1))
        # (bs*nh, hd, h*w) -> (bs*nh, hd, h, w)
        value_l = op.Slice(value, start, end, _ints(2))
        value_l = op.Reshape(value_l, op.Concat(_ints(0, 0), hw, axis=0))
        # (1, bs, nh, nq, np, 2) -> (bs*nh, nq, np, 2)
        grid_l = op.Reshape(op.Gather(grid, index, axis=0), grid_shape)
        sampled = op.GridSample(
            value_l, grid_l, align_corners=0, mode='bilinear', padding_mode='zeros'
        )  # (bs*nh, hd, nq, np)
        # (1, bs, nh, nq, np) -> (bs*nh, 1, nq, np)
        weights_l = op.Reshape(op.Gather(weights, index, axis=0), weights_shape)
        sampled = op.Mul(sampled, weights_l)
        output = sampled if output is None else op.Add(output, sampled)
    output = op.ReduceSum(output, _ints(3), keepdims=0)  # (bs*nh, hd, nq)
    # (bs*nh, hd, nq) -> (bs, nh*hd, nq) -> (bs, nq, nh*hd)
    output = op.Reshape(output, op.Concat(_ints(-1, num_heads * head_dim), num_queries, axis=0))
    return op.Transpose(output, perm=[0, 2, 1])


def onnx_translation_table() -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: the op
    (``torch.ops.mmdet_deform.ms_deform_attn.default``, registered by
    ``mmdet_deform._C``) to :func:`ms_deform_attn_onnx`.

    Raises:
        RuntimeError: if the compiled op is not registered (``mmdet_deform._C``
            not built or not imported).
    """
    try:
        target = torch.ops.mmdet_deform.ms_deform_attn.default
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError(
            'torch.ops.mmdet_deform.ms_deform_attn is not registered: import mmdet_deform.ops '
            'with the compiled extension mmdet_deform._C built'
        ) from e
    return {target: ms_deform_attn_onnx}
