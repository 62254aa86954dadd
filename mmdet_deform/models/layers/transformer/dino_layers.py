"""DINO's decoder (Zhang et al., arXiv 2203.03605): the Deformable DETR
decoder layers with box references throughout.

Differences from :class:`DeformableDetrTransformerDecoder`, with the same
layer modules (so state dicts match mmdet 3.3's ``DinoTransformerDecoder``):

* the positional query of every layer is computed from its current
  reference box (``ref_point_head``: an MLP on the boxes' sine embedding),
  not learnt per query;
* the queries handed to the head go through a final ``norm``;
* look forward twice (section 3.5): the next layer starts from the refined
  boxes without gradient, as in Deformable DETR, but the refined boxes
  returned to the head keep theirs, so layer ``i``'s box loss also trains
  layer ``i - 1``'s regression branch and queries;
* an optional self-attention mask (denoising groups, hybrid queries).
"""

from typing import List, Optional, Tuple

import torch
from mmdet.models.layers.transformer.utils import MLP, coordinate_to_encoding
from mmdet.utils import ConfigType, OptConfigType, OptMultiConfig
from torch import Tensor, nn

from .deformable_detr_layers import DeformableDetrTransformerDecoder
from .reference_points import apply_box_deltas

__all__ = ['DinoTransformerDecoder']


class DinoTransformerDecoder(DeformableDetrTransformerDecoder):
    """Decoder of DINO.

    Args:
        num_layers (int): Number of layers.
        layer_cfg (dict): Arguments of every
            :class:`DeformableDetrTransformerDecoderLayer`.
        post_norm_cfg (dict, optional): Must be None (the final ``norm`` is
            always a LayerNorm). Accepted for config compatibility.
        return_intermediate (bool): Return the queries and references after
            every layer. Defaults to True.
        look_forward_twice (bool): Return the refined boxes with their
            gradient (the next layer still gets them detached). Only has an
            effect with ``reg_branches``. Defaults to True.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        num_layers: int,
        layer_cfg: ConfigType,
        post_norm_cfg: OptConfigType = None,
        return_intermediate: bool = True,
        look_forward_twice: bool = True,
        init_cfg: OptMultiConfig = None,
    ) -> None:
        super().__init__(
            num_layers=num_layers,
            layer_cfg=layer_cfg,
            post_norm_cfg=post_norm_cfg,
            return_intermediate=return_intermediate,
            look_forward_twice=look_forward_twice,
            init_cfg=init_cfg,
        )
        if self.embed_dims % 2:
            raise ValueError(f'decoder embed_dims must be even, got {self.embed_dims}')
        # sine embedding of (cx, cy, w, h): 4 * embed_dims / 2 channels
        self.ref_point_head = MLP(self.embed_dims * 2, self.embed_dims, self.embed_dims, 2)
        self.norm = nn.LayerNorm(self.embed_dims)

    def forward(
        self,
        query: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        reg_branches: Optional[List[nn.Module]] = None,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Decode the queries.

        Args:
            query (Tensor): Content queries, has shape (bs, num_queries, dim).
            value (Tensor): Encoder memory, has shape (bs, num_feat_points, dim).
            key_padding_mask (Tensor, optional): True at padded memory
                positions, has shape (bs, num_feat_points).
            reference_points (Tensor): Initial boxes (cx, cy, w, h),
                normalised to the valid image area, has shape
                (bs, num_queries, 4).
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_start_index (Tensor): Start of every level, has shape
                (num_levels,).
            valid_ratios (Tensor): Valid (w, h) fraction of every level, has
                shape (bs, num_levels, 2).
            reg_branches (list[nn.Module], optional): One regression branch
                per layer; given, the boxes are refined after every layer.
                Defaults to None.
            self_attn_mask (Tensor, optional): bool, True where a query may
                not attend to another, has shape (num_queries, num_queries).
                Defaults to None.

        Returns:
            tuple[Tensor, Tensor]:

            - hidden_states: normalised queries after every layer, has shape
              (num_layers, bs, num_queries, dim) (1 instead of num_layers
              without ``return_intermediate``).
            - references: boxes after every layer, with their gradient when
              ``look_forward_twice``, has shape
              (num_layers, bs, num_queries, 4) (1 without
              ``return_intermediate``).
        """
        if reference_points.shape[-1] != 4:
            raise ValueError(
                'reference_points must be boxes (cx, cy, w, h), got shape '
                f'{tuple(reference_points.shape)}'
            )
        if reg_branches is not None and len(reg_branches) < self.num_layers:
            raise ValueError(
                f'reg_branches must hold one branch per layer ({self.num_layers}), '
                f'got {len(reg_branches)}'
            )
        # (bs, num_levels, 2) -> (bs, 1, num_levels, 4)
        valid_scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        hidden_states = []
        references = []
        for i, layer in enumerate(self.layers):
            # (bs, nq, 1, 4) * (bs, 1, num_levels, 4) -> (bs, nq, num_levels, 4)
            level_references = reference_points[:, :, None] * valid_scale
            # (bs, nq, 4) -> (bs, nq, 2 * dim) -> (bs, nq, dim)
            sine_embed = coordinate_to_encoding(
                level_references[:, :, 0], num_feats=self.embed_dims // 2
            )
            query_pos = self.ref_point_head(sine_embed)
            query = layer(
                query,
                query_pos=query_pos,
                value=value,
                key_padding_mask=key_padding_mask,
                reference_points=level_references,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                self_attn_mask=self_attn_mask,
            )
            refined = reference_points
            if reg_branches is not None:
                deltas = reg_branches[i](query)
                refined = apply_box_deltas(reference_points, deltas, eps=1e-3).sigmoid()
                # the next layer starts from the refined boxes without gradient
                reference_points = refined.detach()
            if self.return_intermediate:
                hidden_states.append(self.norm(query))
                references.append(refined if self.look_forward_twice else reference_points)
        if self.return_intermediate:
            return torch.stack(hidden_states), torch.stack(references)
        return self.norm(query)[None], reference_points[None]
