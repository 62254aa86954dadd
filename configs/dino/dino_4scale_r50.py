"""DINO, 4 scales, ResNet-50, COCO, 8 GPUs x 2 images, 12 epochs (the
paper's 1x setting; paper: 49.0 box AP, mmdet 3.3's release: 49.0).

Deformable DETR (``../deformable_detr/r50.py``: data, pipeline, backbone,
neck) with the three switches of docs/convergence_switches.md on:
mixed query selection (``as_two_stage``), look forward twice (with
``with_box_refine``) and contrastive denoising (``dn_cfg``). Every switch can
be changed from the command line, e.g. ``--cfg-options model.dn_cfg=None``.
"""

_base_ = '../deformable_detr/r50.py'

model = dict(  # mmdet_deform DINO
    type='mmdet_deform.DINO',
    num_queries=900,  # matching queries
    with_box_refine=True,
    as_two_stage=True,  # mixed query selection
    look_forward_twice=True,
    encoder=dict(  # DeformableDetrTransformerEncoder
        layer_cfg=dict(  # DeformableDetrTransformerEncoderLayer
            self_attn_cfg=dict(dropout=0.0, num_levels=4),  # MultiScaleDeformableAttention
            ffn_cfg=dict(feedforward_channels=2048, ffn_drop=0.0),  # FastFFN
        )
    ),
    decoder=dict(  # DinoTransformerDecoder
        layer_cfg=dict(  # DeformableDetrTransformerDecoderLayer
            self_attn_cfg=dict(dropout=0.0),  # mmcv MultiheadAttention
            cross_attn_cfg=dict(dropout=0.0, num_levels=4),  # MultiScaleDeformableAttention
            ffn_cfg=dict(feedforward_channels=2048, ffn_drop=0.0),  # FastFFN
        )
    ),
    # SinePositionalEncoding
    positional_encoding=dict(num_feats=128, normalize=True, offset=0.0, temperature=20),
    bbox_head=dict(  # mmdet_deform DINOHead
        type='mmdet_deform.DINOHead',
        loss_cls=dict(loss_weight=1.0),  # mmdet FocalLoss
    ),
    dn_cfg=dict(  # CdnQueryGenerator
        label_noise_scale=0.5,
        box_noise_scale=1.0,
        group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=100),
    ),
    test_cfg=dict(max_per_img=300),
)

optim_wrapper = dict(
    optimizer=dict(lr=0.0001),
    paramwise_cfg=dict(_delete_=True, custom_keys={'backbone': dict(lr_mult=0.1)}),
)

max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[11], gamma=0.1)
]

# Do not change: the lr above is for 8 GPUs x 2 images. `--auto-scale-lr`
# rescales it linearly to the actual total batch size.
auto_scale_lr = dict(base_batch_size=16)
