"""Task modules (assigners) of mmdet_deform."""

from .one_to_many_assigner import OneToManyAssigner
from .safe_hungarian_assigner import SafeHungarianAssigner

__all__ = ['OneToManyAssigner', 'SafeHungarianAssigner']
