"""The transformer pieces: reference points, proposals, encoder and decoder."""

import copy
import sys

import pytest
import torch

from mmdet_deform.models.layers import (
    DeformableDetrTransformerDecoder,
    DeformableDetrTransformerEncoder,
    get_encoder_proposals,
    get_encoder_reference_points,
    get_padding_masks,
    get_valid_ratios,
)
from mmdet_deform.models.layers.transformer.ffn import FastFFN
from mmdet_deform.ops import MultiScaleDeformableAttention

LAYER_CFG = dict(
    self_attn_cfg=dict(embed_dims=32, num_heads=4, num_levels=2, num_points=2, dropout=0.0),
    ffn_cfg=dict(embed_dims=32, feedforward_channels=64, ffn_drop=0.0),
)
SPATIAL_SHAPES = torch.tensor([[4, 6], [2, 3]])
LEVEL_START = torch.tensor([0, 24])


def test_padding_masks_and_valid_ratios():
    like = torch.zeros(1)
    masks = get_padding_masks([(8, 12), (4, 6)], (8, 12), [(4, 6), (2, 3)], like=like)
    assert [tuple(m.shape) for m in masks] == [(2, 4, 6), (2, 2, 3)]
    assert not masks[0][0].any() and masks[0][1, :2, :3].logical_not().all()
    assert masks[0][1, 2:].all() and masks[0][1, :, 3:].all()
    ratios = get_valid_ratios(masks[0])
    assert ratios.dtype == torch.float32
    assert torch.equal(ratios, torch.tensor([[1.0, 1.0], [0.5, 0.5]]))


def test_encoder_reference_points_are_cell_centres_of_the_valid_area():
    valid_ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    points = get_encoder_reference_points(SPATIAL_SHAPES, valid_ratios)
    assert points.shape == (2, 24 + 6, 2, 2)
    # first cell of level 0: centre (0.5/6, 0.5/4) of the whole map
    assert torch.allclose(points[0, 0, 0], torch.tensor([0.5 / 6, 0.5 / 4]))
    # seen from any level, the point is at the same place of the image
    assert torch.allclose(points[0, :, 0], points[0, :, 1])
    # half-valid image: a cell centre is normalised to the valid half, then
    # scaled back by the valid ratio of each level
    assert torch.allclose(points[1, 0, 0], torch.tensor([0.5 / 6, 0.5 / 4]))


def test_proposals_invalid_on_padding_and_borders():
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask.view(-1)[:24].view(4, 6)[:, 3:] = True  # right half of level 0 padded
    mask.view(-1)[24:].view(2, 3)[:, 2:] = True
    proposals, invalid = get_encoder_proposals(mask, SPATIAL_SHAPES, 1, torch.device('cpu'))
    assert proposals.shape == (1, 30, 4) and invalid.shape == (1, 30, 1)
    assert invalid[0, mask[0], 0].all()
    assert torch.isinf(proposals[invalid.expand_as(proposals)]).all()
    valid = proposals[~invalid[..., 0]]
    assert torch.isfinite(valid).all()
    # sizes are 0.05 * 2**level of the valid image, in logit space
    assert torch.allclose(valid[0, 2:].sigmoid(), torch.tensor([0.05, 0.05]))


