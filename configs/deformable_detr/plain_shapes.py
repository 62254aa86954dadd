"""Plain Deformable DETR (no box refinement, single stage) on the shapes
dataset: the recipe of ``two_stage_shapes.py`` with both options off.

One of the runs compared in ``docs/convergence.md``.
"""

_base_ = './refine_shapes.py'
model = dict(with_box_refine=False, look_forward_twice=False)  # needs box refinement
