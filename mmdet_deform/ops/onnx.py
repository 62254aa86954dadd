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
  the levels' maps are gathered into one canvas (transposed, so that the
  offsets are the locations' (x, y) in their order; a row and a column of
  zeros after every map, the canvas's own border reading zero, coordinates
  clipped into them), every query is one output position, every (level,
  point) one kernel tap with its offset and the attention weight as its
  mask, so that sampling, weighting and the sums over levels and points run
  in one operator, the offsets computed with a few operators over whole
  tensors (about half the time of the ``GridSample`` form's operators in
  ONNX Runtime). Other calls (the decoder's cross-attention, whose few
  queries would waste a canvas-sized output grid) use the ``GridSample``
  form.

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


def _canvas_layout(spatial_shapes, num_levels: int, num_queries, taps: int):
    """Where every level's map lies in the ``'deform_conv'`` form's canvas, and
    the canvas's and the output grid's sizes (all int64, computed at run time).

    The canvas is transposed against the maps (its rows are the maps' x, its
    columns their y), so that DeformConv's offsets, (row, column), are the
    sampling locations' (x, y) in their own order. Level 0 lies at (0, 0);
    the other levels lie below each other in a block to its right. Every map
    is followed by a row and a column of zeros (the canvas's own border reads
    zero in DeformConv), so that a location clipped into ``[-1, size]`` pixels
    reads only its own map or zeros. DeformConv's kernel is one row of
    ``taps`` (stride 1, no padding): its output grid has ``rows x (columns -
    taps + 1)`` positions, one per query in row-major order; the canvas is
    widened with zero columns where the maps alone would give too few.

    Returns:
        dict: ``heights``, ``widths`` (num_levels,), the first ``level_rows``
        and ``level_columns`` of every map (num_levels,), ``rows``,
        ``columns`` of the canvas and ``grid_columns`` of the output grid
        (each of shape (1,)).
    """
    one = _ints(1)
    heights = op.Gather(spatial_shapes, _scalar(0), axis=1)  # (nl,)
    widths = op.Gather(spatial_shapes, _scalar(1), axis=1)
    rows = op.Add(op.Slice(widths, _ints(0), one), one)  # level 0's x and a zero row
    columns = op.Add(op.Slice(heights, _ints(0), one), one)
    level_rows = level_columns = _ints(0)
    if num_levels > 1:
        block_rows = op.Add(op.Slice(widths, one, _ints(num_levels)), one)  # (nl - 1,)
        block_columns = op.Add(op.Slice(heights, one, _ints(num_levels)), one)
        level_rows = op.Concat(level_rows, op.CumSum(block_rows, _scalar(0), exclusive=1), axis=0)
        level_columns = op.Concat(level_columns, op.Expand(columns, _ints(num_levels - 1)), axis=0)
        rows = op.Max(rows, op.ReduceSum(block_rows, keepdims=1))
        columns = op.Add(columns, op.ReduceMax(block_columns, keepdims=1))
    # at least ceil(num_queries / rows) output columns
    needed = op.Add(op.Div(op.Sub(op.Add(num_queries, rows), one), rows), _ints(taps - 1))
    columns = op.Max(columns, needed)
    return dict(
        heights=heights,
        widths=widths,
        level_rows=level_rows,
        level_columns=level_columns,
        rows=rows,
        columns=columns,
        grid_columns=op.Sub(columns, _ints(taps - 1)),
    )


def _canvas(value, level_start_index, layout: dict, num_levels: int, channels: int):
    """The ``'deform_conv'`` form's canvas: one ``Gather`` of the values' rows
    (a zero row appended for the pixels outside every map), transposed.

    Args:
        value: has shape (bs, num_keys, num_heads, head_dim).

    Returns:
        The canvas, has shape (bs, channels, rows, columns), channel
        ``head * head_dim + d``.
    """
    num_keys = op.Shape(value, start=1, end=2)  # (1,): the zero row's index
    rows, columns = layout['rows'], layout['columns']
    row = op.Unsqueeze(op.Range(_scalar(0), op.Squeeze(rows), _scalar(1)), _ints(1))  # (R, 1)
    column = op.Unsqueeze(op.Range(_scalar(0), op.Squeeze(columns), _scalar(1)), _ints(0))  # (1, C)
    key = num_keys
    for level in range(num_levels):
        at = _ints(level)
        x = op.Sub(row, op.Gather(layout['level_rows'], at))  # (R, 1)
        y = op.Sub(column, op.Gather(layout['level_columns'], at))  # (1, C)
        width = op.Gather(layout['widths'], at)
        inside = op.And(
            op.And(op.GreaterOrEqual(x, _ints(0)), op.Less(x, width)),
            op.And(op.GreaterOrEqual(y, _ints(0)), op.Less(y, op.Gather(layout['heights'], at))),
        )
        level_key = op.Add(op.Gather(level_start_index, at), op.Add(op.Mul(y, width), x))
        key = op.Where(inside, level_key, key)  # (R, C)
    values = op.Reshape(value, _ints(0, 0, channels))  # (bs, num_keys, channels)
    zero_row = op.Expand(
        _float(0.0, values), op.Concat(op.Shape(values, start=0, end=1), _ints(1, channels), axis=0)
    )
    canvas = op.Gather(op.Concat(values, zero_row, axis=1), op.Reshape(key, _ints(-1)), axis=1)
    canvas = op.Transpose(canvas, perm=[0, 2, 1])  # (bs, channels, R * C)
    return op.Reshape(canvas, op.Concat(_ints(0, channels), rows, columns, axis=0))