@pytest.mark.parametrize('num_cp', [1, 2])
def test_encoder_checkpointing_gives_the_same_gradients(num_cp):
    torch.manual_seed(0)
    plain = DeformableDetrTransformerEncoder(num_layers=2, layer_cfg=LAYER_CFG).double()
    checkpointed = DeformableDetrTransformerEncoder(
        num_layers=2, layer_cfg=LAYER_CFG, num_cp=num_cp
    ).double()
    checkpointed.load_state_dict(plain.state_dict())
    query = torch.randn(2, 30, 32, dtype=torch.float64)
    pos = torch.randn(2, 30, 32, dtype=torch.float64)
    ratios = torch.ones(2, 2, 2, dtype=torch.float64)
    refs = get_encoder_reference_points(SPATIAL_SHAPES, ratios)
    grads = []
    for encoder in (plain, checkpointed):
        encoder.train()
        out = encoder(query, pos, None, refs, SPATIAL_SHAPES, LEVEL_START)
        (out * torch.arange(32, dtype=torch.float64)).sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_decoder_refines_points_into_boxes():
    torch.manual_seed(0)
    layer_cfg = dict(
        self_attn_cfg=dict(embed_dims=32, num_heads=4, dropout=0.0),
        cross_attn_cfg=dict(embed_dims=32, num_heads=4, num_levels=2, num_points=2, dropout=0.0),
        ffn_cfg=dict(embed_dims=32, feedforward_channels=64, ffn_drop=0.0),
    )
    decoder = DeformableDetrTransformerDecoder(num_layers=3, layer_cfg=layer_cfg)
    reg_branches = torch.nn.ModuleList([torch.nn.Linear(32, 4) for _ in range(3)])
    query = torch.randn(2, 5, 32)
    points = torch.rand(2, 5, 2)
    hidden, refs = decoder(
        query,
        torch.randn(2, 5, 32),
        torch.randn(2, 30, 32),
        None,
        points,
        SPATIAL_SHAPES,
        LEVEL_START,
        torch.ones(2, 2, 2),
        reg_branches=reg_branches,
    )
    assert hidden.shape == (3, 2, 5, 32) and refs.shape == (3, 2, 5, 4)
    assert not refs.requires_grad  # references are detached between layers
    # first refinement: centre moved from the initial points by the deltas
    deltas = reg_branches[0](hidden[0])
    expected_centre = (deltas[..., :2] + torch.logit(points, eps=1e-5)).sigmoid()
    assert torch.allclose(refs[0, ..., :2], expected_centre, atol=1e-6)
    assert torch.allclose(refs[0, ..., 2:], deltas[..., 2:].sigmoid(), atol=1e-6)
    # without branches the references stay the initial points
    _, still = decoder(
        query,
        torch.randn(2, 5, 32),
        torch.randn(2, 30, 32),
        None,
        points,
        SPATIAL_SHAPES,
        LEVEL_START,
        torch.ones(2, 2, 2),
    )
    assert torch.equal(still, points[None].expand(3, -1, -1, -1))


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match='num_cp'):
        DeformableDetrTransformerEncoder(num_layers=2, layer_cfg=LAYER_CFG, num_cp=3)
    with pytest.raises(ValueError, match='num_layers'):
        DeformableDetrTransformerEncoder(num_layers=0, layer_cfg=LAYER_CFG)


def _attention_inputs(reference_dims: int, masked: bool):
    """A float64 attention module and inputs over SPATIAL_SHAPES."""
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(
        embed_dims=32, num_heads=4, num_levels=2, num_points=2, dropout=0.0, batch_first=True
    ).double()
    with torch.no_grad():  # non-trivial offsets and weights
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    query = torch.randn(2, 5, 32, dtype=torch.float64)
    query_pos = torch.randn(2, 5, 32, dtype=torch.float64)
    memory = torch.randn(2, 30, 32, dtype=torch.float64, requires_grad=True)
    refs = torch.rand(2, 5, 2, reference_dims, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.zeros(2, 30, dtype=torch.bool)
        mask[1].view(-1)[:24].view(4, 6)[:, 4:] = True
        mask[1].view(-1)[24:].view(2, 3)[:, 2:] = True
    return attn, query, query_pos, memory, refs, mask


@pytest.mark.parametrize('reference_dims', [2, 4])
@pytest.mark.parametrize('masked', [False, True])
def test_sample_then_project_equals_project_then_sample(reference_dims, masked):
    """The module's two ways give the same output and gradients."""
    attn, query, query_pos, memory, refs, mask = _attention_inputs(reference_dims, masked)
    sampling_first = MultiScaleDeformableAttention(
        embed_dims=32,
        num_heads=4,
        num_levels=2,
        num_points=2,
        dropout=0.0,
        batch_first=True,
        sample_then_project=True,
    ).double()
    sampling_first.load_state_dict(attn.state_dict())
    calls = []
    # 5 queries x 4 heads < 30 keys: the module samples first
    sampling_first.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    kwargs = dict(
        value=memory,
        query_pos=query_pos,
        key_padding_mask=mask,
        reference_points=refs,
        spatial_shapes=SPATIAL_SHAPES,
        level_start_index=LEVEL_START,
    )
    msda = sys.modules['mmdet_deform.ops.ms_deform_attn']

    seen = []
    original = msda.ms_deform_attn

    def spy(value, *args, **kw):
        seen.append(tuple(value.shape))
        return original(value, *args, **kw)

    msda.ms_deform_attn = spy
    try:
        expected = attn(query, **kwargs)
        output = sampling_first(query, **kwargs)
    finally:
        msda.ms_deform_attn = original
    # projected heads; then the raw value and its validity, one head each
    assert seen == [(2, 30, 4, 8), (2, 30, 1, 32), (2, 30, 1, 1)]
    assert calls == [(2, 5, 32)]
    assert torch.allclose(output, expected, rtol=0, atol=1e-12)
    (expected_grad,) = torch.autograd.grad(expected.sum(), memory)
    (grad,) = torch.autograd.grad(output.sum(), memory)
    assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)


