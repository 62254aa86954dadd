"""Time training steps side by side, in one of two modes.

**Ours against mmdet 3.3** (the default): a training step and an inference
pass of our Deformable DETR against mmdet 3.3's, with the same weights.
Both models are built by ``mmdet.apis.init_detector`` (ours from our config,
mmdet's from its packaged config), mmdet's weights are loaded into ours, and
each model trains with the optimizer wrapper of its own config (AdamW,
paramwise lr multipliers, gradient clipping). A training step is
``data_preprocessor -> loss -> backward -> clip + optimizer step`` on a batch
of random images with random boxes; inference is ``test_step`` (preprocess,
predict, post-process) on one image, for mmdet's model, ours and ours after
``mmdet_deform.apis.optimize_for_inference``. The models run alternately, so a
change in machine load hits both. Prints the median times and mmdet / ours
ratios, on the CPU and, when present, on CUDA. Every iteration's line also
shows the system time and minor page faults of the step (the allocator's
share, which differs between a fresh process and one that has trained)::

    python tools/analysis_tools/benchmark_train_step.py --threads 2

**Several configs** (``--configs A B ...``): the training step of each
config on real batches. Each config is built as ``tools/train.py`` builds it
(its model, its ``optim_wrapper``, its train dataloader, so the same images,
pipeline and batch size), then the configs take turns, one training step
each, so a change in machine load hits all of them. Prints the median step
time of each, the time of one epoch at that speed and the ratio to the first
config. An entry may carry its own overrides after the path, in one quoted
argument (``"CONFIG KEY=VALUE ..."``), to time a switch of one config::

    python tools/analysis_tools/benchmark_train_step.py --configs CONFIG [CONFIG ...] \\
        [--iters 10] [--warmup 2] [--threads 2] [--cfg-options KEY=VALUE ...]
    python tools/analysis_tools/benchmark_train_step.py --configs CONFIG \\
        "CONFIG model.look_forward_twice=True"
"""

import argparse
import logging
import os.path as osp
import statistics
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from mmdet.structures import DetDataSample
from mmengine.config import DictAction
from mmengine.structures import InstanceData

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
OUR_CONFIG = osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_r50.py')
MMDET_CONFIG = 'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'


