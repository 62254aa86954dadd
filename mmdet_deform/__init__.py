"""mmdet_deform: Deformable DETR for the OpenMMLab stack.

``import mmdet_deform`` registers

* the compiled op ``torch.ops.mmdet_deform.ms_deform_attn`` (and its
  backward), which needs torch only;
* with mmengine/mmdet installed: the ``mmdet_deform`` registry scope (child
  registries of mmdet's, see :mod:`mmdet_deform.registry`), the model,
  dataset, hook and runner classes.

Importing it changes nothing else in the process: in particular torch's
``weights_only`` allow-list stays as it was (this package's own checkpoint
loads allow what they need for the duration of the call, see
:mod:`mmdet_deform.engine.checkpoint`).
"""

import importlib.util

from . import ops
from .version import __version__, version_info

__all__ = ['__version__', 'ops', 'version_info']

if importlib.util.find_spec('mmdet') is not None:  # torch-only installs keep the op
    from . import datasets, engine, models, registry  # noqa: F401  (registers classes)
