"""Layers of Deformable DETR."""

from mmdet_deform.ops import MultiScaleDeformableAttention
from mmdet_deform.registry import MODELS

from .duplicate_suppression import suppress_duplicates
from .transformer import (
    CdnQueryGenerator,
    DeformableDetrTransformerDecoder,
    DeformableDetrTransformerDecoderLayer,
    DeformableDetrTransformerEncoder,
    DeformableDetrTransformerEncoderLayer,
    DinoTransformerDecoder,
    get_dn_attn_mask,
    get_encoder_proposals,
    get_encoder_reference_points,
    get_hybrid_attn_mask,
    get_padding_masks,
    get_proposal_pos_embed,
    get_valid_ratios,
)

# Registered in our scope only: mmcv's entry of the same name in mmengine's
# root registry is left untouched.
MODELS.register_module(module=MultiScaleDeformableAttention)

__all__ = [
    'CdnQueryGenerator',
    'DeformableDetrTransformerDecoder',
    'DeformableDetrTransformerDecoderLayer',
    'DeformableDetrTransformerEncoder',
    'DeformableDetrTransformerEncoderLayer',
    'DinoTransformerDecoder',
    'MultiScaleDeformableAttention',
    'get_dn_attn_mask',
    'get_encoder_proposals',
    'get_hybrid_attn_mask',
    'get_encoder_reference_points',
    'get_padding_masks',
    'get_proposal_pos_embed',
    'get_valid_ratios',
    'suppress_duplicates',
]
