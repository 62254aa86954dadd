"""Contrastive denoising queries: the attention mask, the layout and noise
of the queries, and their loss targets."""

import pytest
import torch
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from mmengine.structures import InstanceData

from mmdet_deform.models import DINOHead
from mmdet_deform.models.layers import CdnQueryGenerator, get_dn_attn_mask


def _sample(boxes, labels, img_shape=(100, 200)):
    sample = DetDataSample(metainfo=dict(img_shape=img_shape))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor(boxes, dtype=torch.float64).view(-1, 4),
        labels=torch.tensor(labels, dtype=torch.long),
    )
    return sample


def test_dn_mask_blocks_exactly_other_groups_and_hides_denoising_from_matching():
    group_size, num_groups, num_matching = 4, 3, 5
    mask = get_dn_attn_mask(group_size, num_groups, num_matching)
    num_dn = group_size * num_groups
    assert mask.shape == (num_dn + num_matching,) * 2 and mask.dtype == torch.bool
    for q in range(num_dn + num_matching):
        for k in range(num_dn + num_matching):
            if q >= num_dn:  # matching query: sees only matching queries
                blocked = k < num_dn
            elif k >= num_dn:  # denoising query sees every matching query
                blocked = False
            else:  # and the queries of its own group only
                blocked = q // group_size != k // group_size
            assert mask[q, k].item() == blocked, (q, k)
    # nobody is blocked from attending to itself (no empty softmax rows)
    assert not mask.diagonal().any()


def test_dn_mask_without_denoising_queries_blocks_nothing():
    mask = get_dn_attn_mask(0, 1, 4)
    assert mask.shape == (4, 4) and not mask.any()


def test_generator_layout_padding_and_noise_bounds():
    """Image 0 has 3 objects, image 1 has 1: groups of 2 * 3 slots, image
    1's unused slots are zero; positive corners move by < scale/2 of the
    box size, negative ones by [scale/2, scale) (before clamping)."""
    torch.manual_seed(0)
    boxes0 = [[40.0, 20.0, 120.0, 60.0], [10.0, 10.0, 50.0, 90.0], [100.0, 30.0, 180.0, 70.0]]
    samples = [_sample(boxes0, [1, 2, 3]), _sample([[60.0, 40.0, 140.0, 80.0]], [4])]
    generator = CdnQueryGenerator(
        num_classes=5,
        embed_dims=8,
        num_matching_queries=7,
        label_noise_scale=0.0,
        box_noise_scale=0.5,
        group_cfg=dict(dynamic=False, num_groups=2),
    )
    label_query, bbox_query, mask, meta = generator(samples)
    assert meta == dict(num_denoising_queries=12, num_denoising_groups=2)
    assert label_query.shape == (2, 12, 8) and bbox_query.shape == (2, 12, 4)
    assert mask.shape == (19, 19)
    assert torch.equal(mask, get_dn_attn_mask(6, 2, 7))
    # no label noise: every slot holds its object's label embedding
    embedding = generator.label_embedding.weight
    for slot in (0, 3, 6, 9):  # positive and negative copies of object 0
        assert torch.equal(label_query[0, slot], embedding[1])
        assert torch.equal(label_query[1, slot], embedding[4])
    assert torch.equal(label_query[0, 2], embedding[3])
    for slot in (1, 2, 4, 5, 7, 8, 10, 11):  # image 1 has one object
        assert not label_query[1, slot].any()
        assert not bbox_query[1, slot].any()
    # corner offsets relative to the box size
    scale = torch.tensor([200.0, 100.0, 200.0, 100.0], dtype=torch.float64)
    gt = torch.tensor(boxes0, dtype=torch.float64) / scale
    size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
    noisy = bbox_cxcywh_to_xyxy(bbox_query[0].sigmoid()).view(2, 2, 3, 4)  # group, pos/neg
    for g in range(2):
        pos = (noisy[g, 0] - gt).abs() / size
        neg = (noisy[g, 1] - gt).abs() / size
        assert (pos < 0.25 + 1e-3).all()
        # where not clamped to the image
        unclamped = (noisy[g, 1] > 1e-3) & (noisy[g, 1] < 1 - 1e-3)
        assert (neg[unclamped] > 0.25 - 1e-3).all() and (neg < 0.5 + 1e-3).all()


