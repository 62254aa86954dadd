"""Deformable transformer encoder and decoder (Zhu et al., arXiv 2010.04159).

Post-norm layers, as in the paper and mmdet 3.3, with the same module tree
(so state dicts match key for key):

* encoder layer: ``self_attn`` (multi-scale deformable attention over the
  flattened feature maps) -> ``norms.0`` -> ``ffn`` -> ``norms.1``;
* decoder layer: ``self_attn`` (multi-head attention among the queries) ->
  ``norms.0`` -> ``cross_attn`` (multi-scale deformable attention into the
  encoder memory) -> ``norms.1`` -> ``ffn`` -> ``norms.2``.

The decoder optionally refines its reference points after every layer with
the head's regression branches (iterative box refinement, paper section 4.1).

Every dropout is an ``nn.Dropout`` module or the ``dropout`` of
``nn.MultiheadAttention``, so setting their rates to 0 makes training
deterministic.
"""

import copy
from typing import List, Optional, Tuple

import torch
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import MultiheadAttention
from mmdet.utils import ConfigType, OptConfigType, OptMultiConfig
from mmengine.model import BaseModule, ModuleList
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmdet_deform.ops import MultiScaleDeformableAttention

from .ffn import FastFFN
from .reference_points import apply_box_deltas

__all__ = [
    'DeformableDetrTransformerDecoder',
    'DeformableDetrTransformerDecoderLayer',
    'DeformableDetrTransformerEncoder',
    'DeformableDetrTransformerEncoderLayer',
]


_DEFAULT_ATTN_CFG = dict(embed_dims=256, num_heads=8, dropout=0.0)
_DEFAULT_FFN_CFG = dict(
    embed_dims=256,
    feedforward_channels=1024,
    num_fcs=2,
    ffn_drop=0.0,
    act_cfg=dict(type='ReLU', inplace=True),
)
_DEFAULT_NORM_CFG = dict(type='LN')


def _or_default(cfg: OptConfigType, default: dict) -> ConfigType:
    """``cfg``, or a copy of ``default`` when None."""
    return copy.deepcopy(default) if cfg is None else cfg


def _batch_first_cfg(cfg: ConfigType, name: str) -> dict:
    """Copy an attention config, defaulting ``batch_first`` to True.

    Raises:
        ValueError: If the config sets ``batch_first=False``: every tensor
            here is (bs, n, c).
    """
    cfg = dict(cfg)
    if not cfg.setdefault('batch_first', True):
        raise ValueError(f'{name} must have batch_first=True (tensors are (bs, n, c)), got False')
    return cfg


