# Runtime shared by every config: our registry scope, hooks, logging.
default_scope = 'mmdet_deform'
custom_imports = dict(imports=['mmdet_deform'], allow_failed_imports=False)
# loads checkpoints as data and ignores the config embedded in one on resume
# (mmdet_deform.engine.runner); mmdet's and mmengine's tools build it too
runner_type = 'mmdet_deform.SafeRunner'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # a kill at any moment leaves a complete checkpoint: atomic writes (temp file,
    # fsync, rename: mmdet_deform.engine.AtomicLocalBackend), outdated checkpoints
    # removed only after the new one is saved (mmdet_deform.AtomicCheckpointHook)
    checkpoint=dict(
        type='mmdet_deform.AtomicCheckpointHook',
        interval=1,
        backend_args=dict(backend='atomic_local'),
    ),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'),
)

custom_hooks = [
    # skip optimizer steps with a non-finite loss or gradient norm; stop after 10 in a row
    dict(type='mmdet_deform.NonFiniteCheckHook', max_consecutive=10),
    # checkpoints hold the random generators' state; --resume restores it
    dict(type='mmdet_deform.RNGStateHook'),
]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # tools/train.py switches to gloo where CUDA is not available
    dist_cfg=dict(backend='nccl'),
)

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)

log_level = 'INFO'
load_from = None
resume = False