# Defaults of (--iters, --warmup) in each mode.
COMPARE_ITERS = (3, 1)
CONFIGS_ITERS = (10, 2)
# Options of the comparison with mmdet only (None unless given).
COMPARE_ONLY = ('mmdet_config', 'batch_size', 'shape', 'devices', 'skip_train', 'skip_inference')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--configs',
        nargs='+',
        default=None,
        metavar='CONFIG',
        help='time the training step of these configs side by side (instead of ours vs mmdet); '
        'an entry "CONFIG KEY=VALUE ..." adds overrides to that config only',
    )
    parser.add_argument('--config', default=OUR_CONFIG, help='our config')
    parser.add_argument(
        '--mmdet-config',
        default=None,
        help="mmdet's config, relative to mmdet's packaged configs or a path "
        f'(default: {MMDET_CONFIG})',
    )
    parser.add_argument('--batch-size', type=int, default=None, help='training batch size (2)')
    parser.add_argument(
        '--shape', type=int, nargs=2, default=None, metavar=('H', 'W'), help='(512, 672)'
    )
    parser.add_argument(
        '--iters',
        type=int,
        default=None,
        help=f'timed iterations per model or config (default {COMPARE_ITERS[0]}, '
        f'{CONFIGS_ITERS[0]} with --configs)',
    )
    parser.add_argument(
        '--warmup',
        type=int,
        default=None,
        help=f'untimed iterations per model or config (default {COMPARE_ITERS[1]}, '
        f'{CONFIGS_ITERS[1]} with --configs)',
    )
    parser.add_argument('--devices', nargs='+', default=None, help='default: cpu (+ cuda)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        default={},
        help='overrides applied to every config, e.g. model.backbone.depth=18',
    )
    parser.add_argument(
        '--skip-train', action='store_true', default=None, help='time inference only'
    )
    parser.add_argument(
        '--skip-inference', action='store_true', default=None, help='time training only'
    )
    args = parser.parse_args(argv)
    if args.configs is not None:
        given = [name for name in COMPARE_ONLY if getattr(args, name) is not None]
        if args.config != OUR_CONFIG:
            given.insert(0, 'config')
        if given:
            options = ', '.join('--' + name.replace('_', '-') for name in given)
            parser.error(f'{options} only apply without --configs (ours vs mmdet)')
    defaults = CONFIGS_ITERS if args.configs is not None else COMPARE_ITERS
    for name, default in zip(('iters', 'warmup'), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name, default in (
        ('mmdet_config', MMDET_CONFIG),
        ('batch_size', 2),
        ('shape', [512, 672]),
        ('skip_train', False),
        ('skip_inference', False),
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
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
    """Run ``step(name)`` for the ``models`` in turn (mmdet, ours, ...);
    median (wall, cpu) of every phase after the warm-up, in their order."""
    samples = {name: {} for name in models}
    for it in range(args.warmup + args.iters):
        for name in models:  # alternate: load changes hit both
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
    for phase in samples[list(models)[-1]]:
        med = {
            name: tuple(statistics.median(v[i] for v in samples[name][phase]) for i in (0, 1))
            for name in models
        }
        rows.append((phase, *med.values()))
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
        from mmdet_deform.apis import optimize_for_inference

        data = make_data(1, tuple(args.shape), device, seed=1)
        for model in models.values():
            model.eval()
        # the explicit, opt-in optimisation of ours, timed in the same rotation
        models = dict(models, optimized=optimize_for_inference(models['ours']))
        infer_rows = time_alternately(
            models, lambda name: inference_timed(models[name], data, sync), args, 'infer', device
        )
        for what, theirs, ours, optimized in infer_rows:
            rows.append((f'{what} (1 image)', theirs, ours))
            rows.append((f'{what}, optimize_for_inference (1 image)', theirs, optimized))
    return rows


def parse_config_entry(entry: str) -> Tuple[str, dict]:
    """Split a ``--configs`` entry ``"CONFIG [KEY=VALUE ...]"`` into the
    config path and its overrides (values parsed as ``--cfg-options`` parses
    them).

    Raises:
        ValueError: naming the entry if an override is not ``KEY=VALUE``.
    """
    config, *options = entry.split()
    overrides = {}
    for option in options:
        key, sep, value = option.partition('=')
        if not sep or not key:
            raise ValueError(
                f'--configs entry {entry!r}: overrides after the config path must be '
                f'KEY=VALUE, got {option!r}'
            )
        overrides[key] = DictAction._parse_iterable(value)
    return config, overrides


class ConfigStepTimer:
    """One config's model, optimizer wrapper and a fixed list of real batches
    (``--configs`` mode)."""

    def __init__(
        self, entry: str, num_batches: int, cfg_options: Optional[dict], work_dir: str
    ) -> None:
        from mmengine.optim import build_optim_wrapper

        from mmdet_deform.utils import build_runner, load_config

        config, overrides = parse_config_entry(entry)
        cfg = load_config(config, {**(cfg_options or {}), **overrides}, work_dir=work_dir)
        cfg.train_dataloader.num_workers = 0  # batches are drawn up front, not timed
        cfg.train_dataloader.persistent_workers = False
        cfg.log_level = 'WARNING'
        runner = build_runner(cfg)
        self.name = entry
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


def run_configs(args: argparse.Namespace) -> Dict[str, float]:
    """``--configs`` mode: median training-step seconds of every config."""
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)
    num_steps = args.warmup + args.iters
    with tempfile.TemporaryDirectory(prefix='benchmark_train_step_') as work_dir:
        timers = [
            ConfigStepTimer(config, num_steps, args.cfg_options, osp.join(work_dir, str(i)))
            for i, config in enumerate(args.configs)
        ]
        for i in range(num_steps):
            for timer in timers:  # take turns: load changes hit every config
                timer.step(i, record=i >= args.warmup)
    medians = {timer.name: statistics.median(timer.times) for timer in timers}
    first = medians[timers[0].name]
    print(f'{torch.get_num_threads()} threads, median of {args.iters} steps after {args.warmup}')
    print('| config | step (s) | epoch (min) | step / first |')
    print('| --- | --- | --- | --- |')
    for timer in timers:
        median = medians[timer.name]
        epoch_min = median * timer.epoch_iters / 60
        print(f'| {timer.name} | {median:.3f} | {epoch_min:.1f} | {median / first:.2f} |')
    return medians


def main(argv: Optional[List[str]] = None) -> Union[Dict[str, List[Row]], Dict[str, float]]:
    """Run the benchmark; returns the rows of every device, or with
    ``--configs`` the median step seconds of every config."""
    args = parse_args(argv)
    warnings.filterwarnings('ignore', message='torch.meshgrid')  # mmdet's encoder
    warnings.filterwarnings('ignore', message='.*checkpoint is None')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import mmdet_deform  # noqa: F401  (registers our classes)

    if args.configs is not None:
        return run_configs(args)

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