class DeformableDetrTransformerEncoderLayer(BaseModule):
    """Encoder layer: deformable self-attention and a feed-forward network,
    each followed by a LayerNorm.

    Args:
        self_attn_cfg (dict, optional): Arguments of
            :class:`~mmdet_deform.ops.MultiScaleDeformableAttention`.
            Defaults to 256 dims, 8 heads, no dropout.
        ffn_cfg (dict, optional): Arguments of mmcv's ``FFN`` (built as
            :class:`FastFFN`, same parameters and math). Defaults to
            256 -> 1024 -> 256 with ReLU, no dropout.
        norm_cfg (dict, optional): Config of the two norms. Defaults to
            LayerNorm.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        self_attn_cfg: OptConfigType = None,
        ffn_cfg: OptConfigType = None,
        norm_cfg: OptConfigType = None,
        init_cfg: OptMultiConfig = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self_attn_cfg = _or_default(self_attn_cfg, _DEFAULT_ATTN_CFG)
        ffn_cfg = _or_default(ffn_cfg, _DEFAULT_FFN_CFG)
        norm_cfg = _or_default(norm_cfg, _DEFAULT_NORM_CFG)
        self.self_attn_cfg = _batch_first_cfg(self_attn_cfg, 'self_attn_cfg')
        self.ffn_cfg = ffn_cfg
        self.norm_cfg = norm_cfg
        self.self_attn = MultiScaleDeformableAttention(**self.self_attn_cfg)
        self.embed_dims = self.self_attn.embed_dims
        self.ffn = FastFFN(**ffn_cfg)
        self.norms = ModuleList([build_norm_layer(norm_cfg, self.embed_dims)[1] for _ in range(2)])

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        key_padding_mask: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """Encode the flattened multi-scale features once.

        Args:
            query (Tensor): Features of all levels, has shape
                (bs, num_feat_points, dim).
            query_pos (Tensor): Positional (+ level) embeddings, has shape
                (bs, num_feat_points, dim).
            key_padding_mask (Tensor, optional): True at padded positions,
                has shape (bs, num_feat_points).
            reference_points (Tensor): Normalised (x, y) of every point on
                every level, has shape (bs, num_feat_points, num_levels, 2).
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_start_index (Tensor): Start of every level, has shape
                (num_levels,).

        Returns:
            Tensor: has shape (bs, num_feat_points, dim).
        """
        query = self.self_attn(
            query=query,
            value=query,
            query_pos=query_pos,
            key_padding_mask=key_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        query = self.norms[0](query)
        query = self.ffn(query)
        return self.norms[1](query)


class DeformableDetrTransformerDecoderLayer(BaseModule):
    """Decoder layer: multi-head self-attention among the queries, deformable
    cross-attention into the encoder memory and a feed-forward network, each
    followed by a LayerNorm.

    Args:
        self_attn_cfg (dict, optional): Arguments of mmcv's
            ``MultiheadAttention``. Defaults to 256 dims, 8 heads, no dropout.
        cross_attn_cfg (dict, optional): Arguments of
            :class:`~mmdet_deform.ops.MultiScaleDeformableAttention`, whose
            ``sample_then_project`` defaults to True here. Defaults to 256
            dims, 8 heads, no dropout.
        ffn_cfg (dict, optional): Arguments of mmcv's ``FFN`` (built as
            :class:`FastFFN`, same parameters and math). Defaults to
            256 -> 1024 -> 256 with ReLU, no dropout.
        norm_cfg (dict, optional): Config of the three norms. Defaults to
            LayerNorm.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        self_attn_cfg: OptConfigType = None,
        cross_attn_cfg: OptConfigType = None,
        ffn_cfg: OptConfigType = None,
        norm_cfg: OptConfigType = None,
        init_cfg: OptMultiConfig = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self_attn_cfg = _or_default(self_attn_cfg, _DEFAULT_ATTN_CFG)
        cross_attn_cfg = _or_default(cross_attn_cfg, _DEFAULT_ATTN_CFG)
        ffn_cfg = _or_default(ffn_cfg, _DEFAULT_FFN_CFG)
        norm_cfg = _or_default(norm_cfg, _DEFAULT_NORM_CFG)
        self.self_attn_cfg = _batch_first_cfg(self_attn_cfg, 'self_attn_cfg')
        self.cross_attn_cfg = _batch_first_cfg(cross_attn_cfg, 'cross_attn_cfg')
        # few (query, head) pairs sample many memory positions: sampling the
        # memory before projecting it is cheaper (same parameters and result)
        self.cross_attn_cfg.setdefault('sample_then_project', True)
        self.ffn_cfg = ffn_cfg
        self.norm_cfg = norm_cfg
        self.self_attn = MultiheadAttention(**self.self_attn_cfg)
        self.cross_attn = MultiScaleDeformableAttention(**self.cross_attn_cfg)
        self.embed_dims = self.self_attn.embed_dims
        self.ffn = FastFFN(**ffn_cfg)
        self.norms = ModuleList([build_norm_layer(norm_cfg, self.embed_dims)[1] for _ in range(3)])

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Update the queries once.

        Args:
            query (Tensor): Queries, has shape (bs, num_queries, dim).
            query_pos (Tensor): Positional queries, has shape
                (bs, num_queries, dim).
            value (Tensor): Encoder memory, has shape (bs, num_feat_points, dim).
            key_padding_mask (Tensor, optional): True at padded memory
                positions, has shape (bs, num_feat_points).
            reference_points (Tensor): Reference points scaled to every
                level's valid area, has shape (bs, num_queries, num_levels, 2)
                for points or (bs, num_queries, num_levels, 4) for boxes.
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_start_index (Tensor): Start of every level, has shape
                (num_levels,).
            self_attn_mask (Tensor, optional): Mask of the self-attention, as
                ``attn_mask`` of ``nn.MultiheadAttention``. Defaults to None.

        Returns:
            Tensor: has shape (bs, num_queries, dim).
        """
        query = self.self_attn(
            query=query,
            key=query,
            value=query,
            query_pos=query_pos,
            key_pos=query_pos,
            attn_mask=self_attn_mask,
        )
        query = self.norms[0](query)
        query = self.cross_attn(
            query=query,
            value=value,
            query_pos=query_pos,
            key_padding_mask=key_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
        )
        query = self.norms[1](query)
        query = self.ffn(query)
        return self.norms[2](query)


class DeformableDetrTransformerEncoder(BaseModule):
    """A stack of :class:`DeformableDetrTransformerEncoderLayer`.

    Args:
        num_layers (int): Number of layers.
        layer_cfg (dict): Arguments of every layer.
        num_cp (int): Run the first ``num_cp`` layers under activation
            checkpointing (recomputed in the backward pass) to save memory;
            -1 or 0 for none. Defaults to -1.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        num_layers: int,
        layer_cfg: ConfigType,
        num_cp: int = -1,
        init_cfg: OptMultiConfig = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_layers < 1:
            raise ValueError(f'num_layers must be >= 1, got {num_layers}')
        if num_cp > num_layers:
            raise ValueError(f'num_cp must be <= num_layers ({num_layers}), got {num_cp}')
        self.num_layers = num_layers
        self.layer_cfg = layer_cfg
        self.num_cp = num_cp
        self.layers = ModuleList(
            [DeformableDetrTransformerEncoderLayer(**layer_cfg) for _ in range(num_layers)]
        )
        self.embed_dims = self.layers[0].embed_dims

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        key_padding_mask: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """Encode the flattened multi-scale features.

        Args:
            query (Tensor): Features of all levels, has shape
                (bs, num_feat_points, dim).
            query_pos (Tensor): Positional (+ level) embeddings, has shape
                (bs, num_feat_points, dim).
            key_padding_mask (Tensor, optional): True at padded positions,
                has shape (bs, num_feat_points).
            reference_points (Tensor): Encoder reference points (see
                :func:`get_encoder_reference_points`), has shape
                (bs, num_feat_points, num_levels, 2).
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_start_index (Tensor): Start of every level, has shape
                (num_levels,).

        Returns:
            Tensor: The memory, has shape (bs, num_feat_points, dim).
        """
        args = (query_pos, key_padding_mask, reference_points, spatial_shapes, level_start_index)
        for i, layer in enumerate(self.layers):
            if i < self.num_cp and self.training and torch.is_grad_enabled():
                query = checkpoint(layer, query, *args, use_reentrant=False)
            else:
                query = layer(query, *args)
        return query


