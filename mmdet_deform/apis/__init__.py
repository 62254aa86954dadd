"""Steps a user calls explicitly on a model."""

from .optimize import FoldedConv2d, optimize_for_inference

__all__ = ['FoldedConv2d', 'optimize_for_inference']
