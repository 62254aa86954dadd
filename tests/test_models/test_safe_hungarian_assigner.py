"""SafeHungarianAssigner: mmdet's matching for finite predictions, and a
matching (instead of scipy's ValueError) for non-finite ones."""

import pytest
import torch
from mmdet.models.task_modules import HungarianAssigner
from mmengine.structures import InstanceData

from mmdet_deform.models.task_modules import SafeHungarianAssigner

MATCH_COSTS = [
    dict(type='FocalLossCost', weight=2.0),
    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
    dict(type='IoUCost', iou_mode='giou', weight=2.0),
]
IMG_META = dict(img_shape=(64, 96))


def _instances(num_preds: int = 10, num_gts: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = InstanceData(
        scores=torch.randn(num_preds, 4, generator=g),
        bboxes=torch.rand(num_preds, 4, generator=g) * 0.5 + 0.1,  # normalised cxcywh
    )
    xy = torch.rand(num_gts, 2, generator=g) * 40
    gt = InstanceData(
        bboxes=torch.cat([xy, xy + 8 + torch.rand(num_gts, 2, generator=g) * 20], 1),  # pixels xyxy
        labels=torch.randint(0, 4, (num_gts,), generator=g),
    )
    return pred, gt


@pytest.mark.parametrize('seed', range(3))
def test_finite_predictions_match_as_mmdet(seed):
    pred, gt = _instances(seed=seed)
    ours = SafeHungarianAssigner(MATCH_COSTS).assign(pred, gt, img_meta=IMG_META)
    theirs = HungarianAssigner(MATCH_COSTS).assign(pred, gt, img_meta=IMG_META)
    assert torch.equal(ours.gt_inds, theirs.gt_inds)
    assert torch.equal(ours.labels, theirs.labels)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_predictions_still_match(bad):
    pred, gt = _instances()
    pred.scores[2:5] = bad
    pred.bboxes[0] = bad
    with pytest.raises(ValueError):  # mmdet's assigner: scipy refuses the cost matrix
        HungarianAssigner(MATCH_COSTS).assign(pred, gt, img_meta=IMG_META)
    result = SafeHungarianAssigner(MATCH_COSTS).assign(pred, gt, img_meta=IMG_META)
    matched = result.gt_inds[result.gt_inds > 0]
    assert sorted(matched.tolist()) == [1, 2, 3]  # every gt matched exactly once
    assert (result.gt_inds >= 0).all()
    assert torch.equal(result.labels[result.gt_inds > 0], gt.labels[matched - 1])
