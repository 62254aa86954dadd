"""Deformable DETR with iterative box refinement (single stage) on the shapes
dataset: the recipe of ``two_stage_shapes.py`` with ``as_two_stage=False``.

One of the runs compared in ``docs/convergence.md``.
"""

_base_ = './two_stage_shapes.py'
model = dict(as_two_stage=False)
