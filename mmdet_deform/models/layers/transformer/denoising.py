"""Contrastive denoising queries of DINO (Zhang et al., arXiv 2203.03605,
section 3.3).

In training, every ground-truth box is copied into ``num_groups`` groups of
two extra decoder queries each: a *positive* copy whose corners move by less
than ``box_noise_scale / 2`` of the box size (to be reconstructed) and a
*negative* copy whose corners move by between that and twice that (to be
classified as background). Some labels are replaced by random classes; a
label embedding is the content query, the noised box the reference.

Layout of the ``2 * max_num_target * num_groups`` denoising queries of every
image (images with fewer targets leave zero padding in their slots)::

    | group 0               | group 1               | ...
    | pos 0..M-1 | neg 0..M-1 | pos 0..M-1 | neg 0..M-1 | ...

They come before the matching queries; the self-attention mask keeps the
matching queries from seeing any denoising query (they would see the
answers) and every group from seeing the other groups.

The random numbers are drawn in a fixed order (label choice, new labels,
box noise signs, box noise magnitudes), the order of mmdet 3.3's
``CdnQueryGenerator``, so that one seed gives both the same queries.
"""

from typing import Dict, List, Optional, Tuple

import torch
from mmdet.models.layers import inverse_sigmoid
from mmdet.structures import SampleList
from mmdet.structures.bbox import bbox_xyxy_to_cxcywh
from mmdet.utils import OptConfigType
from mmengine.model import BaseModule
from torch import Tensor, nn

__all__ = ['CdnQueryGenerator', 'get_dn_attn_mask']


