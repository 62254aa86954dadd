"""mmdet_deform: Deformable DETR for the OpenMMLab stack.

``import mmdet_deform`` registers

* the compiled op ``torch.ops.mmdet_deform.ms_deform_attn`` (and its
  backward), which needs torch only;
* with mmengine/mmdet installed: the ``mmdet_deform`` registry scope (child
  registries of mmdet's, see :mod:`mmdet_deform.registry`), the model,
  dataset and hook classes, and the allow-list that lets torch >= 2.6 load
  mmengine checkpoints with ``weights_only=True``.
"""

import importlib.util

from . import ops
from .version import __version__, version_info

__all__ = ['__version__', 'ops', 'version_info']

if importlib.util.find_spec('mmdet') is not None:  # torch-only installs keep the op
    from .engine.checkpoint import allow_mmengine_checkpoint_globals

    allow_mmengine_checkpoint_globals()
    from . import datasets, engine, models, registry  # noqa: F401  (registers classes)
