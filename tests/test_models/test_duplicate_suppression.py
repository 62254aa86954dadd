"""test_cfg.nms: Fast NMS of same-label duplicates, off unless configured,
checked at build time, exported with the head."""

import pytest
import torch
from mmdet.structures.bbox import bbox_overlaps
from mmengine.registry import init_default_scope

from mmdet_deform.models.layers import suppress_duplicates
from mmdet_deform.registry import MODELS

from .parity_utils import make_batch
from .test_deformable_detr import small_model_cfg


def test_same_label_overlaps_are_zeroed_and_moved_last():
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 9]],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 1, 2, 1, 1])
    out_boxes, out_scores, out_labels = suppress_duplicates(boxes, scores, labels, 0.6)
    # kept: 0 (best), 2 (other label), 3 (no overlap); then the duplicates 1 and 4
    order = [0, 2, 3, 1, 4]
    assert torch.equal(out_boxes, boxes[order]) and torch.equal(out_labels, labels[order])
    assert torch.equal(out_scores, torch.tensor([0.9, 0.7, 0.6, 0.0, 0.0]))


def test_a_suppressed_detection_still_suppresses():
    """Fast NMS: B (suppressed by A) suppresses C although A and C overlap
    little; greedy NMS would keep C."""
    boxes = torch.tensor([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], dtype=torch.float32)
    ious = bbox_overlaps(boxes, boxes)
    assert ious[0, 1] > 0.5 and ious[1, 2] > 0.5 and ious[0, 2] < 0.5
    _, scores, _ = suppress_duplicates(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3), 0.5)
    assert torch.equal(scores, torch.tensor([0.9, 0.0, 0.0]))


@pytest.mark.parametrize('threshold', [0.0, 1.0, -0.5])
def test_threshold_outside_the_open_interval_is_refused(threshold):
    boxes = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r'iou_threshold must be in \(0, 1\)'):
        suppress_duplicates(boxes, torch.ones(2), torch.zeros(2), threshold)


@pytest.mark.parametrize('nms', [0.6, dict(iou_threshold=1.5), dict(iou_thr=0.6)])
def test_head_refuses_a_bad_nms_config(nms):
    init_default_scope('mmdet_deform')
    cfg = small_model_cfg('two_stage')
    cfg.test_cfg = dict(max_per_img=30, nms=nms)
    with pytest.raises(ValueError, match=r'test_cfg.nms must be None or dict\(iou_threshold=t\)'):
        MODELS.build(cfg)


def test_predict_with_nms_keeps_no_same_label_overlap():
    init_default_scope('mmdet_deform')
    torch.manual_seed(0)
    cfg = small_model_cfg('two_stage')
    plain = MODELS.build(cfg)
    plain.init_weights()
    cfg.test_cfg = dict(max_per_img=30, nms=dict(iou_threshold=0.3))
    with_nms = MODELS.build(cfg)
    with_nms.load_state_dict(plain.state_dict())
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    with torch.no_grad():
        expected = plain.eval().predict(inputs, [s.clone() for s in samples], rescale=False)
        results = with_nms.eval().predict(inputs, [s.clone() for s in samples], rescale=False)
    for result, exp in zip(results, expected):
        pred, ref = result.pred_instances, exp.pred_instances
        assert len(pred) == len(ref) == 30
        kept = pred.scores > 0
        assert 0 < kept.sum() < 30  # random weights: many overlapping duplicates
        boxes, labels = pred.bboxes[kept], pred.labels[kept]
        ious = bbox_overlaps(boxes, boxes).triu(diagonal=1)
        assert not ((ious > 0.3) & (labels[:, None] == labels[None, :])).any()
        # the kept detections are detections of the plain head, in its order
        assert torch.all(pred.scores[:-1] >= pred.scores[1:])
        for box, score, label in zip(boxes, pred.scores[kept], labels):
            same = (ref.scores == score) & (ref.labels == label)
            assert (ref.bboxes[same] == box).all(dim=1).any()