def test_generator_label_noise_and_dynamic_groups():
    torch.manual_seed(0)
    samples = [_sample([[10.0, 10.0, 50.0, 50.0]] * 10, [0] * 10)]
    generator = CdnQueryGenerator(
        num_classes=50,
        embed_dims=4,
        num_matching_queries=3,
        label_noise_scale=1.0,
        group_cfg=dict(dynamic=True, num_dn_queries=35),
    )
    label_query, _, _, meta = generator(samples)
    assert meta['num_denoising_groups'] == 3  # 35 // 10
    same = (label_query[0] == generator.label_embedding.weight[0]).all(-1)
    # about half the labels were redrawn (each with 1/50 chance of being 0)
    assert 0.2 < same.float().mean().item() < 0.8


def test_generator_without_ground_truth():
    generator = CdnQueryGenerator(num_classes=3, embed_dims=4, num_matching_queries=5)
    label_query, bbox_query, mask, meta = generator([_sample([], []), _sample([], [])])
    assert label_query.shape == (2, 0, 4) and bbox_query.shape == (2, 0, 4)
    assert meta == dict(num_denoising_queries=0, num_denoising_groups=1)
    assert mask.shape == (5, 5) and not mask.any()


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(group_cfg=dict(dynamic=False)), 'num_groups'),
        (dict(group_cfg=dict(dynamic=True, num_dn_queries=0)), 'num_dn_queries'),
        (dict(label_noise_scale=-1.0), 'label_noise_scale'),
        (dict(box_noise_scale=-0.1), 'box_noise_scale'),
    ],
)
def test_generator_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CdnQueryGenerator(num_classes=3, embed_dims=4, num_matching_queries=5, **kwargs)


def test_dn_targets_and_exact_reconstruction_has_zero_box_loss():
    """Positives reconstruct their object, negatives and padding are
    background; predicting the ground truth exactly gives zero box losses."""
    head = DINOHead(
        num_classes=5,
        embed_dims=8,
        num_pred_layer=1,
        train_cfg=dict(
            assigner=dict(type='HungarianAssigner', match_costs=[dict(type='BBoxL1Cost')])
        ),
    )
    boxes = [[40.0, 20.0, 120.0, 60.0], [10.0, 10.0, 50.0, 90.0]]
    gts = [_sample(boxes, [1, 3]).gt_instances, _sample([boxes[0]], [2]).gt_instances]
    metas = [dict(img_shape=(100, 200))] * 2
    dn_meta = dict(num_denoising_queries=8, num_denoising_groups=2)  # 2 groups of 2 * 2
    labels, label_weights, targets, weights, num_pos = head.get_dn_targets(gts, metas, dn_meta)
    assert num_pos == 6
    assert labels.tolist() == [1, 3, 5, 5, 1, 3, 5, 5] + [2, 5, 5, 5, 2, 5, 5, 5]
    assert (label_weights == 1).all()
    assert weights[:, 0].tolist() == [1, 1, 0, 0, 1, 1, 0, 0] + [1, 0, 0, 0, 1, 0, 0, 0]
    assert torch.allclose(targets[0], torch.tensor([0.4, 0.4, 0.4, 0.4], dtype=torch.float64))
    # predictions equal to the targets (background boxes anywhere)
    bbox_preds = targets.clone().view(2, 8, 4)
    bbox_preds[weights.view(2, 8, 4) == 0] = 0.5
    cls_scores = torch.zeros(2, 8, 5, dtype=torch.float64)
    loss_cls, loss_bbox, loss_iou = head._loss_dn_single(
        cls_scores, bbox_preds, (labels, label_weights, targets, weights, num_pos), metas
    )
    assert loss_cls.item() > 0
    assert loss_bbox.item() == pytest.approx(0.0, abs=1e-12)
    assert loss_iou.item() == pytest.approx(0.0, abs=1e-6)
