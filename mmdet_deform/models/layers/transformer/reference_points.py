"""Geometry shared by the encoder, the decoder and the head: padding masks of
every level, their valid sizes and ratios, the encoder's reference points,
and the refinement of references by predicted deltas.

A batch pads its images to one size (bottom/right). Every reference point is
normalised to the *valid* area of its own image, then scaled to each level's
padded map with the valid ratios, so that points land on the same image
content on every level. The constants are built in float32 (as in the
reference implementation), whatever the model's dtype.
"""

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmdet.models.layers import inverse_sigmoid
from torch import Tensor

__all__ = [
    'apply_box_deltas',
    'get_encoder_reference_points',
    'get_padding_masks',
    'get_valid_ratios',
    'get_valid_sizes',
]


def get_padding_masks(
    img_shapes: Sequence[Tuple[int, int]],
    batch_input_shape: Tuple[int, int],
    feat_shapes: Sequence[Tuple[int, int]],
    like: Tensor,
) -> List[Tensor]:
    """Padding masks of every feature level.

    Args:
        img_shapes (Sequence[tuple[int, int]]): (h, w) of every image before
            padding.
        batch_input_shape (tuple[int, int]): (h, w) of the padded batch.
        feat_shapes (Sequence[tuple[int, int]]): (h, w) of every level.
        like (Tensor): Gives the device and the float dtype used for the
            nearest-neighbour resize.

    Returns:
        list[Tensor]: One bool mask per level, True at padded positions, each
        of shape (bs, h_lvl, w_lvl).
    """
    input_h, input_w = batch_input_shape
    masks = like.new_ones((len(img_shapes), input_h, input_w))
    for i, (img_h, img_w) in enumerate(img_shapes):
        masks[i, :img_h, :img_w] = 0
    # (bs, H, W) -> (1, bs, H, W), resized to every level
    return [F.interpolate(masks[None], size=tuple(s)).to(torch.bool)[0] for s in feat_shapes]


def get_valid_sizes(mask: Tensor) -> Tensor:
    """Valid (unpadded) width and height of a level per image (images are
    padded bottom/right).

    Args:
        mask (Tensor): True at padded positions, has shape (bs, h, w).

    Returns:
        Tensor: (valid_w, valid_h), int64, has shape (bs, 2).
    """
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w, valid_h], -1)


def get_valid_ratios(mask: Tensor) -> Tensor:
    """Valid (unpadded) fraction of a level's width and height per image.

    Args:
        mask (Tensor): True at padded positions, has shape (bs, h, w).

    Returns:
        Tensor: (valid_w / w, valid_h / h), float32, has shape (bs, 2).
    """
    _, h, w = mask.shape
    valid = get_valid_sizes(mask).float()
    return torch.stack([valid[:, 0] / w, valid[:, 1] / h], -1)


def get_encoder_reference_points(
    spatial_shapes: Union[Tensor, Sequence[Tuple[int, int]]], valid_ratios: Tensor
) -> Tensor:
    """Reference points of the encoder: the centre of every feature-map cell,
    seen from every level.

    Args:
        spatial_shapes (Tensor | Sequence[tuple[int, int]]): (h, w) of every
            level, a tensor of shape (num_levels, 2) or Python sizes (which
            keep the sizes symbolic under ``torch.export``).
        valid_ratios (Tensor): Valid (w, h) fraction of every level, has
            shape (bs, num_levels, 2).

    Returns:
        Tensor: Normalised (x, y), has shape
        (bs, num_feat_points, num_levels, 2).
    """
    points = []
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    for level, (h, w) in enumerate(spatial_shapes):
        # cell centres 0.5 .. h - 0.5 (arange: no float arguments for torch.export to specialise)
        ys = torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5
        xs = torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')  # (h, w) each
        # normalise by the valid size of each image: (1, h*w) / (bs, 1) -> (bs, h*w)
        ref_y = grid_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = grid_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))  # (bs, h*w, 2)
    reference_points = torch.cat(points, 1)  # (bs, num_feat_points, 2)
    # (bs, n, 1, 2) * (bs, 1, num_levels, 2) -> (bs, n, num_levels, 2)
    return reference_points[:, :, None] * valid_ratios[:, None]


def apply_box_deltas(references: Tensor, deltas: Tensor, eps: float = 1e-5) -> Tensor:
    """Move references by deltas predicted in logit space.

    Args:
        references (Tensor): Normalised points (cx, cy), has shape
            (..., 2), or boxes (cx, cy, w, h), has shape (..., 4).
        deltas (Tensor): Predicted (cx, cy, w, h) deltas, has shape (..., 4).
        eps (float): Clamp of the inverse sigmoid of the references.
            Defaults to 1e-5.

    Returns:
        Tensor: Boxes (cx, cy, w, h) in logit space (apply ``sigmoid`` to
        normalise), has shape (..., 4). A point reference only moves the
        centre; (w, h) are then the deltas themselves.
    """
    if references.shape[-1] == 4:
        return deltas + inverse_sigmoid(references, eps)
    if references.shape[-1] == 2:
        centre = deltas[..., :2] + inverse_sigmoid(references, eps)
        return torch.cat([centre, deltas[..., 2:]], -1)
    raise ValueError(
        f'references must end in 2 (points) or 4 (boxes), got shape {tuple(references.shape)}'
    )
