"""Train a detector with mmengine's Runner (mmdet 3.x's ``tools/train.py`` flags).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--auto-scale-lr] [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

Hooks, schedulers, checkpointing, logging and evaluation all come from the
config. One run at a time per work dir (a lock file in it, released when the
process ends); a new run refuses a work dir that holds another run's
checkpoints. Checkpoints are loaded as data: the config embedded in one is
never executed (see :class:`mmdet_deform.engine.SafeRunner`). ``--amp`` is
fp16 with loss scaling on CUDA and bf16 autocast on a CPU; distributed runs
without CUDA use the gloo backend (see :mod:`mmdet_deform.utils.launch`).
Multi-process: ``tools/dist_train.sh``.
"""

import argparse
import os
from typing import List, Optional

import torch  # noqa: F401  (first: mmdet_deform._C needs libtorch loaded)
from mmengine.config import DictAction

from mmdet_deform.utils import (
    build_runner,
    check_work_dir,
    enable_amp,
    enable_auto_scale_lr,
    load_config,
    lock_work_dir,
    set_resume,
)
from mmdet_deform.utils.launch import LAUNCHERS


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='automatic mixed precision: fp16 + loss scaling on CUDA, bf16 autocast on CPU',
    )
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the lr linearly to the total batch size (auto_scale_lr.base_batch_size)',
    )
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from CKPT, or without a value from the latest checkpoint in the work dir',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, KEY=VALUE with dotted keys into nested dicts and list '
        'items, e.g. model.num_queries=50 optim_wrapper.optimizer.lr=1e-3 '
        'train_dataloader.dataset.pipeline.2.scale="(256,256)" '
        'model.backbone.out_indices="(1,2,3)"; lists as key="[a,b]" or key=a,b; no spaces',
    )
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) / --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        enable_auto_scale_lr(cfg)
    with lock_work_dir(cfg):  # a second run in this work dir stops here
        set_resume(cfg, args.resume)
        check_work_dir(cfg, args.resume)
        runner = build_runner(cfg)
        runner.train()


if __name__ == '__main__':
    main()
