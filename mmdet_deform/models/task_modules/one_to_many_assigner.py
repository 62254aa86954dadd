"""One-to-many matching of H-DETR's hybrid queries (Jia et al., arXiv
2207.13080): every ground-truth object is repeated ``k`` times and the
repeats are matched one-to-one, so that each object gets up to ``k``
queries."""

from mmdet.models.task_modules import AssignResult
from mmengine.structures import InstanceData

__all__ = ['OneToManyAssigner']


class OneToManyAssigner:
    """Wrap a one-to-one assigner (e.g. ``HungarianAssigner``) into a
    one-to-many one.

    Args:
        assigner: A one-to-one assigner with mmdet's ``assign`` interface.
        k (int): Repeats of every ground-truth object (queries per object,
            at most).
    """

    def __init__(self, assigner, k: int) -> None:
        if k < 1:
            raise ValueError(f'k_one2many must be >= 1, got {k}')
        self.assigner = assigner
        self.k = k

    def assign(
        self, pred_instances: InstanceData, gt_instances: InstanceData, **kwargs
    ) -> AssignResult:
        """Assign every prediction to one object of ``gt_instances`` or to
        the background.

        Args:
            pred_instances (InstanceData): ``scores`` (num_preds, c) and
                ``bboxes`` (num_preds, 4).
            gt_instances (InstanceData): ``bboxes`` (num_gts, 4) and
                ``labels`` (num_gts,).
            **kwargs: Passed to the wrapped assigner (``img_meta``).

        Returns:
            AssignResult: ``gt_inds`` index the original ``gt_instances``
            (1-based, 0 for background); an object is assigned to up to
            ``k`` predictions.
        """
        num_gts = len(gt_instances)
        repeated = InstanceData(
            bboxes=gt_instances.bboxes.repeat(self.k, 1), labels=gt_instances.labels.repeat(self.k)
        )
        result = self.assigner.assign(
            pred_instances=pred_instances, gt_instances=repeated, **kwargs
        )
        gt_inds = result.gt_inds.clone()
        positive = gt_inds > 0
        # repeat r of object i is i + r * num_gts: back to i (1-based)
        gt_inds[positive] = (gt_inds[positive] - 1) % max(num_gts, 1) + 1
        return AssignResult(
            num_gts=num_gts, gt_inds=gt_inds, max_overlaps=result.max_overlaps, labels=result.labels
        )
