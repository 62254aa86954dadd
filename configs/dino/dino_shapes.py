"""DINO on the embedded shapes dataset: ``two_stage_shapes.py``'s recipe
(data, backbone, widths, depths, schedule) with DINO's three switches on:
mixed query selection, look forward twice and contrastive denoising.

Each switch can be turned off from the command line, e.g.
``--cfg-options model.dn_cfg=None model.look_forward_twice=False`` (mixed
query selection alone); docs/convergence.md compares them.
"""

_base_ = '../deformable_detr/two_stage_shapes.py'

model = dict(  # mmdet_deform DINO
    type='mmdet_deform.DINO',
    with_box_refine=True,
    as_two_stage=True,  # mixed query selection
    look_forward_twice=True,
    bbox_head=dict(type='mmdet_deform.DINOHead'),
    dn_cfg=dict(  # CdnQueryGenerator
        label_noise_scale=0.5,
        box_noise_scale=1.0,
        # an image holds at most 8 shapes: 100 // 8 = 12 groups of positive and
        # negative copies
        group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=100),
    ),
)
