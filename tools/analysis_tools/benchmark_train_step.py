"""Time a training step and an inference pass of our Deformable DETR against
mmdet 3.3's, side by side, with the same weights.

Both models are built by ``mmdet.apis.init_detector`` (ours from our config,
mmdet's from its packaged config), mmdet's weights are loaded into ours, and
each model trains with the optimizer wrapper of its own config (AdamW,
paramwise lr multipliers, gradient clipping). A training step is
``data_preprocessor -> loss -> backward -> clip + optimizer step`` on a batch
of random images with random boxes; inference is ``test_step`` (preprocess,
predict, post-process) on one image. The two models run alternately, so a
change in machine load hits both. Prints the median times and mmdet / ours
ratios, on the CPU and, when present, on CUDA. Every iteration's line also
shows the system time and minor page faults of the step (the allocator's
share, which differs between a fresh process and one that has trained).

Example::

    python tools/analysis_tools/benchmark_train_step.py --threads 2
"""

import argparse
import logging
import os.path as osp
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from mmdet.structures import DetDataSample
from mmengine.config import DictAction
from mmengine.structures import InstanceData

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
OUR_CONFIG = osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_r50.py')
MMDET_CONFIG = 'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=OUR_CONFIG, help='our config')
    parser.add_argument(
        '--mmdet-config',
        default=MMDET_CONFIG,
        help="mmdet's config, relative to mmdet's packaged configs or a path",
    )
    parser.add_argument('--batch-size', type=int, default=2, help='training batch size')
    parser.add_argument('--shape', type=int, nargs=2, default=(512, 672), metavar=('H', 'W'))
    parser.add_argument('--iters', type=int, default=3, help='timed iterations per model')
    parser.add_argument('--warmup', type=int, default=1, help='untimed iterations per model')
    parser.add_argument('--devices', nargs='+', default=None, help='default: cpu (+ cuda)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        default={},
        help='overrides applied to both configs, e.g. model.backbone.depth=18',
    )
    parser.add_argument('--skip-train', action='store_true', help='time inference only')
    parser.add_argument('--skip-inference', action='store_true', help='time training only')
    args = parser.parse_args(argv)
    for name in ('batch_size', 'iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    return args


def build_models(args: argparse.Namespace, device: str):
    """Both detectors and optimizer wrappers, with mmdet's (initialised)
    weights in both."""
    import mmdet
    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper

    # init_weights and the optimizer constructor log every parameter
    MMLogger.get_current_instance().setLevel(logging.ERROR)

    mmdet_config = args.mmdet_config
    if not osp.isfile(mmdet_config):
        mmdet_config = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', mmdet_config)
    options = {'model.backbone.init_cfg': None, **args.cfg_options}
    models = {}
    wrappers = {}
    for name, path in (('mmdet', mmdet_config), ('ours', args.config)):
        cfg = Config.fromfile(path)
        models[name] = init_detector(cfg, None, device=device, cfg_options=dict(options))
    torch.manual_seed(0)
    models['mmdet'].init_weights()
    models['ours'].load_state_dict(models['mmdet'].state_dict(), strict=True)
    for name, path in (('mmdet', mmdet_config), ('ours', args.config)):
        cfg = Config.fromfile(path)
        cfg.merge_from_dict(dict(options))
        wrappers[name] = build_optim_wrapper(models[name], cfg.optim_wrapper)
    return models, wrappers


def make_data(batch_size: int, shape: Tuple[int, int], device: str, seed: int = 0) -> Dict:
    """A batch in the data loader's format: uint8 images and ground truth."""
    gen = torch.Generator().manual_seed(seed)
    h, w = shape
    inputs = []
    samples = []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8))
        sample = DetDataSample(
            metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0))
        )
        xy = torch.rand(6, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(6, 2, generator=gen) * 0.25 + 0.05) * torch.tensor([w, h])
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], -1).to(device),
            labels=torch.randint(0, 80, (6,), generator=gen).to(device),
        )
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


class Stopwatch:
    """Wall-clock and process CPU time (all threads) since ``start``. On a
    shared machine CPU time is the steadier measure of the work done."""

    def __init__(self, sync: Callable) -> None:
        self.sync = sync
        self.start()

    def start(self) -> None:
        self.sync()
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def lap(self) -> Tuple[float, float]:
        """(wall, cpu) seconds since the last start/lap."""
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        elapsed = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return elapsed


