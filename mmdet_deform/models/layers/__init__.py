"""Layers of Deformable DETR."""

from mmdet_deform.ops import MultiScaleDeformableAttention
from mmdet_deform.registry import MODELS

# Registered in our scope only: mmcv's entry of the same name in mmengine's
# root registry is left untouched.
MODELS.register_module(module=MultiScaleDeformableAttention)

__all__ = ['MultiScaleDeformableAttention']
