"""Explicit steps a user calls: inference with checked inputs and checkpoints
loaded as data, and the opt-in inference optimisation."""

from .inference import (
    SafeDetInferencer,
    check_inference_image,
    image_path_problem,
    inference_detector,
    init_detector,
    load_weights,
)
from .optimize import FoldedConv2d, optimize_for_inference

__all__ = [
    'FoldedConv2d',
    'SafeDetInferencer',
    'check_inference_image',
    'image_path_problem',
    'inference_detector',
    'init_detector',
    'load_weights',
    'optimize_for_inference',
]
