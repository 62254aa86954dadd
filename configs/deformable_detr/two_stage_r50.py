"""Two-stage Deformable DETR with box refinement, ResNet-50, COCO, 16 GPUs x 2
images, 50 epochs. Paper: 46.2 box AP; mmdet 3.3's release: 47.0."""

_base_ = './refine_r50.py'
model = dict(as_two_stage=True)
