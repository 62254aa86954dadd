"""mmdet's Hungarian assigner, made safe for non-finite predictions."""

from typing import List

import torch
from mmdet.models.task_modules import HungarianAssigner
from torch import Tensor

from mmdet_deform.registry import TASK_UTILS

#: What a NaN or infinite matching cost becomes: worse than any real cost.
_BAD_COST = 1e6


class _FiniteCost:
    """A match cost whose NaN / inf entries are replaced by a large finite cost."""

    def __init__(self, cost) -> None:
        self.cost = cost

    def __call__(self, **kwargs) -> Tensor:
        cost = self.cost(**kwargs)
        return torch.nan_to_num(cost, nan=_BAD_COST, posinf=_BAD_COST, neginf=-_BAD_COST)

    def __repr__(self) -> str:
        return f'Finite({self.cost!r})'


@TASK_UTILS.register_module()
class SafeHungarianAssigner(HungarianAssigner):
    """``HungarianAssigner`` that matches even when predictions are not finite.

    mmdet's assigner hands the cost matrix to scipy's
    ``linear_sum_assignment``, which raises ``ValueError: matrix contains
    invalid numeric entries`` as soon as one prediction is NaN or infinite (a
    diverging step, a corrupt image): the run dies in the middle of the loss
    with an error that names neither the step nor the images. Here every
    match cost's NaN / inf entries count as a very bad (but finite) cost, so
    the assignment goes through, the loss comes out non-finite, and
    :class:`~mmdet_deform.engine.NonFiniteCheckHook` skips that step and logs
    it. With finite predictions the assignment equals mmdet's.

    Args:
        match_costs (list[dict] | dict): The match costs, as for mmdet's
            ``HungarianAssigner``.
    """

    def __init__(self, match_costs: List[dict]) -> None:
        super().__init__(match_costs)
        self.match_costs = [_FiniteCost(cost) for cost in self.match_costs]
