"""DINO's decoder: look forward twice, the self-attention mask, shapes."""

import pytest
import torch

from mmdet_deform.models.layers import DinoTransformerDecoder, get_dn_attn_mask

SPATIAL_SHAPES = torch.tensor([[4, 5], [2, 5]])
LEVEL_START = torch.tensor([0, 20])
LAYER_CFG = dict(
    self_attn_cfg=dict(embed_dims=32, num_heads=4, dropout=0.0),
    cross_attn_cfg=dict(embed_dims=32, num_heads=4, num_levels=2, num_points=2, dropout=0.0),
    ffn_cfg=dict(embed_dims=32, feedforward_channels=64, ffn_drop=0.0),
)


def _run(decoder, query, boxes, reg_branches=None, mask=None, memory=None):
    torch.manual_seed(1)
    memory = torch.randn(query.shape[0], 30, 32) if memory is None else memory
    return decoder(
        query,
        memory,
        None,
        boxes,
        SPATIAL_SHAPES,
        LEVEL_START,
        torch.ones(query.shape[0], 2, 2),
        reg_branches=reg_branches,
        self_attn_mask=mask,
    )


@pytest.mark.parametrize('look_forward_twice', [False, True])
def test_look_forward_twice_changes_gradients_only(look_forward_twice):
    """Same values either way; with the switch, the loss on layer 1's boxes
    (predicted from layer 0's refined boxes) reaches layer 0's branch."""
    torch.manual_seed(0)
    decoder = DinoTransformerDecoder(
        num_layers=2, layer_cfg=LAYER_CFG, look_forward_twice=look_forward_twice
    )
    reg_branches = torch.nn.ModuleList([torch.nn.Linear(32, 4) for _ in range(2)])
    query = torch.randn(2, 5, 32)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    hidden, refs = _run(decoder, query, boxes, reg_branches)
    assert hidden.shape == (2, 2, 5, 32) and refs.shape == (2, 2, 5, 4)
    # the head's layer-1 boxes: deltas on layer 0's refined boxes
    boxes_1 = (reg_branches[1](hidden[1]) + torch.logit(refs[0], eps=1e-5)).sigmoid()
    boxes_1.sum().backward()
    branch_grad = reg_branches[0].weight.grad
    assert (branch_grad is not None and branch_grad.abs().sum() > 0) == look_forward_twice
    assert reg_branches[1].weight.grad.abs().sum() > 0


def test_look_forward_twice_returns_the_same_boxes():
    torch.manual_seed(0)
    decoder = DinoTransformerDecoder(num_layers=2, layer_cfg=LAYER_CFG, look_forward_twice=True)
    reg_branches = torch.nn.ModuleList([torch.nn.Linear(32, 4) for _ in range(2)])
    query, boxes = torch.randn(2, 5, 32), torch.rand(2, 5, 4) * 0.5 + 0.25
    hidden, refs = _run(decoder, query, boxes, reg_branches)
    decoder.look_forward_twice = False
    hidden_off, refs_off = _run(decoder, query, boxes, reg_branches)
    assert torch.equal(hidden, hidden_off) and torch.equal(refs, refs_off)
    assert refs.requires_grad and not refs_off.requires_grad
    # hidden states are normalised; the boxes are refined from the raw ones
    assert torch.allclose(hidden[0].mean(-1), torch.zeros(2, 5), atol=1e-5)


def test_without_branches_the_boxes_stay():
    torch.manual_seed(0)
    decoder = DinoTransformerDecoder(num_layers=2, layer_cfg=LAYER_CFG)
    boxes = torch.rand(2, 5, 4)
    _, refs = _run(decoder, torch.randn(2, 5, 32), boxes)
    assert torch.equal(refs, boxes[None].expand(2, -1, -1, -1))


def test_mask_stops_leaks_into_matching_queries_and_between_groups():
    """With the denoising mask, changing a denoising group changes neither
    the matching queries nor the other group; without it, it does."""
    torch.manual_seed(0)
    decoder = DinoTransformerDecoder(num_layers=2, layer_cfg=LAYER_CFG)
    reg_branches = torch.nn.ModuleList([torch.nn.Linear(32, 4) for _ in range(2)])
    group_size, num_groups, num_matching = 4, 2, 3
    num_dn = group_size * num_groups
    mask = get_dn_attn_mask(group_size, num_groups, num_matching)
    query = torch.randn(1, num_dn + num_matching, 32)
    boxes = torch.rand(1, num_dn + num_matching, 4) * 0.5 + 0.25
    changed_query, changed_boxes = query.clone(), boxes.clone()
    changed_query[:, :group_size] += 1.0  # group 0 only
    changed_boxes[:, :group_size] = 0.3
    with torch.no_grad():
        hidden, refs = _run(decoder, query, boxes, reg_branches, mask)
        hidden2, refs2 = _run(decoder, changed_query, changed_boxes, reg_branches, mask)
        leaky, _ = _run(decoder, query, boxes, reg_branches)
        leaky2, _ = _run(decoder, changed_query, changed_boxes, reg_branches)
    unaffected = slice(group_size, None)  # group 1 and the matching queries
    assert torch.allclose(hidden[:, :, unaffected], hidden2[:, :, unaffected], atol=1e-6)
    assert torch.allclose(refs[:, :, unaffected], refs2[:, :, unaffected], atol=1e-6)
    assert not torch.allclose(hidden[:, :, :group_size], hidden2[:, :, :group_size], atol=1e-3)
    assert not torch.allclose(leaky[:, :, num_dn:], leaky2[:, :, num_dn:], atol=1e-3)


def test_decoder_rejects_points_and_short_branch_lists():
    decoder = DinoTransformerDecoder(num_layers=2, layer_cfg=LAYER_CFG)
    with pytest.raises(ValueError, match='reference_points'):
        _run(decoder, torch.randn(1, 3, 32), torch.rand(1, 3, 2))
    with pytest.raises(ValueError, match='reg_branches'):
        _run(decoder, torch.randn(1, 3, 32), torch.rand(1, 3, 4), [torch.nn.Linear(32, 4)])
