"""mmdet's own models with this package's multi-scale deformable attention.

mmdet 3.x builds mmcv's ``MultiScaleDeformableAttention`` directly in its
code (Deformable DETR, DINO, DDQ-DETR, Grounding DINO, Mask2Former's pixel
decoder); on the CPU that module samples with ``F.grid_sample``. Importing
this module makes every such model built afterwards use
:class:`mmdet_deform.ops.MultiScaleDeformableAttention` instead: a drop-in
with the same arguments, parameter names, initialisation and forward
semantics, running on the compiled op. Checkpoints load unchanged
(``strict=True``), in both directions. In a config::

    custom_imports = dict(
        imports=['mmdet_deform.plugins.mmcv_msda'], allow_failed_imports=False)

What the import patches, exactly, is the global name
``MultiScaleDeformableAttention`` (mmcv's class) of these modules:

* bound to our class (:data:`CLASS_MODULES`) where mmdet builds the module,
  ``mmdet.models.layers.transformer.deformable_detr_layers`` (the encoder and
  decoder layers of Deformable DETR, DINO, DDQ-DETR and Mask2Former's pixel
  decoder) and ``mmdet.models.layers.transformer.grounding_dino_layers``,
  and where code imported later takes the name from, ``mmcv.ops`` and
  ``mmcv.cnn.bricks.transformer``;
* bound to the tuple ``(ours, mmcv's)`` (:data:`ISINSTANCE_MODULES`) where
  mmdet only tests ``isinstance(m, MultiScaleDeformableAttention)`` to
  re-initialise every deformable attention in ``init_weights``:
  ``mmdet.models.detectors.{deformable_detr,dino,ddq_detr}`` and
  ``mmdet.models.layers.msdeformattn_pixel_decoder``, so that
  ``init_weights`` treats both kinds alike;

and the entry ``MultiScaleDeformableAttention`` of mmengine's root ``MODELS``
registry is ours (configs with ``type='MultiScaleDeformableAttention'``,
e.g. through mmcv's ``build_attention``).

mmcv's own module ``mmcv.ops.multi_scale_deform_attn`` is left alone (its
class and functions stay mmcv's), and models built before the import keep
the module they were built with. The switch is process-wide. Importing the
module again does nothing; :func:`revert` undoes the switch and
:func:`apply` redoes it (both idempotent).
"""

import importlib
import sys
from typing import Dict, Optional

from mmengine.registry import MODELS

from ..ops import MultiScaleDeformableAttention

__all__ = [
    'CLASS_MODULES',
    'ISINSTANCE_MODULES',
    'PATCHED_MODULES',
    'apply',
    'is_applied',
    'revert',
]

NAME = 'MultiScaleDeformableAttention'

# Modules whose global ``MultiScaleDeformableAttention`` is rebound; those an
# older mmdet 3.x lacks (ddq_detr, grounding_dino_layers) are skipped.
# Where the class is built or exported: bound to ours.
CLASS_MODULES = (
    'mmcv.ops',
    'mmcv.cnn.bricks.transformer',
    'mmdet.models.layers.transformer.deformable_detr_layers',
    'mmdet.models.layers.transformer.grounding_dino_layers',
)
# Where it is only the second argument of isinstance: bound to (ours, mmcv's).
ISINSTANCE_MODULES = (
    'mmdet.models.layers.msdeformattn_pixel_decoder',
    'mmdet.models.detectors.deformable_detr',
    'mmdet.models.detectors.dino',
    'mmdet.models.detectors.ddq_detr',
)
PATCHED_MODULES = CLASS_MODULES + ISINSTANCE_MODULES
_REGISTRY = 'mmengine.registry.MODELS'

# What apply() replaced, by module name (or _REGISTRY), for revert().
_replaced: Dict[str, type] = {}


def _is_ours(name: str, value: object) -> bool:
    """Whether ``value`` is what :func:`apply` binds in module ``name``."""
    if name in ISINSTANCE_MODULES:
        return isinstance(value, tuple) and MultiScaleDeformableAttention in value
    return value is MultiScaleDeformableAttention


def _import(name: str) -> Optional[object]:
    """The module ``name``, or None where this mmdet/mmcv does not have it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def apply() -> None:
    """Rebind ``MultiScaleDeformableAttention`` to
    :class:`mmdet_deform.ops.MultiScaleDeformableAttention` wherever this
    module's docstring lists; places already switched are left as they are."""
    for name in PATCHED_MODULES:
        module = _import(name)
        current = getattr(module, NAME, None)
        if current is None or _is_ours(name, current):
            continue
        _replaced[name] = current
        if name in ISINSTANCE_MODULES:
            setattr(module, NAME, (MultiScaleDeformableAttention, current))
        else:
            setattr(module, NAME, MultiScaleDeformableAttention)
    current = MODELS.module_dict.get(NAME)
    if current is not MultiScaleDeformableAttention:
        if current is not None:
            _replaced[_REGISTRY] = current
        MODELS.register_module(name=NAME, module=MultiScaleDeformableAttention, force=True)


def revert() -> None:
    """Put back what :func:`apply` replaced (where it is still ours); models
    built afterwards use mmcv's module again."""
    for name, original in list(_replaced.items()):
        if name == _REGISTRY:
            if MODELS.module_dict.get(NAME) is MultiScaleDeformableAttention:
                MODELS.register_module(name=NAME, module=original, force=True)
        else:
            module = sys.modules[name]
            if _is_ours(name, getattr(module, NAME, None)):
                setattr(module, NAME, original)
        del _replaced[name]


def is_applied() -> bool:
    """Whether every patched place (that this mmdet/mmcv has) holds ours."""
    for name in PATCHED_MODULES:
        current = getattr(sys.modules.get(name), NAME, None)
        if current is not None and not _is_ours(name, current):
            return False
    return MODELS.module_dict.get(NAME) is MultiScaleDeformableAttention


apply()
