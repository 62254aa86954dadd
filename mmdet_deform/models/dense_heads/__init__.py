"""Dense heads of mmdet_deform."""

from .deformable_detr_head import DeformableDETRHead

__all__ = ['DeformableDETRHead']
