"""Deformable DETR (Zhu et al., arXiv 2010.04159): plain, with iterative box
refinement, and two-stage.

The steps follow mmdet's generic :class:`DetectionTransformer`:
``pre_transformer`` (flatten the neck's levels, padding masks, positional
and level embeddings, valid ratios, encoder reference points) ->
``forward_encoder`` -> ``pre_decoder`` (learnt queries and reference points,
or, two-stage, the top-scoring encoder proposals) -> ``forward_decoder``;
the head turns the decoder's queries into losses or detections.

Parameter names equal mmdet 3.3's ``DeformableDETR``, so its checkpoints
load with ``strict=True``.
"""

import copy
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from mmdet.models.detectors.base_detr import DetectionTransformer
from mmdet.models.layers import SinePositionalEncoding
from mmdet.structures import OptSampleList
from mmdet.utils import ConfigType, OptConfigType, OptMultiConfig
from mmengine.model import xavier_init
from torch import Tensor, nn

from mmdet_deform.ops import MultiScaleDeformableAttention
from mmdet_deform.registry import MODELS

from ..layers.transformer import (
    DeformableDetrTransformerDecoder,
    DeformableDetrTransformerEncoder,
    get_encoder_proposals,
    get_encoder_reference_points,
    get_hybrid_attn_mask,
    get_padding_masks,
    get_proposal_pos_embed,
    get_valid_ratios,
)

__all__ = ['DeformableDETR']


