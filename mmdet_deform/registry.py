"""Registries of the ``mmdet_deform`` scope.

Every registry here is a child of mmdet's registry of the same kind (the
pattern mmyolo and mmrotate use), so that inside the ``mmdet_deform`` scope

* our own classes (``DeformableDETR``, ``DeformableDETRHead``,
  ``MultiScaleDeformableAttention``, the shapes dataset, our hooks) are found
  first, without touching mmdet's entries of the same names;
* anything we do not register (``ResNet``, ``ChannelMapper``, losses,
  assigners, transforms, ``CocoMetric``...) is found in mmdet's parent
  registry, and from there in mmengine's root.

Configs name our classes scope-qualified (``type='mmdet_deform.DeformableDETR'``)
so that they build to *our* classes even when the caller's default scope is
``mmdet`` (``DetInferencer`` and ``init_detector`` default to it): mmengine
resolves ``<scope>.<name>`` through the registry tree from any node.

mmdet fills its registries lazily (each imports its ``locations`` on first
use), and a child's lookup walks its parents without triggering their
imports, so every child here lists its parent's locations after its own.

A registered model class must be an ``mmengine.model.BaseModule`` built from
keyword arguments; a registered dataset must be an ``mmengine`` ``BaseDataset``.
"""

from typing import Sequence

from mmdet.registry import DATA_SAMPLERS as MMDET_DATA_SAMPLERS
from mmdet.registry import DATASETS as MMDET_DATASETS
from mmdet.registry import EVALUATOR as MMDET_EVALUATOR
from mmdet.registry import HOOKS as MMDET_HOOKS
from mmdet.registry import LOG_PROCESSORS as MMDET_LOG_PROCESSORS
from mmdet.registry import LOOPS as MMDET_LOOPS
from mmdet.registry import METRICS as MMDET_METRICS
from mmdet.registry import MODEL_WRAPPERS as MMDET_MODEL_WRAPPERS
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMDET_OPTIM_WRAPPER_CONSTRUCTORS
from mmdet.registry import OPTIM_WRAPPERS as MMDET_OPTIM_WRAPPERS
from mmdet.registry import OPTIMIZERS as MMDET_OPTIMIZERS
from mmdet.registry import PARAM_SCHEDULERS as MMDET_PARAM_SCHEDULERS
from mmdet.registry import RUNNER_CONSTRUCTORS as MMDET_RUNNER_CONSTRUCTORS
from mmdet.registry import RUNNERS as MMDET_RUNNERS
from mmdet.registry import TASK_UTILS as MMDET_TASK_UTILS
from mmdet.registry import TRANSFORMS as MMDET_TRANSFORMS
from mmdet.registry import VISBACKENDS as MMDET_VISBACKENDS
from mmdet.registry import VISUALIZERS as MMDET_VISUALIZERS
from mmdet.registry import WEIGHT_INITIALIZERS as MMDET_WEIGHT_INITIALIZERS
from mmengine.registry import Registry

SCOPE = 'mmdet_deform'


def _child(name: str, parent: Registry, locations: Sequence[str] = ()) -> Registry:
    """A registry of the ``mmdet_deform`` scope under ``parent`` (mmdet's),
    importing our ``locations`` and then the parent's on first use."""
    return Registry(
        name, parent=parent, scope=SCOPE, locations=[*locations, *(parent._locations or [])]
    )


RUNNERS = _child('runner', MMDET_RUNNERS)
RUNNER_CONSTRUCTORS = _child('runner constructor', MMDET_RUNNER_CONSTRUCTORS)
LOOPS = _child('loop', MMDET_LOOPS)
HOOKS = _child('hook', MMDET_HOOKS, ['mmdet_deform.engine.hooks'])
DATASETS = _child('dataset', MMDET_DATASETS, ['mmdet_deform.datasets'])
DATA_SAMPLERS = _child('data sampler', MMDET_DATA_SAMPLERS)
TRANSFORMS = _child('transform', MMDET_TRANSFORMS, ['mmdet_deform.datasets'])
MODELS = _child('model', MMDET_MODELS, ['mmdet_deform.models'])
MODEL_WRAPPERS = _child('model_wrapper', MMDET_MODEL_WRAPPERS)
WEIGHT_INITIALIZERS = _child('weight initializer', MMDET_WEIGHT_INITIALIZERS)
OPTIMIZERS = _child('optimizer', MMDET_OPTIMIZERS)
OPTIM_WRAPPERS = _child('optim_wrapper', MMDET_OPTIM_WRAPPERS, ['mmdet_deform.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = _child(
    'optimizer wrapper constructor', MMDET_OPTIM_WRAPPER_CONSTRUCTORS
)
PARAM_SCHEDULERS = _child('parameter scheduler', MMDET_PARAM_SCHEDULERS)
METRICS = _child('metric', MMDET_METRICS)
EVALUATOR = _child('evaluator', MMDET_EVALUATOR)
TASK_UTILS = _child('task util', MMDET_TASK_UTILS)
VISUALIZERS = _child('visualizer', MMDET_VISUALIZERS)
VISBACKENDS = _child('vis_backend', MMDET_VISBACKENDS)
LOG_PROCESSORS = _child('log_processor', MMDET_LOG_PROCESSORS)
