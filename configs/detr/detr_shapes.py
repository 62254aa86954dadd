"""mmdet's own DETR on the shapes dataset: the baseline of ``docs/convergence.md``.

The model is mmdet 3.3's ``DETR`` (built from mmdet's registry, not part of
this package), given what applies of ``deformable_detr/two_stage_shapes.py``:
the same data, pipeline, schedule, optimizer and batch size (all inherited),
the same from-scratch backbone, embedding width, layer counts, feed-forward
width, number of queries and dropout. What differs is what makes DETR DETR: a
single feature map (the backbone's last stage, stride 32), global multi-head
attention in the encoder and decoder, a softmax classifier with a
no-object class and a classification match cost.
"""

_base_ = '../deformable_detr/two_stage_shapes.py'

# What this baseline mirrors from the deformable recipe.
embed_dims = _base_.model.neck.out_channels
detr_attn_cfg = dict(  # mmcv MultiheadAttention
    embed_dims=embed_dims,
    num_heads=8,
    dropout=_base_.model.decoder.layer_cfg.self_attn_cfg.dropout,
    batch_first=True,
)
detr_ffn_cfg = dict(  # mmcv FFN
    embed_dims=embed_dims,
    feedforward_channels=_base_.model.encoder.layer_cfg.ffn_cfg.feedforward_channels,
    num_fcs=2,
    ffn_drop=_base_.model.encoder.layer_cfg.ffn_cfg.ffn_drop,
    act_cfg=dict(type='ReLU', inplace=True),
)

model = dict(
    _delete_=True,
    type='mmdet.DETR',
    num_queries=_base_.model.num_queries,
    data_preprocessor=_base_.model.data_preprocessor,
    backbone=dict(_base_.model.backbone, out_indices=(3,)),  # mmdet ResNet, last stage only
    neck=dict(  # mmdet ChannelMapper
        type='ChannelMapper',
        in_channels=[_base_.model.neck.in_channels[-1]],
        kernel_size=1,
        out_channels=embed_dims,
        act_cfg=None,
        norm_cfg=None,
        num_outs=1,
    ),
    encoder=dict(  # mmdet DetrTransformerEncoder
        num_layers=_base_.model.encoder.num_layers,
        layer_cfg=dict(self_attn_cfg=detr_attn_cfg, ffn_cfg=detr_ffn_cfg),
    ),
    decoder=dict(  # mmdet DetrTransformerDecoder
        num_layers=_base_.model.decoder.num_layers,
        layer_cfg=dict(
            self_attn_cfg=detr_attn_cfg, cross_attn_cfg=detr_attn_cfg, ffn_cfg=detr_ffn_cfg
        ),
        return_intermediate=True,
    ),
    positional_encoding=dict(num_feats=embed_dims // 2, normalize=True),
    bbox_head=dict(  # mmdet DETRHead
        type='mmdet.DETRHead',
        num_classes=_base_.model.bbox_head.num_classes,
        embed_dims=embed_dims,
        loss_cls=dict(  # mmdet CrossEntropyLoss
            type='CrossEntropyLoss',
            bg_cls_weight=0.1,
            use_sigmoid=False,
            loss_weight=1.0,
            class_weight=1.0,
        ),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),  # mmdet L1Loss
        loss_iou=dict(type='GIoULoss', loss_weight=2.0),  # mmdet GIoULoss
    ),
    train_cfg=dict(
        assigner=dict(  # mmdet HungarianAssigner
            type='HungarianAssigner',
            match_costs=[
                dict(type='ClassificationCost', weight=1.0),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0),
            ],
        )
    ),
    test_cfg=dict(max_per_img=_base_.model.test_cfg.max_per_img),  # mmdet's DETR: no nms
)
