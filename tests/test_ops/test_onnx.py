"""The ONNX translation of the MSDA op (``mmdet_deform.ops.onnx``): a module
calling ``ms_deform_attn`` exported with ``torch.onnx.export`` runs in stock
ONNX Runtime (no custom domain) and matches the pure-PyTorch reference,
including points outside the maps, non-finite locations, other numbers of
queries and keys than at export, and every supported opset; in both forms
(``GridSample`` per level, and ``DeformConv`` where the queries are as many
as the keys)."""

import numpy as np
import pytest
import torch

from mmdet_deform.ops import ms_deform_attn, ms_deform_attn_pytorch

from .msda_inputs import level_metadata, make_inputs

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

from mmdet_deform.ops.onnx import (  # noqa: E402  (needs onnxscript)
    FORMS,
    MAX_OPSET,
    MIN_OPSET,
    check_opset,
    ms_deform_attn_onnx_deform_conv,
    onnx_translation_table,
)

NAMES = ('value', 'spatial_shapes', 'level_start_index', 'sampling_locations', 'attention_weights')


class MSDA(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, weights)


def _float32(inputs):
    return tuple(t.float() if t.is_floating_point() else t for t in inputs)


def _export(
    path, inputs, opset_version=MIN_OPSET, dynamic=True, form='grid_sample', table=None
) -> str:
    """Export with dynamic batch, keys and queries (one size for keys and
    queries in the ``'deform_conv'`` form: the encoder's self-attention)."""
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim('batch', max=64)
        keys = torch.export.Dim('keys', max=100000)
        queries = keys if form == 'deform_conv' else torch.export.Dim('queries', max=100000)
        dynamic_shapes = (
            {0: batch, 1: keys},
            None,
            None,
            {0: batch, 1: queries},
            {0: batch, 1: queries},
        )
    program = torch.onnx.export(
        MSDA().eval(),
        inputs,
        input_names=list(NAMES),
        dynamic_shapes=dynamic_shapes,
        opset_version=opset_version,
        custom_translation_table=table or onnx_translation_table(form),
    )
    program.save(str(path))
    return str(path)


def _run(path, inputs) -> np.ndarray:
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {n: t.numpy() for n, t in zip(NAMES, inputs)})[0]


def _expected(inputs) -> np.ndarray:
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    return ms_deform_attn_pytorch(*exact).numpy()


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> str:
    """4 levels, 3 heads, head_dim 5, 2 points, exported with 2 images and 7 queries."""
    inputs = _float32(make_inputs(2, 7, 3, 5, 4, 2, seed=0))
    return _export(tmp_path_factory.mktemp('onnx') / 'msda.onnx', inputs)


def test_graph_has_only_standard_operators(exported):
    model = onnx.load(exported)
    onnx.checker.check_model(model, full_check=True)
    domains = {node.domain for node in model.graph.node}
    assert domains <= {'', 'ai.onnx'}, domains
    assert 'GridSample' in {node.op_type for node in model.graph.node}
    assert {o.domain: o.version for o in model.opset_import}[''] == MIN_OPSET


@pytest.mark.parametrize(
    'bs,num_queries,low,high',
    [
        (2, 7, -0.2, 1.2),  # the export's sizes, borders and points outside
        (1, 40, 0.0, 1.0),  # another batch size and number of queries
        (3, 1, -3.0, 4.0),  # far outside: only zero padding
    ],
)
def test_matches_reference(exported, bs, num_queries, low, high):
    inputs = _float32(
        make_inputs(bs, num_queries, 3, 5, 4, 2, seed=num_queries, low=low, high=high)
    )
    np.testing.assert_allclose(_run(exported, inputs), _expected(inputs), rtol=1e-5, atol=1e-5)