def test_decoder_sample_then_project_changes_nothing():
    torch.manual_seed(0)
    layer_cfg = dict(
        self_attn_cfg=dict(embed_dims=32, num_heads=4, dropout=0.0),
        cross_attn_cfg=dict(embed_dims=32, num_heads=4, num_levels=2, num_points=2, dropout=0.0),
        ffn_cfg=dict(embed_dims=32, feedforward_channels=64, ffn_drop=0.0),
    )
    fast = DeformableDetrTransformerDecoder(num_layers=2, layer_cfg=layer_cfg).double()
    assert all(layer.cross_attn.sample_then_project for layer in fast.layers)
    plain_cfg = copy.deepcopy(layer_cfg)
    plain_cfg['cross_attn_cfg']['sample_then_project'] = False
    plain = DeformableDetrTransformerDecoder(num_layers=2, layer_cfg=plain_cfg).double()
    plain.load_state_dict(fast.state_dict())
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:24] = True
    args = (
        torch.randn(2, 3, 32, dtype=torch.float64),  # 3 queries x 4 heads < 30 keys
        torch.randn(2, 3, 32, dtype=torch.float64),
        torch.randn(2, 30, 32, dtype=torch.float64),
        mask,
        torch.rand(2, 3, 4, dtype=torch.float64),
        SPATIAL_SHAPES,
        LEVEL_START,
        torch.rand(2, 2, 2, dtype=torch.float64) * 0.5 + 0.5,
    )
    for a, b in zip(fast(*args), plain(*args)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_fast_ffn_equals_mmcv_ffn():
    from mmcv.cnn.bricks.transformer import FFN

    torch.manual_seed(0)
    ours = FastFFN(embed_dims=16, feedforward_channels=32, ffn_drop=0.1).double()
    theirs = FFN(embed_dims=16, feedforward_channels=32, ffn_drop=0.1).double()
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    ours.eval()
    theirs.eval()
    out = ours(x)
    assert torch.allclose(out, theirs(x), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(theirs(x).sum(), x)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-12)


def test_fast_ffn_dropout_is_its_dropout_modules():
    """The fast path drops out with our ``Dropout`` (an ``nn.Dropout``) at
    mmcv's positions, in mmcv's order and with its ``p``; p=0 switches it off."""
    from mmcv.cnn.bricks.transformer import FFN

    from mmdet_deform.ops import Dropout

    ours = FastFFN(embed_dims=16, feedforward_channels=32, ffn_drop=0.5).double()
    theirs = FFN(embed_dims=16, feedforward_channels=32, ffn_drop=0.5).double()
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    dropouts = [m for m in ours.modules() if isinstance(m, torch.nn.Dropout)]
    assert [type(m) for m in dropouts] == [Dropout, Dropout]
    assert [m.p for m in dropouts] == [0.5, 0.5]
    # mmcv's forward with our dropout modules draws the same masks
    theirs.layers[0][2], theirs.layers[2] = Dropout(0.5), Dropout(0.5)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    assert torch.allclose(out, theirs(x), rtol=0, atol=1e-12)
    ours.eval()
    assert not torch.allclose(out, ours(x))  # dropout was active in train mode
    plain = ours(x)
    ours.train()
    for module in ours.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert torch.equal(ours(x), plain)


@pytest.mark.parametrize('sample_then_project', [False, True])
def test_attention_dropout_is_the_module_dropout(sample_then_project):
    """Dropout on the output, before the residual, with the module's own
    ``dropout`` (same mask under the same seed in both ways)."""
    attn, query, query_pos, memory, refs, mask = _attention_inputs(2, masked=True)
    attn.sample_then_project = sample_then_project
    attn.dropout.p = 0.5

    def run():
        return attn(
            query,
            value=memory,
            query_pos=query_pos,
            key_padding_mask=mask,
            reference_points=refs,
            spatial_shapes=SPATIAL_SHAPES,
            level_start_index=LEVEL_START,
        )

    attn.eval()
    plain = run()
    attn.train()
    torch.manual_seed(3)
    out = run()
    assert not torch.allclose(out, plain)
    # the residual (the query) is added after the dropout: where the mask
    # dropped an element, the output is the query itself
    dropped = torch.isclose(out, query, rtol=0, atol=1e-12)
    assert dropped.any() and not dropped.all()
    torch.manual_seed(3)
    expected = attn.dropout(plain - query) + query
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    attn.dropout.p = 0.0
    assert torch.allclose(run(), plain, rtol=0, atol=1e-12)
