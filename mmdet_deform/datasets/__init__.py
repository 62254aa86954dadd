"""Datasets of mmdet_deform: COCO with checks, the embedded synthetic shapes dataset, and the
image check of inference pipelines."""

from .check_image import CheckImage, add_image_check, check_image_array
from .checked_coco import CheckedCocoDataset, CorruptImageError, image_file_problem
from .shapes import ShapesDataset
from .shapes_drawing import SHAPE_CLASSES, ShapesRenderParams, render_shapes_image
from .shapes_generator import ShapesDirError, ensure_shapes_split, generate_shapes

__all__ = [
    'SHAPE_CLASSES',
    'CheckImage',
    'CheckedCocoDataset',
    'CorruptImageError',
    'ShapesDataset',
    'ShapesDirError',
    'ShapesRenderParams',
    'add_image_check',
    'check_image_array',
    'ensure_shapes_split',
    'generate_shapes',
    'image_file_problem',
    'render_shapes_image',
]