def test_other_map_sizes_than_at_export(exported):
    """Same layout (4 levels) with other (h, w): the maps' sizes are read at run time."""
    value, _, _, loc, weights = _float32(make_inputs(2, 9, 3, 5, 4, 2, seed=3))
    shapes, starts = level_metadata(((3, 4), (7, 2), (1, 1), (5, 6)))
    num_keys = int(shapes.prod(1).sum())
    value = torch.randn(2, num_keys, 3, 5)
    inputs = (value, shapes, starts, loc, weights)
    np.testing.assert_allclose(_run(exported, inputs), _expected(inputs), rtol=1e-5, atol=1e-5)


def assert_non_finite_locations_contribute_zero(path, num_queries: int) -> None:
    value, shapes, starts, loc, weights = _float32(make_inputs(2, num_queries, 3, 5, 4, 2, seed=4))
    loc[0, 0, 0, 0, 0, 0] = float('nan')
    loc[0, 1, 1, 1, 1, 1] = float('inf')
    loc[1, 2, 2, 2, 0, 0] = float('-inf')
    loc[1, 3, 0, 3, 1, 1] = 1e30
    inputs = (value, shapes, starts, loc, weights)
    actual = _run(path, inputs)
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, ms_deform_attn(*inputs).numpy(), rtol=1e-5, atol=1e-5)


def test_non_finite_locations_contribute_zero(exported):
    assert_non_finite_locations_contribute_zero(exported, num_queries=7)


