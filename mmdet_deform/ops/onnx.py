"""Multi-scale deformable attention in standard ONNX operators.

``torch.onnx.export`` (the ``torch.export``-based exporter, the default since
torch 2.9) meets ``torch.ops.mmdet_deform.ms_deform_attn`` in the exported
program; :func:`onnx_translation_table` tells it how to write the op with
operators of the default ONNX domain only, so that stock ONNX Runtime or
OpenVINO run the file without a custom-op library::

    from mmdet_deform.ops.onnx import onnx_translation_table

    torch.onnx.export(model, args, 'model.onnx', opset_version=20,
                      custom_translation_table=onnx_translation_table())

Two forms, both of standard operators (``form`` of
:func:`onnx_translation_table`):

* ``'grid_sample'`` (the default; ONNX Runtime and OpenVINO): one
  ``GridSample`` per level (bilinear, zero padding, ``align_corners=0``: the
  sampling convention of the op, a normalised location ``(x, y)`` reading
  pixel ``(x * w - 0.5, y * h - 0.5)``), weighted by the attention weights and
  summed over levels and points. Locations are clipped to ``[-1, 2]`` before
  sampling (every point outside that range reads only zero padding, as before
  clipping) and non-finite ones are moved outside the map, so they contribute
  zero, as in the compiled kernels.
* ``'deform_conv'`` (opset 19 and later; ONNX Runtime: OpenVINO has no
  ``DeformConv``): where the queries are as many as the keys (the encoder's
  self-attention over the maps) the op becomes one depthwise ``DeformConv``:
  the levels' maps are laid out side by side in one canvas (a row and a
  column of zeros after every map, the canvas's own border reading zero,
  coordinates clipped into them), every query is one output position, every
  (level, point) one kernel tap with its offset and the attention weight as
  its mask, so that sampling, weighting and the sums over levels and points
  run in one operator (about half the time of the ``GridSample`` form's
  operators in ONNX Runtime). Other calls (the decoder's
  cross-attention, whose few queries would waste a canvas-sized output grid)
  use the ``GridSample`` form.

The maps' sizes are read from ``spatial_shapes`` and ``level_start_index`` at
run time, so the graph keeps dynamic image sizes and numbers of queries; the
numbers of heads, levels and points and the head dimension are fixed by the
exported program.

The functions are written against ONNX opset 18 (as torch's own translations
are; ``DeformConv`` against 19); the exporter converts the model to the
requested opset (:data:`MIN_OPSET` to :data:`MAX_OPSET`, ``GridSample``'s
``bilinear`` mode becoming ``linear`` from opset 20).

Needs ``onnxscript`` (``pip install onnxscript``, part of the ``deploy``
extra); imports torch and onnxscript only.
"""

from typing import Callable, Dict

import torch

try:
    from onnxscript.onnx_opset import opset18 as op
    from onnxscript.onnx_opset import opset19
except ImportError as e:  # pragma: no cover - exercised where onnxscript is missing
    raise ImportError(
        'mmdet_deform.ops.onnx needs onnxscript (the ONNX exporter of torch uses it): '
        '`pip install onnxscript onnx onnxruntime` or `pip install -e .[deploy]`'
    ) from e

__all__ = [
    'FORMS',
    'FORM_MIN_OPSET',
    'MAX_OPSET',
    'MIN_OPSET',
    'check_form',
    'check_opset',
    'ms_deform_attn_onnx',
    'ms_deform_attn_onnx_deform_conv',
    'onnx_translation_table',
]

#: Opsets the translation is exported and tested at: the exporter writes
#: opset 18 natively (lower ones need a down-conversion that can fail) and
#: torch 2.13 knows up to 23.
MIN_OPSET = 18
MAX_OPSET = 23

#: The forms of the translation (see the module's docstring) and the first
#: opset of each.
FORMS = ('grid_sample', 'deform_conv')
FORM_MIN_OPSET = {'grid_sample': MIN_OPSET, 'deform_conv': 19}

# the clipped range of normalised locations: outside [0, 1] by a full map,
# so that every bilinear corner of a clipped point is outside the map
_LOCATION_MIN = -1.0
_LOCATION_MAX = 2.0


def check_form(form: str) -> str:
    """Return ``form`` if it is one of :data:`FORMS`.

    Raises:
        ValueError: naming the forms otherwise.
    """
    if form not in FORMS:
        raise ValueError(f'form must be one of {FORMS}, got {form!r}')
    return form


def check_opset(opset_version: int, form: str = 'grid_sample') -> int:
    """Return ``opset_version`` if the translation's ``form`` supports it.

    Raises:
        ValueError: naming the supported range otherwise.
    """
    low = FORM_MIN_OPSET[check_form(form)]
    if (
        isinstance(opset_version, bool)
        or not isinstance(opset_version, int)
        or not low <= opset_version <= MAX_OPSET
    ):
        why = (
            f'ms_deform_attn is written with GridSample and the exporter writes opset '
            f'{MIN_OPSET} natively'
            if form == 'grid_sample'
            else "the 'deform_conv' form needs DeformConv, from opset 19"
        )
        raise ValueError(
            f'opset_version must be an int from {low} to {MAX_OPSET} ({why}), got {opset_version!r}'
        )
    return opset_version


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _scalar(value: int):
    return op.Constant(value_int=value)