def get_dn_attn_mask(
    group_size: int,
    num_groups: int,
    num_matching_queries: int,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Self-attention mask of denoising groups followed by matching queries.

    Args:
        group_size (int): Queries per denoising group
            (``2 * max_num_target``).
        num_groups (int): Number of denoising groups.
        num_matching_queries (int): Number of matching queries (after the
            denoising ones).
        device (torch.device, optional): Device of the mask.

    Returns:
        Tensor: bool, True where a query (row) may *not* attend to a key
        (column), has shape (num_total, num_total) with
        ``num_total = group_size * num_groups + num_matching_queries``.
    """
    num_dn = group_size * num_groups
    num_total = num_dn + num_matching_queries
    # group id of every query; matching queries form group num_groups
    group = torch.arange(num_total, device=device) // max(group_size, 1)
    group[num_dn:] = num_groups
    # a denoising query sees its own group and the matching queries; a
    # matching query sees the matching queries only
    is_dn = group < num_groups
    sees = (group[:, None] == group[None, :]) | (is_dn[:, None] & ~is_dn[None, :])
    return ~sees


class CdnQueryGenerator(BaseModule):
    """Contrastive denoising (CDN) queries from the ground truth.

    Args:
        num_classes (int): Number of object classes (size of the label
            embedding). Set by the detector.
        embed_dims (int): Query dimension. Set by the detector.
        num_matching_queries (int): Matching queries after the denoising
            ones (for the attention mask). Set by the detector.
        label_noise_scale (float): Twice the fraction of labels replaced by
            a random class. Defaults to 0.5.
        box_noise_scale (float): Corner noise, as a fraction of the box size
            (times 2). Defaults to 1.0.
        group_cfg (dict, optional): ``dynamic=True`` with ``num_dn_queries``
            (groups: ``num_dn_queries // max_num_target``, at least 1, so
            the number of denoising queries stays about constant), or
            ``dynamic=False`` with ``num_groups``. Defaults to dynamic with
            100 queries.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dims: int,
        num_matching_queries: int,
        label_noise_scale: float = 0.5,
        box_noise_scale: float = 1.0,
        group_cfg: OptConfigType = None,
        init_cfg: OptConfigType = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if not 0 <= label_noise_scale <= 2:
            raise ValueError(f'dn_cfg.label_noise_scale must be in [0, 2], got {label_noise_scale}')
        if box_noise_scale < 0:
            raise ValueError(f'dn_cfg.box_noise_scale must be >= 0, got {box_noise_scale}')
        group_cfg = dict(dynamic=True, num_dn_queries=100) if group_cfg is None else group_cfg
        self.dynamic_dn_groups = group_cfg.get('dynamic', True)
        key = 'num_dn_queries' if self.dynamic_dn_groups else 'num_groups'
        value = group_cfg.get(key, 100 if self.dynamic_dn_groups else None)
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f'dn_cfg.group_cfg.{key} must be a positive int with '
                f'dynamic={self.dynamic_dn_groups}, got {value!r}'
            )
        self.num_dn_queries = value if self.dynamic_dn_groups else None
        self.num_groups = None if self.dynamic_dn_groups else value
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_matching_queries = num_matching_queries
        self.label_noise_scale = label_noise_scale
        self.box_noise_scale = box_noise_scale
        self.label_embedding = nn.Embedding(num_classes, embed_dims)

    def get_num_groups(self, max_num_target: int) -> int:
        """Number of denoising groups for a batch whose largest image has
        ``max_num_target`` objects (at least 1)."""
        if not self.dynamic_dn_groups:
            return self.num_groups
        if max_num_target == 0:
            return 1
        return max(self.num_dn_queries // max_num_target, 1)

    def forward(
        self, batch_data_samples: SampleList
    ) -> Tuple[Tensor, Tensor, Tensor, Dict[str, int]]:
        """Denoising queries of a batch.

        Args:
            batch_data_samples (list[DetDataSample]): With ``gt_instances``
                (``bboxes``: pixel x1, y1, x2, y2; ``labels``) and
                ``img_shape``.

        Returns:
            tuple:

            - dn_label_query (Tensor): Content queries, has shape
              (bs, num_dn, embed_dims), ``num_dn = 2 * max_num_target *
              num_groups``.
            - dn_bbox_query (Tensor): Inverse-sigmoid noised boxes
              (cx, cy, w, h), has shape (bs, num_dn, 4).
            - attn_mask (Tensor): bool, True where attention is blocked, has
              shape (num_dn + num_matching_queries,) * 2.
            - dn_meta (dict): ``num_denoising_queries`` and
              ``num_denoising_groups``.
        """
        labels_list: List[Tensor] = []
        boxes_list: List[Tensor] = []
        for sample in batch_data_samples:
            img_h, img_w = sample.img_shape[:2]
            boxes = sample.gt_instances.bboxes
            boxes_list.append(boxes / boxes.new_tensor([img_w, img_h, img_w, img_h]))
            labels_list.append(sample.gt_instances.labels)
        num_targets = [len(labels) for labels in labels_list]
        max_num_target = max(num_targets)
        num_groups = self.get_num_groups(max_num_target)
        num_copies = 2 * num_groups  # a positive and a negative copy per group
        labels = torch.cat(labels_list)  # (num_gts,)
        boxes = torch.cat(boxes_list)  # (num_gts, 4), normalised x1, y1, x2, y2

        # every copy of every target, copy-major: (num_copies * num_gts, ...)
        noisy_labels = self._noise_labels(labels.repeat(num_copies))
        noisy_boxes = self._noise_boxes(boxes.repeat(num_copies, 1), len(labels), num_groups)
        label_query = self.label_embedding(noisy_labels)
        bbox_query = inverse_sigmoid(bbox_xyxy_to_cxcywh(noisy_boxes), eps=1e-3)

        # scatter to (image, copy * max_num_target + index within the image)
        bs = len(batch_data_samples)
        device = label_query.device
        image_index = torch.cat(
            [
                torch.full((n,), i, dtype=torch.long, device=device)
                for i, n in enumerate(num_targets)
            ]
        )
        target_index = torch.cat([torch.arange(n, device=device) for n in num_targets])
        copy_offset = torch.arange(num_copies, device=device) * max_num_target
        rows = image_index.repeat(num_copies)
        cols = (copy_offset[:, None] + target_index[None]).flatten()
        num_dn = max_num_target * num_copies
        dn_label_query = label_query.new_zeros(bs, num_dn, self.embed_dims)
        dn_bbox_query = bbox_query.new_zeros(bs, num_dn, 4)
        dn_label_query[rows, cols] = label_query
        dn_bbox_query[rows, cols] = bbox_query

        attn_mask = get_dn_attn_mask(
            2 * max_num_target, num_groups, self.num_matching_queries, device=device
        )
        dn_meta = dict(num_denoising_queries=num_dn, num_denoising_groups=num_groups)
        return dn_label_query, dn_bbox_query, attn_mask, dn_meta

    def _noise_labels(self, labels: Tensor) -> Tensor:
        """Replace each label, with probability ``label_noise_scale / 2``, by
        a uniformly drawn class (possibly the same).

        Args:
            labels (Tensor): has shape (n,).

        Returns:
            Tensor: has shape (n,).
        """
        chosen = torch.rand_like(labels.float()) < self.label_noise_scale * 0.5
        chosen_index = torch.nonzero(chosen).view(-1)
        new_labels = torch.randint_like(chosen_index, 0, self.num_classes)
        return labels.scatter(0, chosen_index, new_labels)

    def _noise_boxes(self, boxes: Tensor, num_gts: int, num_groups: int) -> Tensor:
        """Move the corners of the positive copies by up to
        ``box_noise_scale / 2`` of the box's (w, h), those of the negative
        copies by between that and twice that, in a random direction.

        Args:
            boxes (Tensor): Normalised (x1, y1, x2, y2), copy-major (see
                the module docstring), has shape (2 * num_groups * num_gts, 4).
            num_gts (int): Targets in the batch.
            num_groups (int): Number of groups.

        Returns:
            Tensor: Noised boxes clamped to [0, 1], has shape as ``boxes``.
        """
        sign = torch.randint_like(boxes, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes)  # [0, 1)
        # copies 1, 3, 5, ... are negatives: magnitude in [1, 2)
        is_negative = torch.arange(2 * num_groups, device=boxes.device).repeat_interleave(num_gts)
        magnitude = magnitude + (is_negative % 2 == 1)[:, None].to(magnitude.dtype)
        size = bbox_xyxy_to_cxcywh(boxes)[:, 2:].repeat(1, 2)  # (w, h, w, h)
        noisy = boxes + magnitude * sign * size * (self.box_noise_scale / 2)
        return noisy.clamp(min=0.0, max=1.0)
