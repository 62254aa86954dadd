"""DINO (Zhang et al., arXiv 2203.03605): Deformable DETR with three
switches for faster convergence.

* ``as_two_stage`` here means *mixed query selection* (section 3.4): the
  top-k encoder proposals (ranked by their best class score) give the
  decoder's initial reference boxes, and so its positional queries, while
  the content queries are learnt (``query_embedding``).
* ``dn_cfg`` turns on *contrastive denoising* (section 3.3): noised copies
  of the ground truth join the decoder's queries in training
  (:class:`CdnQueryGenerator`), behind a self-attention mask, with
  reconstruction losses (:class:`DINOHead`).
* ``look_forward_twice`` (section 3.5): with ``with_box_refine``, the head
  predicts layer ``i``'s boxes from layer ``i - 1``'s refined boxes with
  their gradient (:class:`DinoTransformerDecoder`).

Steps: ``pre_transformer`` and ``forward_encoder`` are Deformable DETR's;
``pre_decoder`` also takes the data samples (the ground truth of the
denoising queries). Parameter names equal mmdet 3.3's ``DINO``, so its
checkpoints load with ``strict=True``.
"""

import copy
from typing import Dict, List, Optional, Tuple

import torch
from mmdet.models.layers import SinePositionalEncoding
from mmdet.structures import OptSampleList
from mmdet.utils import OptConfigType
from torch import Tensor, nn

from mmdet_deform.ops import MultiScaleDeformableAttention
from mmdet_deform.registry import MODELS

from ..layers.transformer import (
    CdnQueryGenerator,
    DeformableDetrTransformerEncoder,
    DinoTransformerDecoder,
    get_encoder_proposals,
)
from .deformable_detr import DeformableDETR

__all__ = ['DINO']


