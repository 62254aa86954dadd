"""Time the training step of one of mmdet's own models with mmcv's
MultiScaleDeformableAttention and with ours (``mmdet_deform.plugins.mmcv_msda``),
side by side, with the same weights.

Both models are built by ``mmdet.apis.init_detector`` from the same mmdet
config (default: mmdet's packaged DINO, ``dino/dino-4scale_r50_8xb2-12e_coco.py``,
full size, random weights, nothing downloaded): first with the switch
reverted (mmcv's module, whose CPU path is ``F.grid_sample``), then with it
applied (ours). The first model's initialised weights are loaded into the
second with ``strict=True``; each trains with the config's optimizer wrapper.
A training step is ``data_preprocessor -> loss -> backward -> clip +
optimizer step`` on a batch of random images with random boxes (as
``benchmark_train_step.py``); the two models take turns, so a change of
machine load hits both. Prints every step and a table of medians::

    OMP_NUM_THREADS=2 python tools/analysis_tools/benchmark_mmdet_plugin.py --threads 2
"""

import argparse
import importlib.util
import logging
import os.path as osp
import warnings
from types import ModuleType
from typing import Dict, List, Optional

import torch
from mmengine.config import DictAction

MMDET_CONFIG = 'dino/dino-4scale_r50_8xb2-12e_coco.py'
NAMES = ('mmcv', 'ours')  # (module of the model, its label)


def load_train_step_tool() -> ModuleType:
    """``benchmark_train_step.py`` (its batch, timers and step), from beside
    this file."""
    path = osp.join(osp.dirname(osp.abspath(__file__)), 'benchmark_train_step.py')
    spec = importlib.util.spec_from_file_location('benchmark_train_step', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--config',
        default=MMDET_CONFIG,
        help="mmdet's config, relative to mmdet's packaged configs or a path",
    )
    parser.add_argument('--batch-size', type=int, default=2, help='training batch size')
    parser.add_argument('--shape', type=int, nargs=2, default=(512, 672), metavar=('H', 'W'))
    parser.add_argument('--iters', type=int, default=3, help='timed steps per model')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per model')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        default={},
        help='overrides applied to the config, e.g. model.backbone.depth=18',
    )
    args = parser.parse_args(argv)
    for name in ('batch_size', 'iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    return args


def config_path(config: str) -> str:
    if osp.isfile(config):
        return config
    import mmdet

    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', config)
    if not osp.isfile(path):
        raise FileNotFoundError(f"config not found as a path or in mmdet's configs: {config!r}")
    return path


def build_models(args: argparse.Namespace) -> Dict[str, torch.nn.Module]:
    """mmdet's model with mmcv's module and with ours, same weights."""
    from mmdet.apis import init_detector
    from mmengine.logging import MMLogger

    from mmdet_deform.plugins import mmcv_msda

    MMLogger.get_current_instance().setLevel(logging.ERROR)  # init_weights logs every parameter
    path = config_path(args.config)
    options = {'model.backbone.init_cfg': None, **args.cfg_options}
    models = {}
    for name in NAMES:
        if name == 'mmcv':
            mmcv_msda.revert()
        else:
            mmcv_msda.apply()
        models[name] = init_detector(path, None, device='cpu', cfg_options=dict(options))
    torch.manual_seed(0)
    models['mmcv'].init_weights()
    models['ours'].load_state_dict(models['mmcv'].state_dict(), strict=True)
    for name, model in models.items():
        kinds = sorted(
            {
                type(m).__module__
                for m in model.modules()
                if type(m).__name__ == 'MultiScaleDeformableAttention'
            }
        )
        print(f'{name}: MultiScaleDeformableAttention from {", ".join(kinds)}')
    return models


def main(argv: Optional[List[str]] = None) -> List[tuple]:
    """Run the benchmark; returns rows (step, mmcv (wall, cpu), ours (wall, cpu))."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    args = parse_args(argv)
    warnings.filterwarnings('ignore', message='torch.meshgrid')
    warnings.filterwarnings('ignore', message='.*checkpoint is None')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tool = load_train_step_tool()
    models = build_models(args)
    cfg = Config.fromfile(config_path(args.config))
    cfg.merge_from_dict(dict(args.cfg_options))
    wrappers = {
        name: build_optim_wrapper(model, cfg.optim_wrapper) for name, model in models.items()
    }
    data = tool.make_data(args.batch_size, tuple(args.shape), 'cpu')
    for model in models.values():
        model.train()
    h, w = args.shape
    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, '
        f'batch {args.batch_size} of {h}x{w}, {args.warmup} warm-up + {args.iters} timed '
        'steps (median)'
    )
    rows = tool.time_alternately(
        models,
        lambda name: tool.train_step_timed(models[name], wrappers[name], data, lambda: None),
        args,
        'train',
        'cpu',
    )
    print()
    print(
        '| step | mmcv MSDA wall (s) | ours wall (s) | wall speed-up '
        '| mmcv MSDA CPU (s) | ours CPU (s) | CPU speed-up |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for what, (theirs_wall, theirs_cpu), (ours_wall, ours_cpu) in rows:
        print(
            f'| {what} (batch {args.batch_size}) | {theirs_wall:.2f} | {ours_wall:.2f} | '
            f'{theirs_wall / ours_wall:.2f}x | {theirs_cpu:.2f} | {ours_cpu:.2f} | '
            f'{theirs_cpu / ours_cpu:.2f}x |'
        )
    return rows


if __name__ == '__main__':
    main()