@pytest.mark.parametrize('opset_version', sorted({MIN_OPSET, 20, MAX_OPSET}))
def test_every_supported_opset(tmp_path, opset_version):
    inputs = _float32(make_inputs(1, 6, 2, 4, 2, 3, seed=opset_version))
    path = _export(tmp_path / 'msda.onnx', inputs, opset_version, dynamic=False)
    model = onnx.load(path)
    assert {o.domain: o.version for o in model.opset_import}[''] == opset_version
    np.testing.assert_allclose(_run(path, inputs), _expected(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('opset_version', [MIN_OPSET - 1, MAX_OPSET + 1, '20', 20.0, True])
def test_unsupported_opset_is_named(opset_version):
    with pytest.raises(ValueError, match=f'opset_version must be an int from {MIN_OPSET}'):
        check_opset(opset_version)


def test_supported_opsets_pass_the_check():
    assert [check_opset(v) for v in range(MIN_OPSET, MAX_OPSET + 1)] == list(
        range(MIN_OPSET, MAX_OPSET + 1)
    )


# ------------------------------------------------------------ the DeformConv form
NUM_KEYS = 76  # of the 4-level layout of make_inputs
# DeformConv takes a location as an offset from its output position, which is
# up to the canvas's width away: float32 rounds it to about 1e-7 of that (here
# up to ~1e-5 px for 500 queries: the canvas widens to up to 77 columns)
WIDE_CANVAS_ATOL = 1e-4


def _operators(path) -> set:
    return {node.op_type for node in onnx.load(path).graph.node}


@pytest.fixture(scope='module')
def exported_deform_conv(tmp_path_factory) -> str:
    """4 levels, 3 heads, head_dim 5, 2 points, as many queries as keys (76),
    exported with 2 images."""
    inputs = _float32(make_inputs(2, NUM_KEYS, 3, 5, 4, 2, seed=0))
    path = tmp_path_factory.mktemp('onnx') / 'msda_deform_conv.onnx'
    return _export(path, inputs, opset_version=19, form='deform_conv')


def test_deform_conv_form_is_one_deform_conv(exported_deform_conv):
    model = onnx.load(exported_deform_conv)
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {'', 'ai.onnx'}
    operators = [node.op_type for node in model.graph.node]
    assert operators.count('DeformConv') == 1 and 'GridSample' not in operators
    assert {o.domain: o.version for o in model.opset_import}[''] == 19


@pytest.mark.parametrize(
    'bs,low,high',
    [
        (2, -0.2, 1.2),  # the export's batch, borders and points outside
        (1, 0.0, 1.0),  # another batch size
        (3, -3.0, 4.0),  # far outside: only zero padding
    ],
)
def test_deform_conv_form_matches_reference(exported_deform_conv, bs, low, high):
    inputs = _float32(make_inputs(bs, NUM_KEYS, 3, 5, 4, 2, seed=bs, low=low, high=high))
    np.testing.assert_allclose(
        _run(exported_deform_conv, inputs), _expected(inputs), rtol=1e-5, atol=1e-5
    )


def test_deform_conv_form_other_map_sizes(exported_deform_conv):
    """Other (h, w), a 1 x 1 map and a left map narrower than the others."""
    shapes, starts = level_metadata(((3, 4), (7, 2), (1, 1), (5, 6)))
    num_keys = int(shapes.prod(1).sum())
    _, _, _, loc, weights = _float32(make_inputs(2, num_keys, 3, 5, 4, 2, seed=3))
    inputs = (torch.randn(2, num_keys, 3, 5), shapes, starts, loc, weights)
    np.testing.assert_allclose(
        _run(exported_deform_conv, inputs), _expected(inputs), rtol=1e-5, atol=1e-5
    )


def test_deform_conv_form_non_finite_locations_contribute_zero(exported_deform_conv):
    assert_non_finite_locations_contribute_zero(exported_deform_conv, num_queries=NUM_KEYS)


@pytest.mark.parametrize('num_levels', [1, 2, 4])
@pytest.mark.parametrize('num_queries', [3, 500])
def test_deform_conv_graph_for_any_number_of_queries(tmp_path, num_levels, num_queries):
    """Called directly, the DeformConv graph is right for fewer queries than
    keys and for more than the canvas has pixels (it grows), for 1 to 4 levels."""
    inputs = _float32(make_inputs(2, num_queries, 2, 4, num_levels, 3, seed=num_queries))
    target = torch.ops.mmdet_deform.ms_deform_attn.default
    table = {target: ms_deform_attn_onnx_deform_conv}
    path = _export(tmp_path / 'msda.onnx', inputs, 19, dynamic=False, table=table)
    assert 'DeformConv' in _operators(path)
    atol = 1e-5 if num_queries <= NUM_KEYS else WIDE_CANVAS_ATOL
    np.testing.assert_allclose(_run(path, inputs), _expected(inputs), rtol=1e-5, atol=atol)


def test_deform_conv_form_keeps_grid_sample_for_cross_attention(tmp_path):
    """Fewer queries than keys (the decoder): GridSample, as the default form."""
    inputs = _float32(make_inputs(2, 7, 3, 5, 4, 2, seed=5))
    path = _export(tmp_path / 'msda.onnx', inputs, 19, dynamic=False, form='deform_conv')
    operators = _operators(path)
    assert 'GridSample' in operators and 'DeformConv' not in operators
    np.testing.assert_allclose(_run(path, inputs), _expected(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('opset_version', [20, MAX_OPSET])
def test_deform_conv_form_every_supported_opset(tmp_path, opset_version):
    inputs = _float32(make_inputs(1, NUM_KEYS, 2, 4, 4, 3, seed=opset_version))
    path = _export(tmp_path / 'msda.onnx', inputs, opset_version, dynamic=False, form='deform_conv')
    assert 'DeformConv' in _operators(path)
    np.testing.assert_allclose(_run(path, inputs), _expected(inputs), rtol=1e-5, atol=1e-5)


def test_forms_are_named():
    assert FORMS == ('grid_sample', 'deform_conv')
    with pytest.raises(ValueError, match="form must be one of \\('grid_sample', 'deform_conv'\\)"):
        onnx_translation_table('gather')
    with pytest.raises(ValueError, match="the 'deform_conv' form needs DeformConv, from opset 19"):
        check_opset(18, 'deform_conv')
    assert check_opset(19, 'deform_conv') == 19
