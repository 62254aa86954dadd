"""Hooks of mmdet_deform, registered in the ``mmdet_deform`` scope."""
