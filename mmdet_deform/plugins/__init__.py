"""Opt-in switches that change how other packages' models are built.

Nothing here runs on ``import mmdet_deform`` or ``import mmdet_deform.plugins``:
each switch is a module of its own and acts when it is imported, typically
from a config's ``custom_imports``:

* :mod:`mmdet_deform.plugins.mmcv_msda`: mmdet's own models (DINO, DDQ-DETR,
  Grounding DINO, Deformable DETR, Mask2Former's pixel decoder) built after
  the import use :class:`mmdet_deform.ops.MultiScaleDeformableAttention`
  instead of mmcv's module of the same name (see ``docs/plugins.md``).
"""
