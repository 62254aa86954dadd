"""Deformable DETR, ResNet-50, COCO, 16 GPUs x 2 images, 50 epochs.

Paper: 43.8 box AP; mmdet 3.3's release: 44.3. 8 GPUs x 4 images reach the
same total batch: ``tools/dist_train.sh configs/deformable_detr/r50.py 8
--cfg-options train_dataloader.batch_size=4``.
"""

_base_ = [
    '../_base_/datasets/coco_detection.py',
    '../_base_/schedules/deformable_detr_50e.py',
    '../_base_/default_runtime.py',
]

model = dict(  # mmdet_deform DeformableDETR
    type='mmdet_deform.DeformableDETR',
    num_queries=300,
    num_feature_levels=4,
    with_box_refine=False,
    as_two_stage=False,
    data_preprocessor=dict(  # mmdet DetDataPreprocessor
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1,
    ),
    backbone=dict(  # mmdet ResNet
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50'),
    ),
    neck=dict(  # mmdet ChannelMapper
        type='ChannelMapper',
        in_channels=[512, 1024, 2048],
        kernel_size=1,
        out_channels=256,
        act_cfg=None,
        norm_cfg=dict(type='GN', num_groups=32),
        num_outs=4,
    ),
    encoder=dict(  # DeformableDetrTransformerEncoder
        num_layers=6,
        layer_cfg=dict(  # DeformableDetrTransformerEncoderLayer
            self_attn_cfg=dict(embed_dims=256, batch_first=True),  # MultiScaleDeformableAttention
            ffn_cfg=dict(embed_dims=256, feedforward_channels=1024, ffn_drop=0.1),  # FastFFN
        ),
    ),
    decoder=dict(  # DeformableDetrTransformerDecoder
        num_layers=6,
        return_intermediate=True,
        layer_cfg=dict(  # DeformableDetrTransformerDecoderLayer
            self_attn_cfg=dict(  # mmcv MultiheadAttention
                embed_dims=256, num_heads=8, dropout=0.1, batch_first=True
            ),
            cross_attn_cfg=dict(embed_dims=256, batch_first=True),  # MultiScaleDeformableAttention
            ffn_cfg=dict(embed_dims=256, feedforward_channels=1024, ffn_drop=0.1),  # FastFFN
        ),
        post_norm_cfg=None,
    ),
    positional_encoding=dict(num_feats=128, normalize=True, offset=-0.5),  # SinePositionalEncoding
    bbox_head=dict(  # mmdet_deform DeformableDETRHead
        type='mmdet_deform.DeformableDETRHead',
        num_classes=80,
        sync_cls_avg_factor=True,
        loss_cls=dict(  # mmdet FocalLoss
            type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0
        ),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),  # mmdet L1Loss
        loss_iou=dict(type='GIoULoss', loss_weight=2.0),  # mmdet GIoULoss
    ),
    train_cfg=dict(  # training settings of the head
        # mmdet's HungarianAssigner, safe for non-finite predictions (the
        # NonFiniteCheckHook then skips the step instead of scipy raising)
        assigner=dict(  # mmdet_deform SafeHungarianAssigner
            type='mmdet_deform.SafeHungarianAssigner',
            match_costs=[
                dict(type='FocalLossCost', weight=2.0),  # mmdet FocalLossCost
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),  # mmdet BBoxL1Cost
                dict(type='IoUCost', iou_mode='giou', weight=2.0),  # mmdet IoUCost
            ],
        )
    ),
    test_cfg=dict(max_per_img=100),  # testing settings of the head
)

# mmdet's DETR train pipeline: multi-scale resize, or resize + random crop +
# resize (the crop branch of the original implementation).
multi_scales = [
    (480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
    (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333),
]  # fmt: skip
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=multi_scales, keep_ratio=True)],
            [
                dict(
                    type='RandomChoiceResize',
                    scales=[(400, 4200), (500, 4200), (600, 4200)],
                    keep_ratio=True,
                ),
                dict(
                    type='RandomCrop',
                    crop_type='absolute_range',
                    crop_size=(384, 600),
                    allow_negative_crop=True,
                ),
                dict(type='RandomChoiceResize', scales=multi_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(
    dataset=dict(filter_cfg=dict(filter_empty_gt=False), pipeline=train_pipeline)
)