@MODELS.register_module()
class DeformableDETR(DetectionTransformer):
    """Deformable DETR detector.

    Args:
        backbone (dict): Backbone config.
        neck (dict, optional): Neck config; must output
            ``num_feature_levels`` maps of ``embed_dims`` channels.
        encoder (dict): :class:`DeformableDetrTransformerEncoder` arguments.
        decoder (dict): :class:`DeformableDetrTransformerDecoder` arguments.
        bbox_head (dict): Head config. ``share_pred_layer``,
            ``num_pred_layer`` and ``as_two_stage`` are set here and must not
            be given.
        positional_encoding (dict): mmdet ``SinePositionalEncoding``
            arguments; ``num_feats * 2`` must equal ``embed_dims``.
        num_queries (int): Number of decoder queries (two-stage: proposals
            kept). Defaults to 100.
        with_box_refine (bool): Refine the references after every decoder
            layer, with one head branch pair per layer. Defaults to False.
        as_two_stage (bool): Initialise the decoder from the encoder's
            top-scoring proposals instead of learnt queries. Defaults to
            False.
        num_feature_levels (int): Number of feature levels. Defaults to 4.
        look_forward_twice (bool): With ``with_box_refine``, predict every
            layer's boxes from the previous layer's refined boxes *with* their
            gradient (DINO, section 3.5); the next layer still gets them
            detached. Defaults to False.
        dn_cfg (dict, optional): Must be None: contrastive denoising needs
            DINO's decoder (``type='mmdet_deform.DINO'``). Defaults to None.
        num_queries_one2many (int): Hybrid matching (H-DETR): extra decoder
            queries trained with one-to-many matching, hidden from the
            ``num_queries`` one-to-one queries in self-attention and dropped
            at inference (learnt queries: that many more embeddings;
            two-stage: that many more proposals). 0 turns it off. Defaults
            to 0.
        k_one2many (int): Hybrid matching: every ground-truth object is
            repeated ``k_one2many`` times for the one-to-many queries.
            Defaults to 6.
        lambda_one2many (float): Hybrid matching: weight of the one-to-many
            losses. Defaults to 1.0.
        channels_last (bool): Run the backbone and neck on channels-last
            (NHWC) images and weights, the layout oneDNN/cuDNN convolutions
            prefer (no layout reorder in every convolution). Defaults to True.
        train_cfg (dict, optional): Training config of the head.
        test_cfg (dict, optional): Testing config of the head.
        data_preprocessor (dict, optional): Data preprocessor config.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(
        self,
        backbone: ConfigType,
        neck: OptConfigType = None,
        encoder: OptConfigType = None,
        decoder: OptConfigType = None,
        bbox_head: OptConfigType = None,
        positional_encoding: OptConfigType = None,
        num_queries: int = 100,
        with_box_refine: bool = False,
        as_two_stage: bool = False,
        num_feature_levels: int = 4,
        look_forward_twice: bool = False,
        dn_cfg: OptConfigType = None,
        num_queries_one2many: int = 0,
        k_one2many: int = 6,
        lambda_one2many: float = 1.0,
        channels_last: bool = True,
        train_cfg: OptConfigType = None,
        test_cfg: OptConfigType = None,
        data_preprocessor: OptConfigType = None,
        init_cfg: OptMultiConfig = None,
    ) -> None:
        for name, cfg in (
            ('encoder', encoder),
            ('decoder', decoder),
            ('bbox_head', bbox_head),
            ('positional_encoding', positional_encoding),
        ):
            if cfg is None:
                raise ValueError(f'{name} config is required')
        if dn_cfg is not None:
            raise ValueError(
                f"dn_cfg (contrastive denoising) needs DINO's decoder, not {type(self).__name__}: "
                "use type='mmdet_deform.DINO' (configs/dino/)"
            )
        if look_forward_twice and not with_box_refine:
            raise ValueError(
                'look_forward_twice=True needs with_box_refine=True (there are no refined '
                'boxes to look forward to); set look_forward_twice=False or with_box_refine=True'
            )
        decoder = copy.deepcopy(decoder)
        if 'look_forward_twice' in decoder:
            raise ValueError(
                "decoder.look_forward_twice is set from the model's look_forward_twice; "
                'remove it from the decoder config'
            )
        decoder['look_forward_twice'] = look_forward_twice
        if num_queries_one2many < 0:
            raise ValueError(f'num_queries_one2many must be >= 0, got {num_queries_one2many}')
        if k_one2many < 1:
            raise ValueError(f'k_one2many must be >= 1, got {k_one2many}')
        bbox_head = copy.deepcopy(bbox_head)
        for key in (
            'share_pred_layer',
            'num_pred_layer',
            'as_two_stage',
            'k_one2many',
            'lambda_one2many',
        ):
            if key in bbox_head:
                raise ValueError(
                    f'bbox_head.{key} is set by DeformableDETR from with_box_refine, '
                    f'as_two_stage, decoder.num_layers, k_one2many and lambda_one2many; '
                    f'remove it from the config'
                )
        # Refinement gives every decoder layer its own branches; two-stage
        # adds one more pair (the last) that scores the encoder proposals.
        bbox_head['share_pred_layer'] = not with_box_refine
        bbox_head['num_pred_layer'] = decoder['num_layers'] + int(as_two_stage)
        bbox_head['as_two_stage'] = as_two_stage
        bbox_head['k_one2many'] = k_one2many
        bbox_head['lambda_one2many'] = lambda_one2many
        self.look_forward_twice = look_forward_twice
        self.num_queries_one2many = num_queries_one2many
        self.k_one2many = k_one2many
        self.lambda_one2many = lambda_one2many
        self.with_box_refine = with_box_refine
        self.as_two_stage = as_two_stage
        self.num_feature_levels = num_feature_levels
        self.channels_last = channels_last
        super().__init__(
            backbone=backbone,
            neck=neck,
            encoder=encoder,
            decoder=decoder,
            bbox_head=bbox_head,
            positional_encoding=positional_encoding,
            num_queries=num_queries,
            train_cfg=train_cfg,
            test_cfg=test_cfg,
            data_preprocessor=data_preprocessor,
            init_cfg=init_cfg,
        )

    def _init_layers(self) -> None:
        """Build the transformer and the embeddings (everything but the
        backbone, neck and head, built by the base class)."""
        self._backbone_to_channels_last()
        self.positional_encoding = SinePositionalEncoding(**self.positional_encoding)
        self.encoder = DeformableDetrTransformerEncoder(**self.encoder)
        self.decoder = DeformableDetrTransformerDecoder(**self.decoder)
        self.embed_dims = self.encoder.embed_dims
        self._check_dims()
        if not self.as_two_stage:
            # split into (query_pos, query) in pre_decoder, hence 2 * embed_dims
            # the one-to-many queries (hybrid matching) follow the one-to-one ones
            self.query_embedding = nn.Embedding(
                self.num_queries + self.num_queries_one2many, self.embed_dims * 2
            )
        # zeros until init_weights() draws it (never uninitialised memory: a model
        # built without init_weights, e.g. by DetInferencer without weights, stays finite)
        self.level_embed = nn.Parameter(torch.zeros(self.num_feature_levels, self.embed_dims))
        if self.as_two_stage:
            self.memory_trans_fc = nn.Linear(self.embed_dims, self.embed_dims)
            self.memory_trans_norm = nn.LayerNorm(self.embed_dims)
            self.pos_trans_fc = nn.Linear(self.embed_dims * 2, self.embed_dims * 2)
            self.pos_trans_norm = nn.LayerNorm(self.embed_dims * 2)
        else:
            self.reference_points_fc = nn.Linear(self.embed_dims, 2)

    def _backbone_to_channels_last(self) -> None:
        """With ``channels_last``, store the backbone and neck weights
        channels-last (loading a state dict copies into them, keeping the
        layout)."""
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            if self.with_neck:
                self.neck.to(memory_format=torch.channels_last)

    def _check_dims(self) -> None:
        """Raise a ValueError naming the config entry whose sizes disagree."""
        num_feats = self.positional_encoding.num_feats
        if num_feats * 2 != self.embed_dims:
            raise ValueError(
                f'positional_encoding.num_feats * 2 must equal embed_dims ({self.embed_dims}), '
                f'got num_feats={num_feats}'
            )
        if self.decoder.embed_dims != self.embed_dims:
            raise ValueError(
                f'decoder embed_dims ({self.decoder.embed_dims}) must equal encoder embed_dims '
                f'({self.embed_dims})'
            )
        if self.bbox_head.embed_dims != self.embed_dims:
            raise ValueError(
                f'bbox_head.embed_dims ({self.bbox_head.embed_dims}) must equal the '
                f'transformer embed_dims ({self.embed_dims})'
            )
        attentions = (self.encoder.layers[0].self_attn, self.decoder.layers[0].cross_attn)
        for name, attn in zip(('encoder', 'decoder'), attentions):
            if attn.num_levels != self.num_feature_levels:
                raise ValueError(
                    f'{name} deformable attention num_levels ({attn.num_levels}) must equal '
                    f'num_feature_levels ({self.num_feature_levels})'
                )

    def init_weights(self) -> None:
        """Xavier-uniform transformer weights, the deformable attentions' own
        initialisation, and a normal level embedding (as in the paper)."""
        super().init_weights()
        for coder in (self.encoder, self.decoder):
            for p in coder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        if self.as_two_stage:
            nn.init.xavier_uniform_(self.memory_trans_fc.weight)
            nn.init.xavier_uniform_(self.pos_trans_fc.weight)
        else:
            xavier_init(self.reference_points_fc, distribution='uniform', bias=0.0)
        nn.init.normal_(self.level_embed)

    def extract_feat(self, batch_inputs: Tensor) -> Tuple[Tensor, ...]:
        """Backbone and neck features.

        Args:
            batch_inputs (Tensor): Images, has shape (bs, 3, H, W).

        Returns:
            tuple[Tensor]: Neck outputs, each has shape (bs, dim, h_lvl, w_lvl)
            (channels-last strides when ``channels_last``).
        """
        if self.channels_last:
            batch_inputs = batch_inputs.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(batch_inputs)
        return self.neck(feats) if self.with_neck else feats

    # ------------------------------------------------------------------
    # the four steps of DetectionTransformer.forward_transformer
    # ------------------------------------------------------------------
    def pre_transformer(
        self, mlvl_feats: Tuple[Tensor, ...], batch_data_samples: OptSampleList = None
    ) -> Tuple[Dict, Dict]:
        """Flatten the levels and build everything the encoder and decoder
        share: padding masks, positional + level embeddings, spatial shapes,
        valid ratios and the encoder reference points (computed once here).

        Args:
            mlvl_feats (tuple[Tensor]): Neck outputs, each has shape
                (bs, dim, h_lvl, w_lvl).
            batch_data_samples (list[DetDataSample]): With metainfo
                ``batch_input_shape`` and ``img_shape``.

        Returns:
            tuple[dict, dict]: Inputs of :meth:`forward_encoder` (``feat``,
            ``feat_mask``, ``feat_pos``, ``spatial_shapes``,
            ``level_start_index``, ``valid_ratios``, ``reference_points``,
            ``level_shapes``) and
            part of those of :meth:`forward_decoder` (``memory_mask``,
            ``spatial_shapes``, ``level_start_index``, ``valid_ratios``).
        """
        if batch_data_samples is None:
            raise ValueError('batch_data_samples (with batch_input_shape, img_shape) is required')
        if len(mlvl_feats) != self.num_feature_levels:
            raise ValueError(
                f'the neck must give num_feature_levels ({self.num_feature_levels}) maps, '
                f'got {len(mlvl_feats)}'
            )
        bs = mlvl_feats[0].shape[0]
        feat_shapes = [tuple(feat.shape[-2:]) for feat in mlvl_feats]
        batch_input_shape = tuple(batch_data_samples[0].batch_input_shape)
        img_shapes = [tuple(s.img_shape[:2]) for s in batch_data_samples]
        if all(shape == batch_input_shape for shape in img_shapes):
            # nothing is padded: no masks, and valid ratios of 1
            mlvl_masks = [None] * len(mlvl_feats)
            pos_embeds = [self.positional_encoding(None, input=feat) for feat in mlvl_feats]
            valid_ratios = mlvl_feats[0].new_ones(bs, len(mlvl_feats), 2)
        else:
            mlvl_masks = get_padding_masks(
                img_shapes, batch_input_shape, feat_shapes, like=mlvl_feats[0]
            )
            pos_embeds = [self.positional_encoding(mask) for mask in mlvl_masks]
            # (bs, num_levels, 2)
            valid_ratios = torch.stack([get_valid_ratios(mask) for mask in mlvl_masks], 1)

        feat_flatten = []
        pos_flatten = []
        for level, (feat, pos) in enumerate(zip(mlvl_feats, pos_embeds)):
            # (bs, c, h, w) -> (bs, h*w, c)
            feat_flatten.append(feat.flatten(2).transpose(1, 2))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level])
        feat_flatten = torch.cat(feat_flatten, 1)  # (bs, num_feat_points, c)
        pos_flatten = torch.cat(pos_flatten, 1)  # (bs, num_feat_points, c)
        if mlvl_masks[0] is None:
            mask_flatten = None
        else:
            # (bs, h, w) -> (bs, h*w) -> (bs, num_feat_points)
            mask_flatten = torch.cat([mask.flatten(1) for mask in mlvl_masks], 1)

        device = feat_flatten.device
        spatial_shapes = torch.tensor(feat_shapes, dtype=torch.long, device=device)  # (nl, 2)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )  # (num_levels,)
        encoder_inputs_dict = dict(
            feat=feat_flatten,
            feat_mask=mask_flatten,
            feat_pos=pos_flatten,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            # the Python sizes keep them symbolic under torch.export
            reference_points=get_encoder_reference_points(feat_shapes, valid_ratios),
            level_shapes=feat_shapes,
        )
        decoder_inputs_dict = dict(
            memory_mask=mask_flatten,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
        )
        return encoder_inputs_dict, decoder_inputs_dict

    def forward_encoder(
        self,
        feat: Tensor,
        feat_mask: Optional[Tensor],
        feat_pos: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        reference_points: Tensor,
        level_shapes: Optional[List[Tuple[int, int]]] = None,
    ) -> Dict:
        """Run the encoder.

        Args:
            feat (Tensor): Flattened features, has shape
                (bs, num_feat_points, dim).
            feat_mask (Tensor, optional): True at padded positions, has shape
                (bs, num_feat_points).
            feat_pos (Tensor): Positional + level embeddings, has shape
                (bs, num_feat_points, dim).
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_start_index (Tensor): Start of every level, has shape
                (num_levels,).
            valid_ratios (Tensor): Valid (w, h) fraction of every level, has
                shape (bs, num_levels, 2).
            reference_points (Tensor): Encoder reference points, has shape
                (bs, num_feat_points, num_levels, 2).
            level_shapes (list[tuple[int, int]], optional): ``spatial_shapes``
                as Python sizes, handed on to :meth:`pre_decoder`.

        Returns:
            dict: ``memory`` (bs, num_feat_points, dim), ``memory_mask``,
            ``spatial_shapes`` and ``level_shapes`` for :meth:`pre_decoder`.
        """
        memory = self.encoder(
            query=feat,
            query_pos=feat_pos,
            key_padding_mask=feat_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        return dict(
            memory=memory,
            memory_mask=feat_mask,
            spatial_shapes=spatial_shapes,
            level_shapes=level_shapes,
        )

    def pre_decoder(
        self,
        memory: Tensor,
        memory_mask: Optional[Tensor],
        spatial_shapes: Tensor,
        level_shapes: Optional[List[Tuple[int, int]]] = None,
    ) -> Tuple[Dict, Dict]:
        """Initial queries and references of the decoder.

        Args:
            memory (Tensor): Encoder output, has shape (bs, num_feat_points, dim).
            memory_mask (Tensor, optional): True at padded positions, has
                shape (bs, num_feat_points).
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_shapes (list[tuple[int, int]], optional): The same as
                Python sizes (read from ``spatial_shapes`` when None; given,
                they keep the sizes symbolic under ``torch.export``).

        Returns:
            tuple[dict, dict]:

            - decoder inputs: ``query`` and ``query_pos``
              (bs, num_queries, dim), ``memory``, and ``reference_points``:
              boxes (bs, num_queries, 4) in two-stage mode, else points
              (bs, num_queries, 2). With hybrid matching in training,
              ``num_queries_one2many`` more queries follow, and
              ``self_attn_mask`` separates the two groups.
            - head inputs (training only): ``enc_outputs_class``
              (bs, num_feat_points, cls_out_channels) and
              ``enc_outputs_coord`` (bs, num_feat_points, 4), None unless
              two-stage.
        """
        bs, _, c = memory.shape
        # hybrid matching: the one-to-many queries join in training only
        num_one2many = self.num_queries_one2many if self.training else 0
        num_total = self.num_queries + num_one2many
        enc_outputs_class = enc_outputs_coord = None
        if self.as_two_stage:
            query, query_pos, reference_points, enc_outputs_class, enc_outputs_coord = (
                self._select_proposals(
                    memory,
                    memory_mask,
                    spatial_shapes if level_shapes is None else level_shapes,
                    num_total,
                )
            )
        else:
            # (num_total, 2c) -> (nq, c) each
            query_pos, query = torch.split(self.query_embedding.weight[:num_total], c, dim=1)
            reference_points = self.reference_points_fc(query_pos).sigmoid()  # (nq, 2)
            # (nq, c) -> (bs, nq, c)
            query_pos = query_pos[None].expand(bs, -1, -1)
            query = query[None].expand(bs, -1, -1)
            reference_points = reference_points[None].expand(bs, -1, -1)
        decoder_inputs_dict = dict(
            query=query, query_pos=query_pos, memory=memory, reference_points=reference_points
        )
        head_inputs_dict = (
            dict(enc_outputs_class=enc_outputs_class, enc_outputs_coord=enc_outputs_coord)
            if self.training
            else dict()
        )
        if num_one2many > 0:
            decoder_inputs_dict['self_attn_mask'] = get_hybrid_attn_mask(
                self.num_queries, num_one2many, device=memory.device
            )
            head_inputs_dict['num_queries_one2many'] = num_one2many
        return decoder_inputs_dict, head_inputs_dict

    def _select_proposals(
        self,
        memory: Tensor,
        memory_mask: Optional[Tensor],
        spatial_shapes: Union[Tensor, List[Tuple[int, int]]],
        num_select: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """Two-stage: score every encoder position, keep the top
        ``num_select`` proposals as the decoder's references, and embed them
        as its queries.

        Args:
            memory (Tensor): has shape (bs, num_feat_points, dim).
            memory_mask (Tensor, optional): has shape (bs, num_feat_points).
            spatial_shapes (Tensor | list[tuple[int, int]]): (h, w) of every
                level, a (num_levels, 2) tensor or Python sizes.
            num_select (int): Proposals kept (``num_queries``, plus the
                one-to-many queries with hybrid matching in training).

        Returns:
            tuple: ``query``, ``query_pos`` (bs, num_select, dim), the
            reference boxes (bs, num_select, 4), and, in training, the
            logits (bs, num_feat_points, cls_out_channels) and boxes
            (bs, num_feat_points, 4) of all proposals (None in eval mode,
            where only the kept proposals are regressed).
        """
        bs, num_feat_points, c = memory.shape
        if num_feat_points < num_select:
            raise ValueError(
                f'two-stage selects num_queries ({self.num_queries}) + num_queries_one2many '
                f'(in training: {self.num_queries_one2many}) proposals from the '
                f'{num_feat_points} encoder positions of these images: use larger images or '
                'fewer queries'
            )
        proposals, invalid = get_encoder_proposals(memory_mask, spatial_shapes, bs, memory.device)
        output_memory = memory.masked_fill(invalid, 0.0)
        output_memory = self.memory_trans_norm(self.memory_trans_fc(output_memory))
        cls_branch = self.bbox_head.cls_branches[self.decoder.num_layers]
        reg_branch = self.bbox_head.reg_branches[self.decoder.num_layers]
        enc_outputs_class = enc_outputs_coord = None
        if self.training:
            # every position is scored and regressed: the encoder loss needs all
            enc_outputs_class = cls_branch(output_memory)
            coords_unact = reg_branch(output_memory) + proposals
            enc_outputs_coord = coords_unact.sigmoid()
            # class 0 stands for "object" (proposal targets are all 0)
            topk = torch.topk(enc_outputs_class[..., 0], num_select, dim=1)[1]
            # (bs, n, 4) -> (bs, nq, 4)
            topk_coords_unact = torch.gather(coords_unact, 1, topk[..., None].expand(-1, -1, 4))
        else:
            # inference ranks by the object channel only and regresses the kept ones
            scores = F.linear(output_memory, cls_branch.weight[:1], cls_branch.bias[:1])[..., 0]
            topk = torch.topk(scores, num_select, dim=1)[1]
            # (bs, n, c) -> (bs, nq, c)
            topk_memory = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, c))
            topk_proposals = torch.gather(proposals, 1, topk[..., None].expand(-1, -1, 4))
            topk_coords_unact = reg_branch(topk_memory) + topk_proposals
        topk_coords_unact = topk_coords_unact.detach()
        reference_points = topk_coords_unact.sigmoid()
        pos_embed = get_proposal_pos_embed(topk_coords_unact, num_pos_feats=c // 2)
        pos_trans_out = self.pos_trans_norm(self.pos_trans_fc(pos_embed))  # (bs, nq, 2c)
        query_pos, query = torch.split(pos_trans_out, c, dim=2)
        return query, query_pos, reference_points, enc_outputs_class, enc_outputs_coord

    def forward_decoder(
        self,
        query: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Dict:
        """Run the decoder (refining the references with the head's
        regression branches when ``with_box_refine``).

        Args:
            query (Tensor): has shape (bs, num_queries, dim).
            query_pos (Tensor): has shape (bs, num_queries, dim).
            memory (Tensor): has shape (bs, num_feat_points, dim).
            memory_mask (Tensor, optional): has shape (bs, num_feat_points).
            reference_points (Tensor): has shape (bs, num_queries, 2 or 4).
            spatial_shapes (Tensor): has shape (num_levels, 2).
            level_start_index (Tensor): has shape (num_levels,).
            valid_ratios (Tensor): has shape (bs, num_levels, 2).
            self_attn_mask (Tensor, optional): bool, True where a query may
                not attend to another, has shape (num_queries, num_queries).

        Returns:
            dict: ``hidden_states`` (num_layers, bs, num_queries, dim) and
            ``references``: the initial references followed by those after
            every layer.
        """
        hidden_states, inter_references = self.decoder(
            query=query,
            query_pos=query_pos,
            value=memory,
            key_padding_mask=memory_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            reg_branches=self.bbox_head.reg_branches if self.with_box_refine else None,
            self_attn_mask=self_attn_mask,
        )
        return dict(hidden_states=hidden_states, references=[reference_points, *inter_references])
