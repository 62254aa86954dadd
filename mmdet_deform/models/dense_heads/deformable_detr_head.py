"""Head of Deformable DETR: per-layer classification and box branches, the
set-prediction loss and the post-processing.

* ``cls_branches[i]`` (one Linear) and ``reg_branches[i]`` (an MLP ending in
  4 outputs) read the queries of decoder layer ``i``; boxes are deltas in
  logit space on that layer's references. Without box refinement one branch
  pair is shared by every layer; with it, every layer has its own (and the
  decoder uses them to refine its references). In two-stage mode one more
  pair (the last) scores and regresses the encoder proposals.
* Loss: Hungarian matching (mmdet's ``HungarianAssigner`` and match costs)
  per image and layer, then sigmoid focal loss on all queries and L1 + GIoU on
  the matched ones, normalised by the number of ground-truth boxes; every
  decoder layer but the last adds ``d{i}.*`` auxiliary losses, two-stage adds
  class-agnostic ``enc_*`` losses on the proposals.
* Prediction: the top ``max_per_img`` (query, class) pairs of the last layer.

Losses and outputs equal mmdet 3.3's ``DeformableDETRHead``, with the same
parameter names.
"""

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmdet.registry import TASK_UTILS
from mmdet.structures import SampleList
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from mmdet.utils import InstanceList, OptConfigType, OptInstanceList, OptMultiConfig, reduce_mean
from mmengine.model import BaseModule, bias_init_with_prob
from mmengine.structures import InstanceData
from torch import Tensor, nn

from mmdet_deform.ops import at_least_float32
from mmdet_deform.registry import MODELS

from ..layers.duplicate_suppression import suppress_duplicates
from ..layers.transformer import apply_box_deltas
from ..task_modules import OneToManyAssigner

__all__ = ['DeformableDETRHead']

# Deformable DETR's settings (the paper's and mmdet's configs)
_DEFAULT_LOSS_CLS = dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)
_DEFAULT_LOSS_BBOX = dict(type='L1Loss', loss_weight=5.0)
_DEFAULT_LOSS_IOU = dict(type='GIoULoss', loss_weight=2.0)
_DEFAULT_TEST_CFG = dict(max_per_img=100)