def _float(value: float, like):
    return op.CastLike(op.Constant(value_float=value), like)


def _at(table, *indices: int):
    """``table[i][j]...`` (the leading axes dropped)."""
    for index in indices:
        table = op.Gather(table, _scalar(index), axis=0)
    return table


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


def _level_maps(value, spatial_shapes, level_start_index, num_levels: int, channels: int):
    """Every level's map and its size.

    Args:
        value: has shape (bs, num_keys, num_heads, head_dim).

    Returns:
        tuple[list, list, list]: The maps, each of shape (bs, channels, h, w)
        (channel ``head * head_dim + d``), and their heights and widths, each
        int64 of shape (1,).
    """
    num_keys = op.Shape(value, start=1, end=2)
    # (bs, num_keys, nh, hd) -> (bs, nh, hd, num_keys) -> (bs, channels, num_keys)
    value = op.Transpose(value, perm=[0, 2, 3, 1])
    value = op.Reshape(value, op.Concat(_ints(0, channels), num_keys, axis=0))
    maps, heights, widths = [], [], []
    for level in range(num_levels):
        hw = op.Reshape(op.Gather(spatial_shapes, _ints(level), axis=0), _ints(2))
        height, width = op.Slice(hw, _ints(0), _ints(1)), op.Slice(hw, _ints(1), _ints(2))
        start = op.Gather(level_start_index, _ints(level), axis=0)  # (1,)
        end = op.Add(start, op.Mul(height, width))
        map_l = op.Slice(value, start, end, _ints(2))  # (bs, channels, h*w)
        maps.append(op.Reshape(map_l, op.Concat(_ints(0, 0), hw, axis=0)))
        heights.append(height)
        widths.append(width)
    return maps, heights, widths


