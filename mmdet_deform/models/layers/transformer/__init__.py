"""Deformable DETR transformer: encoder/decoder layers, reference-point
geometry and two-stage proposals."""

from .deformable_detr_layers import (
    DeformableDetrTransformerDecoder,
    DeformableDetrTransformerDecoderLayer,
    DeformableDetrTransformerEncoder,
    DeformableDetrTransformerEncoderLayer,
)
from .denoising import CdnQueryGenerator, get_dn_attn_mask
from .dino_layers import DinoTransformerDecoder
from .hybrid import get_hybrid_attn_mask
from .proposals import get_encoder_proposals, get_proposal_pos_embed
from .reference_points import (
    apply_box_deltas,
    get_encoder_reference_points,
    get_padding_masks,
    get_valid_ratios,
    get_valid_sizes,
)

__all__ = [
    'apply_box_deltas',
    'CdnQueryGenerator',
    'DeformableDetrTransformerDecoder',
    'DeformableDetrTransformerDecoderLayer',
    'DeformableDetrTransformerEncoder',
    'DeformableDetrTransformerEncoderLayer',
    'DinoTransformerDecoder',
    'get_dn_attn_mask',
    'get_encoder_proposals',
    'get_hybrid_attn_mask',
    'get_encoder_reference_points',
    'get_padding_masks',
    'get_proposal_pos_embed',
    'get_valid_ratios',
    'get_valid_sizes',
]
