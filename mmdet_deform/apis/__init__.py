"""Explicit steps a user calls: inference with checked inputs and checkpoints loaded as data."""

from .inference import (
    SafeDetInferencer,
    check_inference_image,
    image_path_problem,
    inference_detector,
    init_detector,
    load_weights,
)

__all__ = [
    'SafeDetInferencer',
    'check_inference_image',
    'image_path_problem',
    'inference_detector',
    'init_detector',
    'load_weights',
]
