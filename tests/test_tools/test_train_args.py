"""tools/train.py argument handling: --cfg-options reach the built model and
runner (nested dicts, list items, tuples), --amp, --auto-scale-lr, --resume,
and the CPU distributed settings."""

import os.path as osp

import pytest
import torch

from mmdet_deform.engine import AutocastOptimWrapper
from mmdet_deform.utils import build_runner, enable_amp, enable_auto_scale_lr, load_config

from ..conftest import REPO_ROOT
from .conftest import CONFIG, load_tool, smoke_options

CONFIG_PATH = osp.join(REPO_ROOT, CONFIG)


@pytest.fixture(scope='module')
def train_tool():
    return load_tool('tools/train.py')


def _cfg(train_tool, tmp_path, *extra):
    args = train_tool.parse_args([CONFIG_PATH, '--work-dir', str(tmp_path), *extra])
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    return args, cfg


def test_cfg_options_reach_the_built_model_and_runner(train_tool, tmp_path):
    _, cfg = _cfg(
        train_tool,
        tmp_path,
        '--cfg-options',
        # the epoch-based scheduler reads len(train_dataloader): a tiny dataset in tmp
        *smoke_options(str(tmp_path / 'shapes')),
        'model.num_queries=50',
        'optim_wrapper.optimizer.lr=1e-3',
        'model.backbone.out_indices=(1,2,3)',  # a tuple
        'train_dataloader.dataset.pipeline.2.scale=(128,96)',  # an item of a list
        'param_scheduler.1.T_max=3',  # a key of a list item
        'model.encoder.layer_cfg.ffn_cfg.feedforward_channels=64',  # deeply nested
    )
    assert cfg.train_dataloader.dataset.pipeline[2].scale == (128, 96)  # later option wins
    runner = build_runner(cfg)
    model = runner.model
    assert model.num_queries == 50
    assert tuple(model.backbone.out_indices) == (1, 2, 3)
    assert model.encoder.layers[0].ffn.layers[0][0].out_features == 64
    optim_wrapper = runner.optim_wrapper = runner.build_optim_wrapper(cfg.optim_wrapper)
    lrs = sorted({round(g['lr'], 12) for g in optim_wrapper.optimizer.param_groups})
    # backbone and transformer at 1e-3 (lr_mult 1), sampling_offsets and
    # reference_points at lr_mult 0.1 (paramwise_cfg of the schedule)
    assert lrs == [1e-4, 1e-3]
    scheduler = runner.build_param_scheduler(cfg.param_scheduler)
    # the cosine schedule, by epoch, converted to iterations: 16 images / batch 4
    assert scheduler[1].T_max == 3 * 4
    assert runner.work_dir == str(tmp_path)


def test_work_dir_defaults_to_the_config_name(train_tool):
    args = train_tool.parse_args([CONFIG_PATH])
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    assert cfg.work_dir == osp.join('./work_dirs', 'two_stage_shapes')


def test_amp_on_cpu_is_bf16_autocast(train_tool, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('on CUDA --amp is mmengine fp16 AmpOptimWrapper')
    args, cfg = _cfg(train_tool, tmp_path, '--amp')
    assert args.amp
    enable_amp(cfg)
    assert cfg.optim_wrapper.type == 'mmdet_deform.AutocastOptimWrapper'
    runner = build_runner(cfg)
    wrapper = runner.build_optim_wrapper(cfg.optim_wrapper)
    assert isinstance(wrapper, AutocastOptimWrapper)
    layer = torch.nn.Linear(4, 4)
    with wrapper.optim_context(layer):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_autocast_wrapper_refuses_fp16():
    with pytest.raises(ValueError, match='dtype'):
        AutocastOptimWrapper(dtype='float16', optimizer=torch.optim.SGD([torch.ones(1)], lr=1))


def test_auto_scale_lr(train_tool, tmp_path):
    _, cfg = _cfg(train_tool, tmp_path, '--auto-scale-lr')
    enable_auto_scale_lr(cfg)
    assert cfg.auto_scale_lr.enable is True and cfg.auto_scale_lr.base_batch_size == 4
    cfg.pop('auto_scale_lr')
    with pytest.raises(RuntimeError, match='base_batch_size'):
        enable_auto_scale_lr(cfg)


def test_pytorch_launcher_without_cuda_uses_gloo(train_tool, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('with CUDA the config keeps its nccl backend')
    _, cfg = _cfg(train_tool, tmp_path, '--launcher', 'pytorch')
    assert cfg.launcher == 'pytorch'
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert cfg.model_wrapper_cfg.device_ids is None


def test_bad_arguments_are_reported(train_tool, tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.py'):
        load_config(str(tmp_path / 'nope.py'))
    with pytest.raises(ValueError, match='launcher'):
        load_config(CONFIG_PATH, launcher='ssh')
    with pytest.raises(SystemExit):
        train_tool.parse_args([CONFIG_PATH, '--launcher', 'ssh'])
