"""Task modules (assigners) of mmdet_deform."""

from .safe_hungarian_assigner import SafeHungarianAssigner

__all__ = ['SafeHungarianAssigner']
