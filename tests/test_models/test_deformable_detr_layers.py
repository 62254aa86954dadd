"""The transformer pieces: reference points, proposals, encoder and decoder."""

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
