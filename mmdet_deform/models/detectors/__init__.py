"""Detectors of mmdet_deform."""

from .deformable_detr import DeformableDETR
from .dino import DINO

__all__ = ['DINO', 'DeformableDETR']
