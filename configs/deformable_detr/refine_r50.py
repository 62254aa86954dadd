"""Deformable DETR + iterative box refinement, ResNet-50, COCO, 16 GPUs x 2
images, 50 epochs. Paper: 45.4 box AP; mmdet 3.3's release: 46.2."""

_base_ = './r50.py'
model = dict(with_box_refine=True)
