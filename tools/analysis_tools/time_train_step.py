"""Time the training step of several configs side by side, on real batches.

    python tools/analysis_tools/time_train_step.py CONFIG [CONFIG ...] \\
        [--iters 10] [--warmup 2] [--threads 2] [--cfg-options KEY=VALUE ...]

Each config is built as ``tools/train.py`` builds it (its model, its
``optim_wrapper``, its train dataloader, so the same images, pipeline and
batch size), then the configs take turns, one training step each
(``data_preprocessor -> loss -> backward -> clip + optimizer step``), so a
change in machine load hits all of them. Prints the median step time of
each, the time of one epoch at that speed and the ratio to the first config.
Used for the time column of ``docs/convergence.md``, where the runs being
compared could not all have the machine to themselves.
"""

import argparse
import logging
import statistics
import time
from typing import List, Optional

import torch  # first: mmdet_deform._C needs libtorch loaded
from mmengine.config import DictAction
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper

from mmdet_deform.utils import build_runner, load_config


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('configs', nargs='+', help='config files')
    parser.add_argument('--iters', type=int, default=10, help='timed steps per config')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per config')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='overrides applied to every config'
    )
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f'--iters must be >= 1, got {args.iters}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    return args


class StepTimer:
    """One config's model, optimizer wrapper and a fixed list of batches."""

    def __init__(self, config: str, num_batches: int, cfg_options: Optional[dict]) -> None:
        cfg = load_config(config, cfg_options, work_dir='/tmp/time_train_step')
        cfg.train_dataloader.num_workers = 0  # batches are drawn up front, not timed
        cfg.train_dataloader.persistent_workers = False
        cfg.log_level = 'WARNING'
        runner = build_runner(cfg)
        self.name = config
        self.model = runner.model
        self.model.train()
        self.optim_wrapper = build_optim_wrapper(self.model, cfg.optim_wrapper)
        loader = runner.build_dataloader(cfg.train_dataloader)
        self.epoch_iters = len(loader)
        batches = iter(loader)
        self.batches = [next(batches) for _ in range(num_batches)]
        self.times: List[float] = []

    def step(self, index: int, record: bool) -> None:
        start = time.perf_counter()
        data = self.model.data_preprocessor(self.batches[index], True)
        losses, _ = self.model.parse_losses(self.model(**data, mode='loss'))
        self.optim_wrapper.update_params(losses)
        if record:
            self.times.append(time.perf_counter() - start)


def main(argv: Optional[List[str]] = None) -> List[float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    timers = [StepTimer(c, args.warmup + args.iters, args.cfg_options) for c in args.configs]
    for i in range(args.warmup + args.iters):
        for timer in timers:
            timer.step(i, record=i >= args.warmup)

    medians = [statistics.median(t.times) for t in timers]
    print(f'{torch.get_num_threads()} threads, median of {args.iters} steps after {args.warmup}')
    print('| config | step (s) | epoch (min) | step / first |')
    print('| --- | --- | --- | --- |')
    for timer, median in zip(timers, medians):
        epoch_min = median * timer.epoch_iters / 60
        print(f'| {timer.name} | {median:.3f} | {epoch_min:.1f} | {median / medians[0]:.2f} |')
    return medians


if __name__ == '__main__':
    main()