@MODELS.register_module()
class DINO(DeformableDETR):
    """DINO detector.

    Args:
        dn_cfg (dict, optional): :class:`CdnQueryGenerator` arguments
            (``label_noise_scale``, ``box_noise_scale``, ``group_cfg``);
            ``num_classes``, ``embed_dims`` and ``num_matching_queries`` are
            set here and must not be given. None turns denoising off.
            Defaults to None.
        **kwargs: :class:`DeformableDETR` arguments; ``with_box_refine``,
            ``as_two_stage`` and ``look_forward_twice`` default to True here,
            ``as_two_stage`` must be True (DINO's queries come from mixed
            query selection) and ``num_queries_one2many`` 0.
    """

    def __init__(self, *args, dn_cfg: OptConfigType = None, **kwargs) -> None:
        kwargs.setdefault('with_box_refine', True)
        kwargs.setdefault('as_two_stage', True)
        kwargs.setdefault('look_forward_twice', True)
        if not kwargs['as_two_stage']:
            raise ValueError(
                'DINO selects its reference boxes from the encoder (mixed query selection): '
                'as_two_stage must be True, got False'
            )
        if kwargs.get('num_queries_one2many', 0):
            raise ValueError(
                'num_queries_one2many (hybrid matching) is not supported by DINO (its query '
                'selection and dn_cfg do not handle a one-to-many group); set it to 0'
            )
        if dn_cfg is not None:
            dn_cfg = copy.deepcopy(dict(dn_cfg))
            for key in ('num_classes', 'embed_dims', 'num_matching_queries'):
                if key in dn_cfg:
                    raise ValueError(
                        f'dn_cfg.{key} is set by DINO (from bbox_head.num_classes, the '
                        f'embed_dims and num_queries); remove it from dn_cfg'
                    )
        super().__init__(*args, **kwargs)
        self.with_denoising = dn_cfg is not None
        if self.with_denoising:
            self.dn_query_generator = CdnQueryGenerator(
                num_classes=self.bbox_head.num_classes,
                embed_dims=self.embed_dims,
                num_matching_queries=self.num_queries,
                **dn_cfg,
            )

    def _init_layers(self) -> None:
        """Build the transformer and the embeddings: the encoder, DINO's
        decoder, the content queries, the level embedding and the proposal
        projection (no positional-query projection: the decoder embeds its
        boxes)."""
        self._backbone_to_channels_last()
        self.positional_encoding = SinePositionalEncoding(**self.positional_encoding)
        self.encoder = DeformableDetrTransformerEncoder(**self.encoder)
        self.decoder = DinoTransformerDecoder(**self.decoder)
        self.embed_dims = self.encoder.embed_dims
        self._check_dims()
        self.query_embedding = nn.Embedding(self.num_queries, self.embed_dims)
        # zeros until init_weights() draws it (never uninitialised memory)
        self.level_embed = nn.Parameter(torch.zeros(self.num_feature_levels, self.embed_dims))
        self.memory_trans_fc = nn.Linear(self.embed_dims, self.embed_dims)
        self.memory_trans_norm = nn.LayerNorm(self.embed_dims)

    def init_weights(self) -> None:
        """Xavier-uniform transformer, proposal projection and content
        queries, the deformable attentions' own initialisation and a normal
        level embedding."""
        super(DeformableDETR, self).init_weights()
        for coder in (self.encoder, self.decoder):
            for p in coder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        nn.init.xavier_uniform_(self.memory_trans_fc.weight)
        nn.init.xavier_uniform_(self.query_embedding.weight)
        nn.init.normal_(self.level_embed)

    def forward_transformer(
        self, img_feats: Tuple[Tensor, ...], batch_data_samples: OptSampleList = None
    ) -> Dict:
        """``pre_transformer`` -> ``forward_encoder`` -> ``pre_decoder`` (with
        the data samples) -> ``forward_decoder``.

        Args:
            img_feats (tuple[Tensor]): Neck outputs, each has shape
                (bs, dim, h_lvl, w_lvl).
            batch_data_samples (list[DetDataSample]): With metainfo and, in
                training, ``gt_instances``.

        Returns:
            dict: Inputs of the head's ``loss`` or ``predict``.
        """
        encoder_inputs_dict, decoder_inputs_dict = self.pre_transformer(
            img_feats, batch_data_samples
        )
        encoder_outputs_dict = self.forward_encoder(**encoder_inputs_dict)
        tmp_dec_in, head_inputs_dict = self.pre_decoder(
            **encoder_outputs_dict, batch_data_samples=batch_data_samples
        )
        decoder_inputs_dict.update(tmp_dec_in)
        decoder_outputs_dict = self.forward_decoder(**decoder_inputs_dict)
        head_inputs_dict.update(decoder_outputs_dict)
        return head_inputs_dict

    def pre_decoder(
        self,
        memory: Tensor,
        memory_mask: Optional[Tensor],
        spatial_shapes: Tensor,
        level_shapes: Optional[List[Tuple[int, int]]] = None,
        batch_data_samples: OptSampleList = None,
    ) -> Tuple[Dict, Dict]:
        """Mixed query selection, and in training the denoising queries.

        Args:
            memory (Tensor): Encoder output, has shape (bs, num_feat_points, dim).
            memory_mask (Tensor, optional): True at padded positions, has
                shape (bs, num_feat_points).
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_shapes (list[tuple[int, int]], optional): The same as
                Python ints (traceable sizes for export); None to read them
                from ``spatial_shapes``.
            batch_data_samples (list[DetDataSample], optional): Ground truth
                of the denoising queries (training with ``dn_cfg`` only).

        Returns:
            tuple[dict, dict]:

            - decoder inputs: ``query`` (bs, num_dn + num_queries, dim),
              ``memory``, ``reference_points`` (bs, num_dn + num_queries, 4)
              and ``dn_mask`` (num_dn + num_queries,) * 2 or None.
            - head inputs (training only): ``enc_outputs_class``
              (bs, num_queries, cls_out_channels) and ``enc_outputs_coord``
              (bs, num_queries, 4) of the selected proposals, and
              ``dn_meta`` (None without denoising).
        """
        bs, num_feat_points, c = memory.shape
        if num_feat_points < self.num_queries:
            raise ValueError(
                f'DINO selects num_queries ({self.num_queries}) proposals from the '
                f'{num_feat_points} encoder positions of these images: use larger images or '
                'fewer queries'
            )
        shapes = spatial_shapes if level_shapes is None else level_shapes
        proposals, invalid = get_encoder_proposals(memory_mask, shapes, bs, memory.device)
        output_memory = memory.masked_fill(invalid, 0.0)
        output_memory = self.memory_trans_norm(self.memory_trans_fc(output_memory))
        cls_branch = self.bbox_head.cls_branches[self.decoder.num_layers]
        reg_branch = self.bbox_head.reg_branches[self.decoder.num_layers]
        enc_outputs_class = cls_branch(output_memory)  # (bs, n, cls_out_channels)
        # rank by the best class score; only the kept positions are regressed
        topk = torch.topk(enc_outputs_class.max(-1)[0], self.num_queries, dim=1)[1]
        # (bs, n, k) -> (bs, nq, k)
        topk_score = torch.gather(
            enc_outputs_class, 1, topk[..., None].expand(-1, -1, enc_outputs_class.shape[-1])
        )
        topk_memory = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, c))
        topk_proposals = torch.gather(proposals, 1, topk[..., None].expand(-1, -1, 4))
        topk_coords_unact = reg_branch(topk_memory) + topk_proposals
        topk_coords = topk_coords_unact.sigmoid()
        # (nq, c) -> (bs, nq, c): learnt content queries
        query = self.query_embedding.weight[None].expand(bs, -1, -1)
        reference_points = topk_coords_unact.detach()
        dn_mask = dn_meta = None
        if self.training and self.with_denoising:
            if batch_data_samples is None:
                raise ValueError('batch_data_samples (with gt_instances) is required in training')
            dn_label_query, dn_bbox_query, dn_mask, dn_meta = self.dn_query_generator(
                batch_data_samples
            )
            query = torch.cat([dn_label_query.to(query.dtype), query], dim=1)
            reference_points = torch.cat(
                [dn_bbox_query.to(reference_points.dtype), reference_points], dim=1
            )
        decoder_inputs_dict = dict(
            query=query,
            memory=memory,
            reference_points=reference_points.sigmoid(),
            dn_mask=dn_mask,
        )
        head_inputs_dict = (
            dict(enc_outputs_class=topk_score, enc_outputs_coord=topk_coords, dn_meta=dn_meta)
            if self.training
            else dict()
        )
        return decoder_inputs_dict, head_inputs_dict

    def forward_decoder(
        self,
        query: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        dn_mask: Optional[Tensor] = None,
    ) -> Dict:
        """Run the decoder (refining the boxes with the head's regression
        branches when ``with_box_refine``).

        Args:
            query (Tensor): has shape (bs, num_total, dim), ``num_total`` the
                denoising plus the matching queries.
            memory (Tensor): has shape (bs, num_feat_points, dim).
            memory_mask (Tensor, optional): has shape (bs, num_feat_points).
            reference_points (Tensor): Boxes, has shape (bs, num_total, 4).
            spatial_shapes (Tensor): has shape (num_levels, 2).
            level_start_index (Tensor): has shape (num_levels,).
            valid_ratios (Tensor): has shape (bs, num_levels, 2).
            dn_mask (Tensor, optional): Self-attention mask, has shape
                (num_total, num_total).

        Returns:
            dict: ``hidden_states`` (num_layers, bs, num_total, dim) and
            ``references``: the initial boxes followed by those after every
            layer.
        """
        hidden_states, inter_references = self.decoder(
            query=query,
            value=memory,
            key_padding_mask=memory_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            reg_branches=self.bbox_head.reg_branches if self.with_box_refine else None,
            self_attn_mask=dn_mask,
        )
        return dict(hidden_states=hidden_states, references=[reference_points, *inter_references])
