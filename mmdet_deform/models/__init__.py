"""Models of mmdet_deform, registered in the ``mmdet_deform`` scope."""

from .layers import *  # noqa: F401,F403
