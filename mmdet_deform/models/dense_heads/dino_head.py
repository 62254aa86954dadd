"""Head of DINO (Zhang et al., arXiv 2203.03605): Deformable DETR's head
with the losses of DINO's training switches.

* The decoder's queries are the denoising queries (if any) followed by the
  matching queries; ``dn_meta`` says how many come first.
* Matching queries: Hungarian-matched losses of every layer, as in
  Deformable DETR (``loss_*``, ``d{i}.loss_*``).
* Denoising queries (``dn_loss_*``, ``d{i}.dn_loss_*``): no matching, every
  positive query reconstructs the ground truth it was made from (focal loss
  to its class, L1 + GIoU to its box); every negative query is background.
* Encoder (``enc_loss_*``): the top-k proposals selected as queries, matched
  to the ground truth *with* its classes (Deformable DETR's two-stage loss is
  class-agnostic and over all positions).

Losses equal mmdet 3.3's ``DINOHead`` with the same parameters.
"""

from typing import Dict, List, Optional, Tuple

import torch
from mmdet.structures import SampleList
from mmdet.structures.bbox import bbox_xyxy_to_cxcywh
from mmdet.utils import InstanceList, OptInstanceList
from torch import Tensor

from mmdet_deform.registry import MODELS

from .deformable_detr_head import DeformableDETRHead

__all__ = ['DINOHead']


