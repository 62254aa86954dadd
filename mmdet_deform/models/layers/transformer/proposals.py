"""Two-stage Deformable DETR: proposals from the encoder memory (paper,
appendix A.4).

Every encoder position becomes a proposal box centred on its cell, with a
size that doubles per level (0.05 * 2**level of the valid image). The head's
extra branches score the positions and regress deltas on these boxes; the
top-scoring boxes become the decoder's initial references, and a sine
embedding of them its queries.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .reference_points import get_valid_sizes

__all__ = ['get_encoder_proposals', 'get_proposal_pos_embed']


def get_encoder_proposals(
    memory_mask: Optional[Tensor],
    spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]],
    batch_size: int,
    device: torch.device,
) -> Tuple[Tensor, Tensor]:
    """Proposal boxes of every encoder position, in logit space.

    Args:
        memory_mask (Tensor, optional): True at padded positions, has shape
            (bs, num_feat_points); None when no image is padded.
        spatial_shapes (Tensor | Sequence[tuple[int, int]]): (h, w) of every
            level, a tensor of shape (num_levels, 2) or Python sizes (which
            keep the sizes symbolic under ``torch.export``).
        batch_size (int): Number of images.
        device (torch.device): Device of the result.

    Returns:
        tuple[Tensor, Tensor]:

        - proposals: inverse-sigmoid (cx, cy, w, h) of every position,
          float32, ``inf`` at invalid positions, has shape
          (bs, num_feat_points, 4).
        - invalid: True at padded positions and at proposals too close to
          the border (any coordinate outside (0.01, 0.99)), has shape
          (bs, num_feat_points, 1).
    """
    proposals = []
    start = 0
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    for level, (h, w) in enumerate(spatial_shapes):
        if memory_mask is not None:
            # (bs, h*w) -> (bs, h, w)
            mask = memory_mask[:, start : start + h * w].view(batch_size, h, w)
            scale = get_valid_sizes(mask).view(batch_size, 1, 1, 2)  # (valid_w, valid_h)
        else:
            scale = torch.tensor([w, h], device=device).view(1, 1, 1, 2)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing='ij',
        )
        grid = torch.stack([grid_x, grid_y], -1)  # (h, w, 2)
        # cell centres normalised by the valid size: (bs, h, w, 2)
        centre = (grid[None].expand(batch_size, -1, -1, -1) + 0.5) / scale
        size = torch.full_like(centre, 0.05 * (2.0**level))
        # (bs, h, w, 4) -> (bs, h*w, 4)
        proposals.append(torch.cat([centre, size], -1).view(batch_size, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)  # (bs, num_feat_points, 4)
    invalid = ~((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    if memory_mask is not None:
        invalid = invalid | memory_mask[..., None]
    proposals = torch.log(proposals / (1 - proposals))  # inverse sigmoid
    return proposals.masked_fill(invalid, float('inf')), invalid


def get_proposal_pos_embed(
    proposals: Tensor, num_pos_feats: int = 128, temperature: int = 10000
) -> Tensor:
    """Sine embedding of proposal boxes (the decoder's positional queries).

    Args:
        proposals (Tensor): Inverse-sigmoid (cx, cy, w, h) boxes, has shape
            (bs, num_queries, 4).
        num_pos_feats (int): Features per coordinate; the embedding has
            ``4 * num_pos_feats`` channels. Defaults to 128.
        temperature (int): Temperature of the frequencies. Defaults to 10000.

    Returns:
        Tensor: has shape (bs, num_queries, 4 * num_pos_feats), ordered
        (cx, cy, w, h), each as interleaved (sin, cos) pairs.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    # (bs, nq, 4) -> (bs, nq, 4, num_pos_feats)
    pos = (proposals.sigmoid() * (2 * math.pi))[..., None] / dim_t
    # (bs, nq, 4, F/2, 2) -> (bs, nq, 4*F)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)
