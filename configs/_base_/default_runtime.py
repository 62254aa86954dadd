# Runtime shared by every config: our registry scope, hooks, logging.
default_scope = 'mmdet_deform'
custom_imports = dict(imports=['mmdet_deform'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # atomic writes (temp file, fsync, rename): a kill mid-save never leaves a
    # truncated checkpoint behind (mmdet_deform.engine.AtomicLocalBackend)
    checkpoint=dict(type='CheckpointHook', interval=1, backend_args=dict(backend='atomic_local')),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'),
)

# Skip optimizer steps with a non-finite loss or gradient norm; stop after 10 in a row.
custom_hooks = [dict(type='mmdet_deform.NonFiniteCheckHook', max_consecutive=10)]

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
