"""Datasets of mmdet_deform: COCO with checks, and the embedded synthetic shapes dataset."""

from .checked_coco import CheckedCocoDataset, CorruptImageError, image_file_problem
from .shapes import ShapesDataset
from .shapes_drawing import SHAPE_CLASSES, ShapesRenderParams, render_shapes_image
from .shapes_generator import ShapesDirError, ensure_shapes_split, generate_shapes

__all__ = [
    'SHAPE_CLASSES',
    'CheckedCocoDataset',
    'CorruptImageError',
    'ShapesDataset',
    'ShapesDirError',
    'ShapesRenderParams',
    'ensure_shapes_split',
    'generate_shapes',
    'image_file_problem',
    'render_shapes_image',
]