def train_step_timed(model, wrapper, data: Dict, sync: Callable) -> Dict[str, Tuple[float, float]]:
    """One training step as mmengine runs it; (wall, cpu) seconds of its
    phases."""
    watch = Stopwatch(sync)
    batch = model.data_preprocessor(data, training=True)
    losses = model(**batch, mode='loss')
    loss, _ = model.parse_losses(losses)
    wrapper.backward(loss)
    fwd_bwd = watch.lap()
    wrapper.step()
    wrapper.zero_grad()
    opt = watch.lap()
    return {
        'forward + backward': fwd_bwd,
        'clip + AdamW step': opt,
        'train step': (fwd_bwd[0] + opt[0], fwd_bwd[1] + opt[1]),
    }


def inference_timed(model, data: Dict, sync: Callable) -> Dict[str, Tuple[float, float]]:
    watch = Stopwatch(sync)
    with torch.no_grad():
        model.test_step(data)
    return {'inference': watch.lap()}


Row = Tuple[str, Tuple[float, float], Tuple[float, float]]  # what, mmdet, ours (wall, cpu)


def kernel_usage() -> Tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far: the
    kernel's share of a step, which depends on the allocator's state (a
    fresh large allocation is a new mmap whose pages fault on first touch).
    (0, 0) where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return 0.0, 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def time_alternately(
    models: Dict, step: Callable, args: argparse.Namespace, label: str, device: str
) -> List[Row]:
    """Run ``step(name)`` for mmdet and ours in turn; median (wall, cpu) of
    every phase after the warm-up."""
    samples = {name: {} for name in models}
    for it in range(args.warmup + args.iters):
        for name in ('mmdet', 'ours'):  # alternate: load changes hit both
            before = kernel_usage()
            phases = step(name)
            system, faults = (b - a for a, b in zip(before, kernel_usage()))
            total = list(phases.values())[-1]
            print(
                f'  [{device}] {label} {name} it {it}: {total[0]:.2f} s wall, {total[1]:.2f} s cpu '
                f'({system:.2f} s system, {faults} minor page faults)',
                flush=True,
            )
            if it >= args.warmup:
                for phase, value in phases.items():
                    samples[name].setdefault(phase, []).append(value)
    rows = []
    for phase in samples['ours']:
        med = {
            name: tuple(statistics.median(v[i] for v in samples[name][phase]) for i in (0, 1))
            for name in models
        }
        rows.append((phase, med['mmdet'], med['ours']))
    return rows


def run_device(args: argparse.Namespace, device: str) -> List[Row]:
    """Rows (what, mmdet (wall, cpu), ours (wall, cpu)) of one device."""
    models, wrappers = build_models(args, device)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    rows = []
    if not args.skip_train:
        data = make_data(args.batch_size, tuple(args.shape), device)
        for model in models.values():
            model.train()
        train_rows = time_alternately(
            models,
            lambda name: train_step_timed(models[name], wrappers[name], data, sync),
            args,
            'train',
            device,
        )
        rows += [(f'{what} (batch {args.batch_size})', *t) for what, *t in train_rows]
    if not args.skip_inference:
        data = make_data(1, tuple(args.shape), device, seed=1)
        for model in models.values():
            model.eval()
        infer_rows = time_alternately(
            models, lambda name: inference_timed(models[name], data, sync), args, 'infer', device
        )
        rows += [(f'{what} (1 image)', *t) for what, *t in infer_rows]
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, List[Row]]:
    """Run the benchmark; returns the rows of every device."""
    args = parse_args(argv)
    warnings.filterwarnings('ignore', message='torch.meshgrid')  # mmdet's encoder
    warnings.filterwarnings('ignore', message='.*checkpoint is None')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import mmdet_deform  # noqa: F401  (registers our classes)

    devices = args.devices or ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    h, w = args.shape
    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, images {h}x{w}, '
        f'{args.warmup} warm-up + {args.iters} timed iterations (median)'
    )
    results = {device: run_device(args, device) for device in devices}
    print()
    print(
        '| device | step | mmdet 3.3 wall (s) | ours wall (s) | wall speed-up '
        '| mmdet 3.3 CPU (s) | ours CPU (s) | CPU speed-up |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for device, rows in results.items():
        for what, (theirs_wall, theirs_cpu), (ours_wall, ours_cpu) in rows:
            cpu = (
                f'{theirs_cpu:.2f} | {ours_cpu:.2f} | {theirs_cpu / ours_cpu:.2f}x'
                if device == 'cpu'
                else '- | - | -'
            )
            print(
                f'| {device} | {what} | {theirs_wall:.2f} | {ours_wall:.2f} | '
                f'{theirs_wall / ours_wall:.2f}x | {cpu} |'
            )
    return results


if __name__ == '__main__':
    main()
