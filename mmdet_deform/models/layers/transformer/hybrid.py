"""Hybrid matching (H-DETR, Jia et al., arXiv 2207.13080): a second group of
decoder queries, trained with one-to-many matching, next to the usual
one-to-one queries. The two groups share every layer but do not attend to
each other, so the one-to-one queries (the only ones kept at inference)
behave as without the extra group."""

from typing import Optional

import torch
from torch import Tensor

__all__ = ['get_hybrid_attn_mask']


def get_hybrid_attn_mask(
    num_one2one: int, num_one2many: int, device: Optional[torch.device] = None
) -> Tensor:
    """Self-attention mask of one-to-one queries followed by one-to-many ones.

    Args:
        num_one2one (int): Number of one-to-one queries (first).
        num_one2many (int): Number of one-to-many queries (last).
        device (torch.device, optional): Device of the mask.

    Returns:
        Tensor: bool, True where a query (row) may *not* attend to a key
        (column): between the two groups. Has shape (n, n),
        ``n = num_one2one + num_one2many``.
    """
    group = torch.arange(num_one2one + num_one2many, device=device) >= num_one2one
    return group[:, None] != group[None, :]