def ms_deform_attn_onnx_deform_conv(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """The ``'deform_conv'`` form of the op's graph (see the module's
    docstring): one depthwise ``DeformConv`` (opset 19) over a canvas holding
    every level's map. Correct for any number of queries (the canvas grows to
    an output position per query); fast where the queries are about as many as
    the keys. Arguments and result as :func:`ms_deform_attn_onnx`.
    """
    num_heads = _static_dim(value, 2, 'number of heads')
    head_dim = _static_dim(value, 3, 'head dimension')
    num_levels = _static_dim(sampling_locations, 3, 'number of levels')
    num_points = _static_dim(sampling_locations, 4, 'number of points')
    channels = num_heads * head_dim
    taps = num_levels * num_points  # DeformConv's kernel: (1, taps), tap = (level, point)
    num_queries = op.Shape(sampling_locations, start=1, end=2)  # (1,)
    one = _ints(1)
    no_pads = _ints(0, 0, 0, 0, 0, 0)  # before every axis, after batch and channel

    # the canvas: every map followed by a row and a column of zeros (its own
    # border reads zero in DeformConv), level 0 at (0, 0), the others stacked
    # in a column to its right
    maps, heights, widths = _level_maps(
        value, spatial_shapes, level_start_index, num_levels, channels
    )
    left_width = op.Add(widths[0], one)
    height, width = op.Add(heights[0], one), left_width
    if num_levels > 1:
        right_width = op.Add(op.ReduceMax(op.Concat(*widths[1:], axis=0), keepdims=1), one)
        right_heights = [op.Add(h, one) for h in heights[1:]]
        height = op.Max(height, op.ReduceSum(op.Concat(*right_heights, axis=0), keepdims=1))
        width = op.Add(left_width, right_width)
    # DeformConv's output grid, (height, columns), has a position per query
    # (row-major, the rest unused); with a stride of 2 along the width the
    # canvas is 2 * columns wide, so that the grid can have about as many
    # positions as there are queries and the canvas still hold the maps
    two = _ints(2)
    columns = op.Max(
        op.Div(op.Sub(op.Add(num_queries, height), one), height),  # ceil(nq / height)
        op.Div(op.Add(width, one), two),  # ceil(width / 2)
    )
    # (bs, channels, height, 2 * columns): the padding right of the maps goes
    # to the last block
    spare = op.Sub(op.Mul(columns, two), width)  # (1,)
    left_pads = one if num_levels > 1 else op.Add(one, spare)
    canvas = op.Pad(maps[0], op.Concat(no_pads, op.Sub(height, heights[0]), left_pads, axis=0))
    corners = [(_ints(0), _ints(0))]  # (left, top) of every map
    if num_levels > 1:
        column, top = [], _ints(0)
        for level in range(1, num_levels):
            pads = op.Concat(no_pads, one, op.Sub(right_width, widths[level]), axis=0)
            column.append(op.Pad(maps[level], pads))
            corners.append((left_width, top))
            top = op.Add(top, right_heights[level - 1])
        column = op.Concat(*column, axis=2)
        column = op.Pad(column, op.Concat(no_pads, op.Sub(height, top), spare, axis=0))
        canvas = op.Concat(canvas, column, axis=3)

    # query q: output position (q // columns, q % columns), where DeformConv's
    # kernel starts at canvas pixel (q // columns, 2 * (q % columns))
    columns_scalar = op.Squeeze(columns)
    query = op.Range(_scalar(0), op.Squeeze(num_queries), _scalar(1))
    row = op.CastLike(op.Div(query, columns_scalar), sampling_locations)  # (nq,)
    col = op.CastLike(op.Mul(op.Mod(query, columns_scalar), _scalar(2)), sampling_locations)

    # (bs, nq, nh, nl, np, 2) -> (nl, 2, bs, nh, np, nq): one slice per level and axis
    locations = op.Transpose(sampling_locations, perm=[3, 5, 0, 2, 4, 1])
    outside = _float(-1.0, locations)  # where NaN locations go: a map to the left
    half = _float(0.5, locations)
    offsets = []
    for level in range(num_levels):
        left_l, top_l = corners[level]
        pair = []
        for axis, size, corner, base in (
            (1, heights[level], top_l, row),  # DeformConv's offsets are (dy, dx)
            (0, widths[level], left_l, col),
        ):
            location = _at(locations, level, axis)  # (bs, nh, np, nq)
            location = op.Where(op.IsNaN(location), outside, location)
            size = op.Squeeze(op.CastLike(size, locations))
            # the op's pixel coordinate, clipped into the map's zero border
            pixel = op.Clip(op.Sub(op.Mul(location, size), half), outside, size)
            offset = op.Sub(op.Add(pixel, op.Squeeze(op.CastLike(corner, locations))), base)
            if axis == 0:  # minus the tap's own column, level * np + point
                first = level * num_points
                tap = op.Range(_scalar(first), _scalar(first + num_points), _scalar(1))
                offset = op.Sub(
                    offset, op.CastLike(op.Reshape(tap, _ints(num_points, 1)), locations)
                )
            pair.append(op.Unsqueeze(offset, _ints(3)))
        offsets.append(op.Unsqueeze(op.Concat(*pair, axis=3), _ints(2)))  # (bs, nh, 1, np, 2, nq)
    positions = op.Mul(height, columns)
    grid = op.Concat(_ints(0, -1), height, columns, axis=0)
    unused = op.Concat(_ints(0, 0, 0, 0, 0), op.Sub(positions, num_queries), axis=0)
    # (bs, nh, nl, np, 2, nq) -> (bs, 2 * nh * taps, height, width)
    offsets = op.Concat(*offsets, axis=2)
    offsets = op.Reshape(offsets, op.Concat(_ints(0, 2 * num_heads * taps), num_queries, axis=0))
    offsets = op.Reshape(op.Pad(offsets, unused), grid)
    # (bs, nq, nh, nl, np) -> (bs, nh * taps, height, width)
    mask = op.Transpose(attention_weights, perm=[0, 2, 3, 4, 1])
    mask = op.Reshape(mask, op.Concat(_ints(0, num_heads * taps), num_queries, axis=0))
    mask = op.Reshape(op.Pad(mask, unused), grid)

    ones = op.Expand(_float(1.0, canvas), _ints(channels, 1, 1, taps))
    output = opset19.DeformConv(
        canvas,
        ones,
        offsets,
        None,
        mask,
        group=channels,
        offset_group=num_heads,
        kernel_shape=[1, taps],
        pads=[0, 0, 0, taps - 1],
        strides=[1, 2],
    )  # (bs, channels, height, columns)
    output = op.Slice(op.Reshape(output, _ints(0, channels, -1)), _ints(0), num_queries, _ints(2))
    return op.Transpose(output, perm=[0, 2, 1])  # (bs, nq, channels)


def _as_deform_conv_where_queries_are_keys(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """The ``'deform_conv'`` form where the queries are as many as the keys
    (known from the exported shapes, equal or the same symbolic size), the
    ``'grid_sample'`` form elsewhere."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.shape[1] == sampling_locations.shape[1]:
        return ms_deform_attn_onnx_deform_conv(*args)
    return ms_deform_attn_onnx(*args)


def onnx_translation_table(form: str = 'grid_sample') -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: the op
    (``torch.ops.mmdet_deform.ms_deform_attn.default``, registered by
    ``mmdet_deform._C``) to its graph in ``form`` (one of :data:`FORMS`, see
    the module's docstring; ``'deform_conv'`` needs opset 19 or later).

    Raises:
        ValueError: if ``form`` is not one of :data:`FORMS`.
        RuntimeError: if the compiled op is not registered (``mmdet_deform._C``
            not built or not imported).
    """
    check_form(form)
    try:
        target = torch.ops.mmdet_deform.ms_deform_attn.default
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError(
            'torch.ops.mmdet_deform.ms_deform_attn is not registered: import mmdet_deform.ops '
            'with the compiled extension mmdet_deform._C built'
        ) from e
    if form == 'deform_conv':
        return {target: _as_deform_conv_where_queries_are_keys}
    return {target: ms_deform_attn_onnx}
