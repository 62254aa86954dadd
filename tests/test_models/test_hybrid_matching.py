"""Hybrid matching (H-DETR) on Deformable DETR: the one-to-many queries'
mask, matching and losses; the one-to-one queries unchanged by them;
dropped at inference."""

import os.path as osp

import pytest
import torch
from mmdet.models.task_modules import HungarianAssigner
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

from mmdet_deform.models.layers import get_hybrid_attn_mask
from mmdet_deform.models.task_modules import OneToManyAssigner
from mmdet_deform.registry import MODELS

from .parity_utils import REPO_ROOT, SMALL, VARIANTS, make_batch

HYBRID = {'model.num_queries_one2many': 20, 'model.k_one2many': 2}
MATCH_COSTS = [
    dict(type='FocalLossCost', weight=2.0),
    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
    dict(type='IoUCost', iou_mode='giou', weight=2.0),
]


@pytest.fixture(autouse=True)
def default_scope():
    init_default_scope('mmdet_deform')


def build(variant: str, seed: int = 0, **options):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'deformable_detr', VARIANTS[variant][0]))
    cfg.merge_from_dict({**SMALL, **options})
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def test_hybrid_mask_separates_the_groups_exactly():
    mask = get_hybrid_attn_mask(3, 2)
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 1],
            [0, 0, 0, 1, 1],
            [0, 0, 0, 1, 1],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize('k', [1, 3])
def test_one_to_many_assigner_gives_every_object_k_predictions(k):
    g = torch.Generator().manual_seed(0)
    pred = InstanceData(
        scores=torch.randn(12, 4, generator=g), bboxes=torch.rand(12, 4, generator=g)
    )
    xy = torch.rand(3, 2, generator=g) * 40
    gt = InstanceData(bboxes=torch.cat([xy, xy + 10], 1), labels=torch.tensor([2, 0, 3]))
    result = OneToManyAssigner(HungarianAssigner(MATCH_COSTS), k).assign(
        pred, gt, img_meta=dict(img_shape=(64, 64))
    )
    assert result.num_gts == 3
    assert ((result.gt_inds >= 0) & (result.gt_inds <= 3)).all()
    for i in range(1, 4):
        assert (result.gt_inds == i).sum().item() == k
    positive = result.gt_inds > 0
    assert torch.equal(result.labels[positive], gt.labels[result.gt_inds[positive] - 1])
    if k == 1:  # one repeat is one-to-one matching
        plain = HungarianAssigner(MATCH_COSTS).assign(pred, gt, img_meta=dict(img_shape=(64, 64)))
        assert torch.equal(result.gt_inds, plain.gt_inds)


def test_one_to_many_assigner_rejects_k_below_one():
    with pytest.raises(ValueError, match='k_one2many'):
        OneToManyAssigner(HungarianAssigner(MATCH_COSTS), 0)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_one_to_one_queries_are_unchanged_and_one_to_many_dropped_at_inference(variant):
    """Same weights with and without 20 one-to-many queries: the one-to-one
    losses and the predictions are equal (the mask hides the extra group),
    and the extra group adds its own losses for every layer."""
    hybrid = build(variant, **HYBRID)
    plain = build(variant)
    state = hybrid.state_dict()
    if variant != 'two_stage':
        assert state['query_embedding.weight'].shape == (40 + 20, 512)
        assert plain.state_dict()['query_embedding.weight'].shape == (40, 512)
        state['query_embedding.weight'] = state['query_embedding.weight'][:40]
    plain.load_state_dict(state, strict=True)
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    hybrid.train()
    plain.train()
    losses = hybrid.loss(inputs, [s.clone() for s in samples])
    expected = plain.loss(inputs, [s.clone() for s in samples])
    one2many = [name for name in losses if name.endswith('_one2many')]
    assert sorted(one2many) == sorted(
        f'{prefix}loss_{kind}_one2many' for prefix in ('', 'd0.') for kind in ('cls', 'bbox', 'iou')
    )
    assert set(losses) - set(one2many) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(losses[name], value, atol=1e-5), name
    for name in one2many:
        assert torch.isfinite(losses[name]) and losses[name].item() > 0, name
    sum(losses.values()).backward()
    if variant != 'two_stage':
        grad = hybrid.query_embedding.weight.grad
        assert grad[40:].abs().sum() > 0  # the one-to-many queries are trained

    hybrid.eval()
    plain.eval()
    with torch.no_grad():
        result = hybrid.predict(inputs, [s.clone() for s in samples])
        reference = plain.predict(inputs, [s.clone() for s in samples])
    for a, b in zip(result, reference):
        assert torch.allclose(a.pred_instances.scores, b.pred_instances.scores, atol=1e-6)
        assert torch.allclose(a.pred_instances.bboxes, b.pred_instances.bboxes, atol=1e-4)


def test_one_to_many_losses_scale_with_lambda_and_use_k_repeats():
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    losses = {}
    for weight in (1.0, 0.5):
        model = build('refine', **HYBRID, **{'model.lambda_one2many': weight})
        model.train()
        losses[weight] = model.loss(inputs, [s.clone() for s in samples])
    for name in ('loss_cls_one2many', 'd0.loss_bbox_one2many'):
        assert torch.allclose(losses[0.5][name], losses[1.0][name] * 0.5, atol=1e-6), name
    assert model.bbox_head.k_one2many == 2


@pytest.mark.parametrize(
    'config, options, message',
    [
        (
            'deformable_detr/refine_r50.py',
            {'model.num_queries_one2many': -1},
            'num_queries_one2many',
        ),
        ('deformable_detr/refine_r50.py', {'model.k_one2many': 0}, 'k_one2many'),
        (
            'deformable_detr/refine_r50.py',
            {'model.bbox_head.k_one2many': 3},
            'bbox_head.k_one2many',
        ),
        ('dino/dino_4scale_r50.py', {'model.num_queries_one2many': 10}, 'num_queries_one2many'),
    ],
)
def test_bad_hybrid_config_raises(config, options, message):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', config))
    cfg.merge_from_dict({**SMALL, **options})
    with pytest.raises(ValueError, match=message):
        MODELS.build(cfg.model)
