"""Test-time suppression of duplicate detections (opt-in, ``test_cfg.nms``).

A DETR's one-to-one matching teaches its queries not to detect an object
twice; after a short schedule they have not fully learnt it, and two queries
report the same object with the same label. :func:`suppress_duplicates`
removes those with Fast NMS (Bolya et al., YOLACT, ICCV 2019): a detection
is suppressed when a higher-scoring detection of the same label overlaps it
by more than a threshold. Unlike greedy NMS, a detection that is itself
suppressed still suppresses the ones below it, which makes it one matrix
operation (no loop over detections, no data-dependent shapes): it exports to
ONNX and ``torch.export`` as it is.
"""

from typing import Tuple

import torch
from mmdet.structures.bbox import bbox_overlaps
from torch import Tensor


def suppress_duplicates(
    bboxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """Zero the scores of duplicates and move them to the end.

    Args:
        bboxes (Tensor): (x1, y1, x2, y2), has shape (N, 4).
        scores (Tensor): Sorted in descending order, has shape (N,).
        labels (Tensor): Has shape (N,).
        iou_threshold (float): A detection whose IoU with a higher-scoring
            detection of its label exceeds this is a duplicate, in (0, 1).

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``bboxes``, ``scores`` and ``labels``
        of the same N detections, the duplicates' scores set to 0, sorted by
        score again (the kept ones keep their order, the duplicates follow
        in theirs).
    """
    if not 0 < iou_threshold < 1:
        raise ValueError(f'iou_threshold must be in (0, 1), got {iou_threshold}')
    ious = bbox_overlaps(bboxes, bboxes)  # (N, N)
    # entry (i, j): i scores higher than j (sorted) and has its label
    same_label = labels[:, None] == labels[None, :]
    higher = torch.ones_like(same_label).triu(diagonal=1)
    overlap = torch.where(same_label & higher, ious, ious.new_zeros(())).amax(dim=0)  # (N,)
    duplicate = overlap > iou_threshold
    # sort key without ties among the duplicates (their former order, below
    # every kept score), so that every runtime orders them alike
    position = torch.arange(1, len(scores) + 1, device=scores.device, dtype=scores.dtype)
    order = torch.where(duplicate, -position, scores).argsort(descending=True)
    scores = torch.where(duplicate, scores.new_zeros(()), scores)
    return bboxes[order], scores[order], labels[order]