class DeformableDetrTransformerDecoder(BaseModule):
    """A stack of :class:`DeformableDetrTransformerDecoderLayer` with optional
    iterative reference refinement.

    Args:
        num_layers (int): Number of layers.
        layer_cfg (dict): Arguments of every layer.
        post_norm_cfg (dict, optional): Must be None: Deformable DETR's
            decoder has no final norm (each layer ends with one). Accepted for
            config compatibility with mmdet.
        return_intermediate (bool): Return the queries and references after
            every layer (for the auxiliary losses) rather than only after the
            last. Defaults to True.
        look_forward_twice (bool): Return the refined references with their
            gradient (DINO's look forward twice); the next layer gets them
            detached either way. Only has an effect with ``reg_branches``.
            Defaults to False.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        num_layers: int,
        layer_cfg: ConfigType,
        post_norm_cfg: OptConfigType = None,
        return_intermediate: bool = True,
        look_forward_twice: bool = False,
        init_cfg: OptMultiConfig = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_layers < 1:
            raise ValueError(f'num_layers must be >= 1, got {num_layers}')
        if post_norm_cfg is not None:
            raise ValueError(
                f'post_norm_cfg must be None: the Deformable DETR decoder has no post norm, '
                f'got {post_norm_cfg}'
            )
        self.num_layers = num_layers
        self.layer_cfg = layer_cfg
        self.post_norm_cfg = post_norm_cfg
        self.return_intermediate = return_intermediate
        self.look_forward_twice = look_forward_twice
        self.layers = ModuleList(
            [DeformableDetrTransformerDecoderLayer(**layer_cfg) for _ in range(num_layers)]
        )
        self.embed_dims = self.layers[0].embed_dims

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
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
            query (Tensor): Initial queries, has shape (bs, num_queries, dim).
            query_pos (Tensor): Positional queries, has shape
                (bs, num_queries, dim).
            value (Tensor): Encoder memory, has shape (bs, num_feat_points, dim).
            key_padding_mask (Tensor, optional): True at padded memory
                positions, has shape (bs, num_feat_points).
            reference_points (Tensor): Initial references, normalised to the
                valid image area: points (cx, cy) of shape (bs, num_queries, 2),
                or boxes (cx, cy, w, h) of shape (bs, num_queries, 4) in
                two-stage mode.
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_start_index (Tensor): Start of every level, has shape
                (num_levels,).
            valid_ratios (Tensor): Valid (w, h) fraction of every level, has
                shape (bs, num_levels, 2).
            reg_branches (list[nn.Module], optional): One regression branch
                per layer, mapping queries to (cx, cy, w, h) offsets in logit
                space; given, the references are refined after every layer
                (and detached, as in the paper). Defaults to None.
            self_attn_mask (Tensor, optional): bool, True where a query may
                not attend to another (hybrid queries), has shape
                (num_queries, num_queries). Defaults to None.

        Returns:
            tuple[Tensor, Tensor]:

            - hidden_states: queries after every layer, has shape
              (num_layers, bs, num_queries, dim), or (1, bs, num_queries, dim)
              without ``return_intermediate``.
            - references: references after every layer, has shape
              (num_layers, bs, num_queries, 2 or 4), or (1, ...) without
              ``return_intermediate``; with their gradient when
              ``look_forward_twice``.
        """
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                'reference_points must end in 2 (points) or 4 (boxes), got shape '
                f'{tuple(reference_points.shape)}'
            )
        if reg_branches is not None and len(reg_branches) < self.num_layers:
            raise ValueError(
                f'reg_branches must hold one branch per layer ({self.num_layers}), '
                f'got {len(reg_branches)}'
            )
        # scale the references to every level's valid area: points by the
        # valid (w, h), boxes (cx, cy, w, h) by (w, h, w, h); refined points
        # become boxes
        valid_scales = {2: valid_ratios[:, None], 4: torch.cat([valid_ratios] * 2, -1)[:, None]}
        hidden_states = []
        references = []
        for i, layer in enumerate(self.layers):
            # (bs, nq, r) * (bs, 1, num_levels, r) -> (bs, nq, num_levels, r)
            scale = valid_scales[reference_points.shape[-1]]
            level_references = reference_points[:, :, None] * scale
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
                # the next layer starts from the refined boxes, without gradient (paper)
                refined = apply_box_deltas(reference_points, reg_branches[i](query)).sigmoid()
                reference_points = refined.detach()
            if self.return_intermediate:
                hidden_states.append(query)
                references.append(refined if self.look_forward_twice else reference_points)
        if self.return_intermediate:
            return torch.stack(hidden_states), torch.stack(references)
        return query[None], reference_points[None]
