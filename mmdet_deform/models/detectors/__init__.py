"""Detectors of mmdet_deform."""

from .deformable_detr import DeformableDETR

__all__ = ['DeformableDETR']