@MODELS.register_module()
class DINOHead(DeformableDETRHead):
    """Head of DINO; arguments as :class:`DeformableDETRHead`."""

    def loss(
        self,
        hidden_states: Tensor,
        references: List[Tensor],
        enc_outputs_class: Optional[Tensor],
        enc_outputs_coord: Optional[Tensor],
        batch_data_samples: SampleList,
        dn_meta: Optional[Dict[str, int]] = None,
    ) -> Dict[str, Tensor]:
        """Forward and compute the losses.

        Args:
            hidden_states (Tensor): Queries after every decoder layer, has
                shape (num_layers, bs, num_dn + num_queries, dim).
            references (list[Tensor]): The initial boxes followed by those
                after every layer, each (bs, num_dn + num_queries, 4).
            enc_outputs_class (Tensor, optional): Logits of the selected
                proposals, has shape (bs, num_queries, cls_out_channels).
            enc_outputs_coord (Tensor, optional): Their boxes, normalised
                (cx, cy, w, h), has shape (bs, num_queries, 4).
            batch_data_samples (list[DetDataSample]): With ``gt_instances``
                and metainfo.
            dn_meta (dict, optional): ``num_denoising_queries`` and
                ``num_denoising_groups``; None without denoising.

        Returns:
            dict[str, Tensor]: See :meth:`loss_by_feat`.
        """
        batch_gt_instances = [s.gt_instances for s in batch_data_samples]
        batch_img_metas = [s.metainfo for s in batch_data_samples]
        cls_scores, bbox_preds = self(hidden_states, references)
        return self.loss_by_feat(
            cls_scores,
            bbox_preds,
            enc_outputs_class,
            enc_outputs_coord,
            batch_gt_instances,
            batch_img_metas,
            dn_meta,
        )

    def loss_by_feat(
        self,
        all_layers_cls_scores: Tensor,
        all_layers_bbox_preds: Tensor,
        enc_cls_scores: Optional[Tensor],
        enc_bbox_preds: Optional[Tensor],
        batch_gt_instances: InstanceList,
        batch_img_metas: List[dict],
        dn_meta: Optional[Dict[str, int]] = None,
        batch_gt_instances_ignore: OptInstanceList = None,
    ) -> Dict[str, Tensor]:
        """Losses of the matching queries, the selected proposals and the
        denoising queries.

        Args:
            all_layers_cls_scores (Tensor): has shape
                (num_layers, bs, num_dn + num_queries, cls_out_channels).
            all_layers_bbox_preds (Tensor): has shape
                (num_layers, bs, num_dn + num_queries, 4).
            enc_cls_scores (Tensor, optional): has shape
                (bs, num_queries, cls_out_channels).
            enc_bbox_preds (Tensor, optional): has shape (bs, num_queries, 4).
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta information per image.
            dn_meta (dict, optional): See :meth:`loss`.
            batch_gt_instances_ignore (list, optional): Must be None.

        Returns:
            dict[str, Tensor]: ``loss_*`` and ``d{i}.loss_*`` (matching),
            ``enc_loss_*`` (proposals), ``dn_loss_*`` and ``d{i}.dn_loss_*``
            (denoising), each of cls, bbox, iou.
        """
        num_dn = 0 if dn_meta is None else dn_meta['num_denoising_queries']
        # (num_layers, bs, num_dn + nq, c): denoising queries come first
        losses = super().loss_by_feat(
            all_layers_cls_scores[:, :, num_dn:],
            all_layers_bbox_preds[:, :, num_dn:],
            None,
            None,
            batch_gt_instances,
            batch_img_metas,
            batch_gt_instances_ignore,
        )
        names = ('loss_cls', 'loss_bbox', 'loss_iou')
        if enc_cls_scores is not None:
            enc_losses = self.loss_by_feat_single(
                enc_cls_scores, enc_bbox_preds, batch_gt_instances, batch_img_metas
            )
            losses.update({f'enc_{name}': value for name, value in zip(names, enc_losses)})
        if dn_meta is not None:
            targets = self.get_dn_targets(batch_gt_instances, batch_img_metas, dn_meta)
            per_layer = [
                self._loss_dn_single(
                    cls_scores[:, :num_dn], bbox_preds[:, :num_dn], targets, batch_img_metas
                )
                for cls_scores, bbox_preds in zip(all_layers_cls_scores, all_layers_bbox_preds)
            ]
            losses.update({f'dn_{name}': value for name, value in zip(names, per_layer[-1])})
            for i, layer_losses in enumerate(per_layer[:-1]):
                losses.update(
                    {f'd{i}.dn_{name}': value for name, value in zip(names, layer_losses)}
                )
        return losses

    def _loss_dn_single(
        self, cls_scores: Tensor, bbox_preds: Tensor, targets: Tuple, batch_img_metas: List[dict]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Denoising losses of one layer (zero, in the graph, when the batch
        has no ground truth and so no denoising query)."""
        if cls_scores.shape[1] == 0:
            zero = cls_scores.sum() * 0.0 + bbox_preds.sum() * 0.0
            return zero, zero, zero
        return self.loss_from_targets(cls_scores, bbox_preds, *targets, batch_img_metas)

    def get_dn_targets(
        self,
        batch_gt_instances: InstanceList,
        batch_img_metas: List[dict],
        dn_meta: Dict[str, int],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Targets of the denoising queries (the same for every layer).

        The positive query ``t`` of group ``g`` sits at
        ``g * group_size + t`` and reconstructs target ``t``; the negatives
        (``+ group_size / 2``) and the padding slots are background.

        Args:
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta information per image.
            dn_meta (dict): ``num_denoising_queries`` and
                ``num_denoising_groups``.

        Returns:
            tuple: for all images concatenated (bs*num_dn first):
            ``labels``, ``label_weights``, ``bbox_targets`` (normalised cx,
            cy, w, h), ``bbox_weights`` and the number of positive queries.
        """
        num_dn = dn_meta['num_denoising_queries']
        num_groups = dn_meta['num_denoising_groups']
        group_size = num_dn // num_groups
        labels_list, label_weights_list, targets_list, weights_list = [], [], [], []
        num_pos = 0
        for gt, meta in zip(batch_gt_instances, batch_img_metas):
            gt_bboxes = gt.bboxes
            device = gt_bboxes.device
            num_gts = len(gt.labels)
            # (num_groups, 1) + (1, num_gts) -> (num_groups * num_gts,)
            pos_inds = (
                torch.arange(num_groups, device=device)[:, None] * group_size
                + torch.arange(num_gts, device=device)[None]
            ).flatten()
            labels = gt_bboxes.new_full((num_dn,), self.num_classes, dtype=torch.long)
            labels[pos_inds] = gt.labels.repeat(num_groups)
            img_h, img_w = meta['img_shape'][:2]
            factor = gt_bboxes.new_tensor([img_w, img_h, img_w, img_h])[None]
            bbox_targets = gt_bboxes.new_zeros(num_dn, 4)
            bbox_weights = gt_bboxes.new_zeros(num_dn, 4)
            bbox_targets[pos_inds] = bbox_xyxy_to_cxcywh(gt_bboxes / factor).repeat(num_groups, 1)
            bbox_weights[pos_inds] = 1.0
            labels_list.append(labels)
            label_weights_list.append(gt_bboxes.new_ones(num_dn))
            targets_list.append(bbox_targets)
            weights_list.append(bbox_weights)
            num_pos += pos_inds.numel()
        return (
            torch.cat(labels_list),
            torch.cat(label_weights_list),
            torch.cat(targets_list),
            torch.cat(weights_list),
            num_pos,
        )
