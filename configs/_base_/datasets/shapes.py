"""The embedded synthetic shapes dataset (COCO format), generated on first use.

``mmdet_deform.ShapesDataset`` generates each split into ``data/shapes/`` the
first time a dataset is built (seconds; skipped when complete, regenerated if
partial), so configs using it need no download. Six classes (circle, square,
triangle, star, ring, cross) in random colours, 2-8 objects per 320x320 image,
sizes 12-160 px (small to large), partial occlusion, textured noisy
backgrounds; 2,000 train and 200 val images.

How to use it. The model configs of this repo (``r50.py`` and its children)
define COCO data keys themselves, and mmengine refuses duplicate keys among a
config's bases, so every piece here carries a ``shapes_`` prefix and a config
inheriting both installs them (see ``deformable_detr/two_stage_shapes.py``)::

    _base_ = ['./two_stage_r50.py', '../_base_/datasets/shapes.py']
    train_dataloader = dict(_delete_=True, **_base_.shapes_train_dataloader)

The evaluator takes its ground truth from the dataset (``ann_file=None``), so
it stays right on a subset (``--cfg-options val_dataloader.dataset.indices=8``).
"""

shapes_dataset_type = 'mmdet_deform.ShapesDataset'
shapes_data_root = 'data/shapes/'
shapes_backend_args = None

# How the images look and the seed: shared by both splits (one place to tune).
shapes_generate = dict(
    seed=0,
    img_size=320,
    min_objects=2,
    max_objects=8,
    min_size=12.0,
    max_size=160.0,
    max_occlusion=0.4,
    noise_std=12.0,
)

shapes_train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=shapes_backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(320, 320), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
shapes_test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=shapes_backend_args),
    dict(type='Resize', scale=(320, 320), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        # 'instances': the raw ground truth, which CocoMetric(ann_file=None) evaluates against
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'instances'),
    ),
]

shapes_train_dataloader = dict(
    batch_size=4,
    num_workers=1,  # 2-core machines: decoding 320 px JPEGs is cheap
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(  # ShapesDataset
        type=shapes_dataset_type,
        data_root=shapes_data_root,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        generate=dict(split='train', num_images=2000, **shapes_generate),
        filter_cfg=dict(filter_empty_gt=False),
        pipeline=shapes_train_pipeline,
        backend_args=shapes_backend_args,
    ),
)
shapes_val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(  # ShapesDataset
        type=shapes_dataset_type,
        data_root=shapes_data_root,
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        generate=dict(split='val', num_images=200, **shapes_generate),
        test_mode=True,
        pipeline=shapes_test_pipeline,
        backend_args=shapes_backend_args,
    ),
)
shapes_test_dataloader = shapes_val_dataloader

shapes_val_evaluator = dict(  # mmdet CocoMetric
    type='CocoMetric',
    ann_file=None,  # ground truth from the dataset: right on subsets too
    metric='bbox',
    format_only=False,
    backend_args=shapes_backend_args,
)
shapes_test_evaluator = shapes_val_evaluator
