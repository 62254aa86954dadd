"""Datasets of mmdet_deform."""