def ms_deform_attn_onnx_deform_conv(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """The ``'deform_conv'`` form of the op's graph (see the module's
    docstring): one depthwise ``DeformConv`` (opset 19) over a canvas holding
    every level's map (see :func:`_canvas_layout`), every query one output
    position, every (level, point) one kernel tap with its location as the
    offset and its attention weight as the mask. Correct for any number of
    queries (the canvas widens to an output position per query); fast where
    the queries are about as many as the keys. Arguments and result as
    :func:`ms_deform_attn_onnx`.
    """
    num_heads = _static_dim(value, 2, 'number of heads')
    head_dim = _static_dim(value, 3, 'head dimension')
    num_levels = _static_dim(sampling_locations, 3, 'number of levels')
    num_points = _static_dim(sampling_locations, 4, 'number of points')
    channels = num_heads * head_dim
    taps = num_levels * num_points  # tap = level * num_points + point
    num_queries = op.Shape(sampling_locations, start=1, end=2)  # (1,)
    layout = _canvas_layout(spatial_shapes, num_levels, num_queries, taps)
    canvas = _canvas(value, level_start_index, layout, num_levels, channels)

    # offsets, whole tensors with the queries innermost:
    # (bs, nq, nh, nl, np, 2) -> (bs, nh, nl, np, 2, nq), the last but one (x, y)
    locations = op.Transpose(sampling_locations, perm=[0, 2, 3, 4, 5, 1])
    sizes = op.Gather(spatial_shapes, _ints(1, 0), axis=1)  # (nl, 2): (w, h)
    sizes = op.CastLike(op.Reshape(sizes, _ints(num_levels, 1, 2, 1)), locations)
    half = _float(0.5, locations)
    # the op's pixel coordinate plus 1/2, NaN moved outside, clipped into the
    # map's zero border: [-1, size] pixels
    pixels = op.Mul(locations, sizes)
    pixels = op.Where(op.IsNaN(pixels), op.Neg(half), pixels)
    pixels = op.Min(op.Max(pixels, op.Neg(half)), op.Add(sizes, half))
    # minus 1/2, plus the map's corner, minus the tap's own position: query q
    # sits at grid (q // grid_columns, q % grid_columns), its tap t one column
    # further per tap
    grid_columns = layout['grid_columns']
    query = op.Range(_scalar(0), op.Squeeze(num_queries), _scalar(1))
    query_row = op.CastLike(op.Div(query, op.Squeeze(grid_columns)), locations)  # (nq,)
    query_column = op.CastLike(op.Mod(query, op.Squeeze(grid_columns)), locations)
    tap = op.Range(_scalar(0), _scalar(taps), _scalar(1))
    tap = op.CastLike(op.Reshape(tap, _ints(num_levels, num_points, 1, 1)), locations)
    per_level = _ints(num_levels, 1, 1, 1)
    corner_row = op.Reshape(op.CastLike(layout['level_rows'], locations), per_level)
    corner_column = op.Reshape(op.CastLike(layout['level_columns'], locations), per_level)
    shift_row = op.Sub(op.Sub(corner_row, half), query_row)  # (nl, 1, 1, nq)
    shift_row = op.Expand(
        shift_row, op.Concat(_ints(num_levels, num_points, 1), num_queries, axis=0)
    )
    shift_column = op.Sub(op.Sub(op.Sub(corner_column, half), tap), query_column)  # (nl, np, 1, nq)
    offsets = op.Add(pixels, op.Concat(shift_row, shift_column, axis=2))

    # (bs, C', nq) -> (bs, C', rows, grid_columns): the unused positions padded
    positions = op.Mul(layout['rows'], grid_columns)
    unused = op.Concat(_ints(0, 0, 0, 0, 0), op.Sub(positions, num_queries), axis=0)
    grid = op.Concat(_ints(0, -1), layout['rows'], grid_columns, axis=0)
    offsets = op.Reshape(offsets, op.Concat(_ints(0, 2 * num_heads * taps), num_queries, axis=0))
    offsets = op.Reshape(op.Pad(offsets, unused), grid)
    # (bs, nq, nh, nl, np) -> (bs, nh * taps, rows, grid_columns)
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
    )  # (bs, channels, rows, grid_columns)
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
