# Deformable DETR schedule (paper / mmdet): AdamW 2e-4, 50 epochs, lr x0.1 at 40.
optim_wrapper = dict(
    type='OptimWrapper',
    # fused: one multi-tensor kernel per step instead of ~10 ops per parameter
    optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001, fused=True),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(
        custom_keys={
            'backbone': dict(lr_mult=0.1),
            'sampling_offsets': dict(lr_mult=0.1),
            'reference_points': dict(lr_mult=0.1),
        }
    ),
)

max_epochs = 50
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[40], gamma=0.1)
]

# Do not change: the lr above is for 16 GPUs x 2 images. `--auto-scale-lr`
# rescales it linearly to the actual total batch size.
auto_scale_lr = dict(base_batch_size=32)