@MODELS.register_module()
class DeformableDETRHead(BaseModule):
    """Head of Deformable DETR (Zhu et al., arXiv 2010.04159).

    Args:
        num_classes (int): Number of object classes (no background).
        embed_dims (int): Query dimension. Defaults to 256.
        num_reg_fcs (int): Hidden Linear+ReLU layers of every regression
            branch. Defaults to 2.
        sync_cls_avg_factor (bool): Average the classification normaliser
            over all ranks. Defaults to False.
        loss_cls (dict, optional): Classification loss. Defaults to sigmoid
            focal loss (gamma 2, alpha 0.25, weight 2).
        loss_bbox (dict, optional): L1 box loss on normalised
            (cx, cy, w, h). Defaults to weight 5.
        loss_iou (dict, optional): IoU loss on pixel (x1, y1, x2, y2) boxes.
            Defaults to GIoU, weight 2.
        train_cfg (dict, optional): Holds ``assigner`` (a one-to-one
            assigner); None for a head that only predicts. The detector
            passes its own ``train_cfg``.
        test_cfg (dict, optional): ``max_per_img``: detections kept per
            image. Defaults to 100. Optional ``nms=dict(iou_threshold=t)``
            (off unless given, as in mmdet): scores of same-label detections
            that overlap a higher-scoring one by IoU > t are set to 0 and
            moved to the end (Fast NMS,
            :func:`~mmdet_deform.models.layers.suppress_duplicates`).
        share_pred_layer (bool): One branch pair for all layers (no box
            refinement). Set by the detector. Defaults to False.
        num_pred_layer (int): Number of branch pairs: decoder layers, plus
            one in two-stage mode. Set by the detector. Defaults to 6.
        as_two_stage (bool): Whether the last branch pair scores encoder
            proposals. Set by the detector. Defaults to False.
        k_one2many (int): Hybrid matching: queries per ground-truth object
            for the one-to-many queries. Set by the detector. Defaults to 6.
        lambda_one2many (float): Hybrid matching: weight of the one-to-many
            losses. Set by the detector. Defaults to 1.0.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dims: int = 256,
        num_reg_fcs: int = 2,
        sync_cls_avg_factor: bool = False,
        loss_cls: OptConfigType = None,
        loss_bbox: OptConfigType = None,
        loss_iou: OptConfigType = None,
        train_cfg: OptConfigType = None,
        test_cfg: OptConfigType = None,
        share_pred_layer: bool = False,
        num_pred_layer: int = 6,
        as_two_stage: bool = False,
        k_one2many: int = 6,
        lambda_one2many: float = 1.0,
        init_cfg: OptMultiConfig = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if k_one2many < 1:
            raise ValueError(f'k_one2many must be >= 1, got {k_one2many}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        if num_pred_layer < 1:
            raise ValueError(f'num_pred_layer must be >= 1, got {num_pred_layer}')
        loss_cls = copy.deepcopy(_DEFAULT_LOSS_CLS) if loss_cls is None else loss_cls
        loss_bbox = copy.deepcopy(_DEFAULT_LOSS_BBOX) if loss_bbox is None else loss_bbox
        loss_iou = copy.deepcopy(_DEFAULT_LOSS_IOU) if loss_iou is None else loss_iou
        # train_cfg=None is a test-only head (no assigner), as in mmdet
        test_cfg = copy.deepcopy(_DEFAULT_TEST_CFG) if test_cfg is None else test_cfg
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.num_reg_fcs = num_reg_fcs
        self.sync_cls_avg_factor = sync_cls_avg_factor
        self.share_pred_layer = share_pred_layer
        self.num_pred_layer = num_pred_layer
        self.as_two_stage = as_two_stage
        self.k_one2many = k_one2many
        self.lambda_one2many = lambda_one2many
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg
        nms = test_cfg.get('nms')
        if nms is not None and (
            not isinstance(nms, dict)
            or set(nms) != {'iou_threshold'}
            or not 0 < nms['iou_threshold'] < 1
        ):
            raise ValueError(
                f'test_cfg.nms must be None or dict(iou_threshold=t) with t in (0, 1), got {nms}'
            )
        if train_cfg:
            if 'assigner' not in train_cfg:
                raise ValueError(f'train_cfg must hold an assigner, got {train_cfg}')
            if train_cfg.get('sampler') is not None:
                raise ValueError('train_cfg.sampler must be None: DETR matches one-to-one')
            self.assigner = TASK_UTILS.build(train_cfg['assigner'])
        self.loss_cls = MODELS.build(loss_cls)
        self.loss_bbox = MODELS.build(loss_bbox)
        self.loss_iou = MODELS.build(loss_iou)
        self.use_sigmoid = getattr(self.loss_cls, 'use_sigmoid', False)
        # softmax classification needs a background channel
        self.cls_out_channels = num_classes if self.use_sigmoid else num_classes + 1
        self._init_layers()

    def _init_layers(self) -> None:
        """Build ``cls_branches`` and ``reg_branches`` (shared or not)."""
        cls_branch = nn.Linear(self.embed_dims, self.cls_out_channels)
        reg_layers = []
        for _ in range(self.num_reg_fcs):
            reg_layers += [nn.Linear(self.embed_dims, self.embed_dims), nn.ReLU()]
        reg_layers.append(nn.Linear(self.embed_dims, 4))
        reg_branch = nn.Sequential(*reg_layers)
        if self.share_pred_layer:
            self.cls_branches = nn.ModuleList([cls_branch] * self.num_pred_layer)
            self.reg_branches = nn.ModuleList([reg_branch] * self.num_pred_layer)
        else:
            self.cls_branches = nn.ModuleList(
                [copy.deepcopy(cls_branch) for _ in range(self.num_pred_layer)]
            )
            self.reg_branches = nn.ModuleList(
                [copy.deepcopy(reg_branch) for _ in range(self.num_pred_layer)]
            )

    def init_weights(self) -> None:
        """Focal-loss prior (p = 0.01) on the class biases; box branches start
        at zero deltas, with (w, h) logits at -2 for the first decoder layer
        (0 everywhere in two-stage mode, whose references are boxes)."""
        super().init_weights()
        if self.use_sigmoid:
            bias = bias_init_with_prob(0.01)
            for branch in self.cls_branches:
                nn.init.constant_(branch.bias, bias)
        for branch in self.reg_branches:
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)
        with torch.no_grad():
            self.reg_branches[0][-1].bias[2:] = -2.0
            if self.as_two_stage:
                for branch in self.reg_branches:
                    branch[-1].bias[2:] = 0.0

    # ------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, references: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Class logits and boxes of every decoder layer.

        Args:
            hidden_states (Tensor): Queries after every decoder layer, has
                shape (num_layers, bs, num_queries, dim).
            references (list[Tensor]): The initial references followed by
                those after every layer (the last one is unused); each is
                (bs, num_queries, 2) for points or (bs, num_queries, 4) for
                boxes, normalised (cx, cy[, w, h]).

        Returns:
            tuple[Tensor, Tensor]:

            - all_layers_cls_scores: logits, has shape
              (num_layers, bs, num_queries, cls_out_channels).
            - all_layers_bbox_preds: normalised (cx, cy, w, h) boxes, has
              shape (num_layers, bs, num_queries, 4).
        """
        cls_scores = []
        bbox_preds = []
        for i in range(hidden_states.shape[0]):
            cls_score, bbox_pred = self._forward_layer(i, hidden_states[i], references[i])
            cls_scores.append(cls_score)
            bbox_preds.append(bbox_pred)
        return torch.stack(cls_scores), torch.stack(bbox_preds)

    def _forward_layer(self, index: int, query: Tensor, reference: Tensor) -> Tuple[Tensor, Tensor]:
        """Logits (bs, nq, cls_out_channels) and boxes (bs, nq, 4) of one layer
        from its queries (bs, nq, dim) and input references (bs, nq, 2 or 4)."""
        boxes = apply_box_deltas(reference, self.reg_branches[index](query))
        return self.cls_branches[index](query), boxes.sigmoid()

    # ------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------
    def loss(
        self,
        hidden_states: Tensor,
        references: List[Tensor],
        enc_outputs_class: Optional[Tensor],
        enc_outputs_coord: Optional[Tensor],
        batch_data_samples: SampleList,
        num_queries_one2many: int = 0,
    ) -> Dict[str, Tensor]:
        """Forward and compute the losses.

        Args:
            hidden_states (Tensor): Queries after every decoder layer, has
                shape (num_layers, bs, num_queries, dim); the last
                ``num_queries_one2many`` are hybrid one-to-many queries.
            references (list[Tensor]): See :meth:`forward`.
            enc_outputs_class (Tensor, optional): Two-stage proposal logits,
                has shape (bs, num_feat_points, cls_out_channels); None
                otherwise.
            enc_outputs_coord (Tensor, optional): Two-stage proposal boxes,
                normalised (cx, cy, w, h), has shape (bs, num_feat_points, 4).
            batch_data_samples (list[DetDataSample]): With ``gt_instances``
                and metainfo (``img_shape``).
            num_queries_one2many (int): Number of one-to-many queries (hybrid
                matching; 0 for none). Defaults to 0.

        Returns:
            dict[str, Tensor]: ``loss_cls``, ``loss_bbox``, ``loss_iou`` of the
            last layer, ``d{i}.*`` of the others, in two-stage mode
            ``enc_loss_*`` and with hybrid matching the same per layer for
            the one-to-many queries, ``*_one2many``.
        """
        batch_gt_instances = [s.gt_instances for s in batch_data_samples]
        batch_img_metas = [s.metainfo for s in batch_data_samples]
        cls_scores, bbox_preds = self(hidden_states, references)
        num_one2one = cls_scores.shape[2] - num_queries_one2many
        # (num_layers, bs, nq + n_o2m, c): the one-to-many queries come last
        losses = self.loss_by_feat(
            cls_scores[:, :, :num_one2one],
            bbox_preds[:, :, :num_one2one],
            enc_outputs_class,
            enc_outputs_coord,
            batch_gt_instances,
            batch_img_metas,
        )
        if num_queries_one2many > 0:
            losses.update(
                self.loss_one2many(
                    cls_scores[:, :, num_one2one:],
                    bbox_preds[:, :, num_one2one:],
                    batch_gt_instances,
                    batch_img_metas,
                )
            )
        return losses

    def loss_one2many(
        self,
        all_layers_cls_scores: Tensor,
        all_layers_bbox_preds: Tensor,
        batch_gt_instances: InstanceList,
        batch_img_metas: List[dict],
    ) -> Dict[str, Tensor]:
        """Hybrid matching losses of the one-to-many queries: every object
        repeated ``k_one2many`` times and matched one-to-one, weighted by
        ``lambda_one2many``.

        Args:
            all_layers_cls_scores (Tensor): has shape
                (num_layers, bs, num_queries_one2many, cls_out_channels).
            all_layers_bbox_preds (Tensor): has shape
                (num_layers, bs, num_queries_one2many, 4).
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta information per image.

        Returns:
            dict[str, Tensor]: ``loss_cls_one2many`` ... of the last layer and
            ``d{i}.loss_*_one2many`` of the others.
        """
        assigner = OneToManyAssigner(self._one_to_one_assigner(), self.k_one2many)
        names = ('loss_cls', 'loss_bbox', 'loss_iou')
        losses = {}
        num_layers = all_layers_cls_scores.shape[0]
        for i, (cls_scores, bbox_preds) in enumerate(
            zip(all_layers_cls_scores, all_layers_bbox_preds)
        ):
            targets = self.get_targets(
                cls_scores, bbox_preds, batch_gt_instances, batch_img_metas, assigner
            )
            layer_losses = self.loss_from_targets(cls_scores, bbox_preds, *targets, batch_img_metas)
            prefix = '' if i == num_layers - 1 else f'd{i}.'
            for name, value in zip(names, layer_losses):
                losses[f'{prefix}{name}_one2many'] = value * self.lambda_one2many
        return losses

    def loss_by_feat(
        self,
        all_layers_cls_scores: Tensor,
        all_layers_bbox_preds: Tensor,
        enc_cls_scores: Optional[Tensor],
        enc_bbox_preds: Optional[Tensor],
        batch_gt_instances: InstanceList,
        batch_img_metas: List[dict],
        batch_gt_instances_ignore: OptInstanceList = None,
    ) -> Dict[str, Tensor]:
        """Losses of every decoder layer and of the two-stage proposals.

        Args:
            all_layers_cls_scores (Tensor): has shape
                (num_layers, bs, num_queries, cls_out_channels).
            all_layers_bbox_preds (Tensor): Normalised (cx, cy, w, h), has
                shape (num_layers, bs, num_queries, 4).
            enc_cls_scores (Tensor, optional): has shape
                (bs, num_feat_points, cls_out_channels).
            enc_bbox_preds (Tensor, optional): has shape
                (bs, num_feat_points, 4).
            batch_gt_instances (list[InstanceData]): ``bboxes`` (pixel
                x1, y1, x2, y2) and ``labels`` of every image.
            batch_img_metas (list[dict]): Meta information of every image.
            batch_gt_instances_ignore (list, optional): Must be None.

        Returns:
            dict[str, Tensor]: The losses (see :meth:`loss`).
        """
        if batch_gt_instances_ignore is not None:
            raise ValueError('batch_gt_instances_ignore is not supported by DETR heads')
        names = ('loss_cls', 'loss_bbox', 'loss_iou')
        per_layer = [
            self.loss_by_feat_single(cls_scores, bbox_preds, batch_gt_instances, batch_img_metas)
            for cls_scores, bbox_preds in zip(all_layers_cls_scores, all_layers_bbox_preds)
        ]
        # the last layer's losses, then the auxiliary ones of the other layers
        losses = dict(zip(names, per_layer[-1]))
        for i, layer_losses in enumerate(per_layer[:-1]):
            losses.update({f'd{i}.{name}': value for name, value in zip(names, layer_losses)})
        if enc_cls_scores is not None:
            # proposals are class-agnostic: every object is class 0
            proposal_gt_instances = [
                InstanceData(bboxes=gt.bboxes, labels=torch.zeros_like(gt.labels))
                for gt in batch_gt_instances
            ]
            enc_losses = self.loss_by_feat_single(
                enc_cls_scores, enc_bbox_preds, proposal_gt_instances, batch_img_metas
            )
            for name, value in zip(names, enc_losses):
                losses[f'enc_{name}'] = value
        return losses

    def loss_by_feat_single(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        batch_gt_instances: InstanceList,
        batch_img_metas: List[dict],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Classification, L1 and IoU losses of one set of predictions.

        Args:
            cls_scores (Tensor): Logits, has shape (bs, num_queries,
                cls_out_channels).
            bbox_preds (Tensor): Normalised (cx, cy, w, h), has shape
                (bs, num_queries, 4).
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta information per image.

        Returns:
            tuple[Tensor, Tensor, Tensor]: ``loss_cls``, ``loss_bbox``,
            ``loss_iou``.
        """
        targets = self.get_targets(cls_scores, bbox_preds, batch_gt_instances, batch_img_metas)
        return self.loss_from_targets(cls_scores, bbox_preds, *targets, batch_img_metas)

    def loss_from_targets(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        labels: Tensor,
        label_weights: Tensor,
        bbox_targets: Tensor,
        bbox_weights: Tensor,
        num_pos: int,
        batch_img_metas: List[dict],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Classification, L1 and IoU losses of predictions with known
        targets (see :meth:`get_targets`), normalised by ``num_pos``.

        Args:
            cls_scores (Tensor): Logits, has shape (bs, num_queries,
                cls_out_channels).
            bbox_preds (Tensor): Normalised (cx, cy, w, h), has shape
                (bs, num_queries, 4).
            labels (Tensor): has shape (bs*num_queries,).
            label_weights (Tensor): has shape (bs*num_queries,).
            bbox_targets (Tensor): has shape (bs*num_queries, 4).
            bbox_weights (Tensor): has shape (bs*num_queries, 4).
            num_pos (int): Number of positive queries.
            batch_img_metas (list[dict]): Meta information per image.

        Returns:
            tuple[Tensor, Tensor, Tensor]: ``loss_cls``, ``loss_bbox``,
            ``loss_iou``.
        """
        # (bs, nq, c) -> (bs*nq, c)
        cls_scores = cls_scores.reshape(-1, self.cls_out_channels)
        cls_avg_factor = cls_scores.new_tensor([float(num_pos)])
        if self.sync_cls_avg_factor:
            cls_avg_factor = reduce_mean(cls_avg_factor)
        cls_avg_factor = max(cls_avg_factor.item(), 1.0)
        loss_cls = self.loss_cls(cls_scores, labels, label_weights, avg_factor=cls_avg_factor)

        # boxes are normalised: the number of boxes, averaged over ranks
        num_boxes = reduce_mean(cls_scores.new_tensor([float(num_pos)]))
        num_boxes = max(num_boxes.item(), 1.0)
        # the IoU loss works on pixel boxes: (w, h, w, h) of each image
        img_sizes = [meta['img_shape'][:2] for meta in batch_img_metas]
        factors = bbox_preds.new_tensor([[w, h, w, h] for h, w in img_sizes])
        # (bs, 4) -> (bs*nq, 4)
        factors = factors.repeat_interleave(bbox_preds.shape[1], 0)
        bbox_preds = bbox_preds.reshape(-1, 4)  # (bs, nq, 4) -> (bs*nq, 4)
        pred_boxes = bbox_cxcywh_to_xyxy(bbox_preds) * factors
        target_boxes = bbox_cxcywh_to_xyxy(bbox_targets) * factors
        loss_iou = self.loss_iou(pred_boxes, target_boxes, bbox_weights, avg_factor=num_boxes)
        loss_bbox = self.loss_bbox(bbox_preds, bbox_targets, bbox_weights, avg_factor=num_boxes)
        return loss_cls, loss_bbox, loss_iou

    def get_targets(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        batch_gt_instances: InstanceList,
        batch_img_metas: List[dict],
        assigner=None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Match predictions to ground truth, image by image.

        Args:
            cls_scores (Tensor): has shape (bs, num_queries, cls_out_channels).
            bbox_preds (Tensor): has shape (bs, num_queries, 4).
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta information per image.
            assigner (optional): The assigner; defaults to the one of
                ``train_cfg``.

        Returns:
            tuple: for all images concatenated (bs*num_queries first):
            ``labels`` (background = ``num_classes``), ``label_weights``,
            ``bbox_targets`` (normalised cx, cy, w, h), ``bbox_weights`` (1 on
            matched queries) and the number of matched queries.
        """
        assigner = self._one_to_one_assigner() if assigner is None else assigner
        targets = [
            self._get_targets_single(cls_score, bbox_pred, gt, meta, assigner)
            for cls_score, bbox_pred, gt, meta in zip(
                cls_scores, bbox_preds, batch_gt_instances, batch_img_metas
            )
        ]
        labels, label_weights, bbox_targets, bbox_weights, num_pos = zip(*targets)
        return (
            torch.cat(labels),
            torch.cat(label_weights),
            torch.cat(bbox_targets),
            torch.cat(bbox_weights),
            sum(num_pos),
        )

    def _one_to_one_assigner(self):
        """The assigner of ``train_cfg``."""
        if not hasattr(self, 'assigner'):
            raise RuntimeError(
                'the head was built without train_cfg.assigner; it cannot compute losses'
            )
        return self.assigner

    def _get_targets_single(
        self,
        cls_score: Tensor,
        bbox_pred: Tensor,
        gt_instances: InstanceData,
        img_meta: dict,
        assigner,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Targets of one image.

        Args:
            cls_score (Tensor): has shape (num_queries, cls_out_channels).
            bbox_pred (Tensor): Normalised (cx, cy, w, h), has shape
                (num_queries, 4).
            gt_instances (InstanceData): ``bboxes`` (num_gts, 4) in pixels
                (x1, y1, x2, y2) and ``labels`` (num_gts,).
            img_meta (dict): With ``img_shape``.
            assigner: The assigner.

        Returns:
            tuple: labels (num_queries,), label weights (num_queries,), box
            targets (num_queries, 4), box weights (num_queries, 4) and the
            number of matched queries.
        """
        img_h, img_w = img_meta['img_shape']
        factor = bbox_pred.new_tensor([img_w, img_h, img_w, img_h])[None]
        num_queries = bbox_pred.shape[0]
        pred_instances = InstanceData(
            scores=cls_score, bboxes=bbox_cxcywh_to_xyxy(bbox_pred) * factor
        )
        assign_result = assigner.assign(
            pred_instances=pred_instances, gt_instances=gt_instances, img_meta=img_meta
        )
        gt_bboxes = gt_instances.bboxes
        pos_inds = torch.nonzero(assign_result.gt_inds > 0).squeeze(-1).unique()
        pos_gt_inds = assign_result.gt_inds[pos_inds] - 1

        labels = gt_bboxes.new_full((num_queries,), self.num_classes, dtype=torch.long)
        labels[pos_inds] = gt_instances.labels[pos_gt_inds]
        label_weights = gt_bboxes.new_ones(num_queries)
        bbox_targets = torch.zeros_like(bbox_pred, dtype=gt_bboxes.dtype)
        bbox_weights = torch.zeros_like(bbox_pred, dtype=gt_bboxes.dtype)
        bbox_weights[pos_inds] = 1.0
        bbox_targets[pos_inds] = bbox_xyxy_to_cxcywh(gt_bboxes[pos_gt_inds] / factor)
        return labels, label_weights, bbox_targets, bbox_weights, pos_inds.numel()

    # ------------------------------------------------------------------
    # predict
    # ------------------------------------------------------------------
    def predict(
        self,
        hidden_states: Tensor,
        references: List[Tensor],
        batch_data_samples: SampleList,
        rescale: bool = True,
    ) -> InstanceList:
        """Detections of every image from the last decoder layer.

        Args:
            hidden_states (Tensor): has shape (num_layers, bs, num_queries, dim).
            references (list[Tensor]): See :meth:`forward`.
            batch_data_samples (list[DetDataSample]): With metainfo
                (``img_shape`` and, to rescale, ``scale_factor``).
            rescale (bool): Map boxes back to the original image size.
                Defaults to True.

        Returns:
            list[InstanceData]: ``scores``, ``labels`` and ``bboxes`` (pixel
            x1, y1, x2, y2) of every image.
        """
        batch_img_metas = [s.metainfo for s in batch_data_samples]
        last = hidden_states.shape[0] - 1  # only the last layer is needed
        cls_scores, bbox_preds = self._forward_layer(last, hidden_states[last], references[last])
        return self.predict_by_feat(
            cls_scores[None], bbox_preds[None], batch_img_metas=batch_img_metas, rescale=rescale
        )

    def predict_by_feat(
        self,
        all_layers_cls_scores: Tensor,
        all_layers_bbox_preds: Tensor,
        batch_img_metas: List[dict],
        rescale: bool = False,
    ) -> InstanceList:
        """Detections of every image from the last layer's outputs.

        Args:
            all_layers_cls_scores (Tensor): has shape
                (num_layers, bs, num_queries, cls_out_channels).
            all_layers_bbox_preds (Tensor): has shape
                (num_layers, bs, num_queries, 4).
            batch_img_metas (list[dict]): Meta information per image.
            rescale (bool): Map boxes back to the original image size.
                Defaults to False.

        Returns:
            list[InstanceData]: Detections of every image.
        """
        cls_scores = all_layers_cls_scores[-1]
        bbox_preds = all_layers_bbox_preds[-1]
        return [
            self._predict_by_feat_single(cls_score, bbox_pred, meta, rescale)
            for cls_score, bbox_pred, meta in zip(cls_scores, bbox_preds, batch_img_metas)
        ]

    def _predict_by_feat_single(
        self, cls_score: Tensor, bbox_pred: Tensor, img_meta: dict, rescale: bool = True
    ) -> InstanceData:
        """Top-scoring detections of one image.

        Args:
            cls_score (Tensor): Logits, has shape (num_queries, cls_out_channels).
            bbox_pred (Tensor): Normalised (cx, cy, w, h), has shape
                (num_queries, 4).
            img_meta (dict): With ``img_shape`` and, to rescale,
                ``scale_factor``.
            rescale (bool): Map boxes back to the original image size.

        Returns:
            InstanceData: ``scores`` (k,), ``labels`` (k,) and ``bboxes``
            (k, 4), k = ``max_per_img``.
        """
        max_per_img = self.test_cfg.get('max_per_img', len(cls_score))
        img_h, img_w = img_meta['img_shape'][:2]
        # at least float32 results under any autocast: a bf16 box coordinate of
        # ~600 px is off by up to 2 px, and metrics convert scores with numpy
        # (no bf16); float64 models keep float64
        cls_score, bbox_pred = at_least_float32((cls_score, bbox_pred))
        if self.use_sigmoid:
            # top-k over every (query, class) pair: a query may give several
            scores, indexes = cls_score.sigmoid().view(-1).topk(max_per_img)
            labels = indexes % self.num_classes
            bbox_pred = bbox_pred[indexes // self.num_classes]
        else:
            scores, labels = F.softmax(cls_score, dim=-1)[..., :-1].max(-1)
            scores, query_index = scores.topk(max_per_img)
            bbox_pred = bbox_pred[query_index]
            labels = labels[query_index]
        bboxes = bbox_cxcywh_to_xyxy(bbox_pred)
        bboxes[:, 0::2] = (bboxes[:, 0::2] * img_w).clamp(min=0, max=img_w)
        bboxes[:, 1::2] = (bboxes[:, 1::2] * img_h).clamp(min=0, max=img_h)
        nms = self.test_cfg.get('nms')
        if nms is not None:
            bboxes, scores, labels = suppress_duplicates(
                bboxes, scores, labels, nms['iou_threshold']
            )
        if rescale:
            if img_meta.get('scale_factor') is None:
                raise ValueError('rescale=True needs scale_factor in the image metainfo')
            bboxes /= bboxes.new_tensor(img_meta['scale_factor']).repeat((1, 2))
        results = InstanceData()
        results.bboxes = bboxes
        results.scores = scores
        results.labels = labels
        return results
