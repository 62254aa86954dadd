"""Datasets of mmdet_deform: the embedded synthetic shapes dataset."""

from .shapes import ShapesDataset
from .shapes_drawing import SHAPE_CLASSES, ShapesRenderParams, render_shapes_image
from .shapes_generator import ShapesDirError, ensure_shapes_split, generate_shapes

__all__ = [
    'SHAPE_CLASSES',
    'ShapesDataset',
    'ShapesDirError',
    'ShapesRenderParams',
    'ensure_shapes_split',
    'generate_shapes',
    'render_shapes_image',
]
