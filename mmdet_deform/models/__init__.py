"""Models of mmdet_deform, registered in the ``mmdet_deform`` scope."""

from .dense_heads import *  # noqa: F401,F403
from .detectors import *  # noqa: F401,F403
from .layers import *  # noqa: F401,F403
