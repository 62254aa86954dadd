"""Inference time of the deployment paths side by side, in one run: mmdet 3.3's
eager Deformable DETR, ours eager, ours exported (AOTInductor ``.pt2``, ONNX
Runtime, OpenVINO when installed), all with the same weights.

Both detectors are built by ``mmdet.apis.init_detector`` (ours from
``configs/deformable_detr/two_stage_r50.py``, mmdet's from its packaged
``deformable-detr-refine-twostage_r50_16xb2-50e_coco.py``), mmdet's
initialised weights are loaded into ours, and ours is exported as
``tools/deployment/export.py`` does (dynamic sizes unless ``--static``). Every
path runs on one random uint8 image of ``--shape`` (default 512x672): the
eager models through ``test_step`` (preprocessing, predict, rescale), the
exported ones from the uint8 image to the final detections, loaded and run by
the model classes of ``run_exported.py`` (what a deployment runs).

Every path runs in a process of its own, as it would be deployed (the ONNX
paths without torch): in one process the paths change each other's speed,
mmdet's most (its large temporaries are new pages on every call, and those
page faults took three times the system time in a process that also held
the other runtimes). The processes take turns within every iteration
(1 warm-up + ``--iters`` timed), with a ``--pause`` between turns so that no
runtime's idle threads are still spinning when the next one starts, and a
change of machine load hits all of them; every process times its own calls
(wall and CPU time of its threads; every iteration's line also shows the
system time and minor page faults of the call). The table gives the medians
and the speed-up over mmdet's eager inference.

Example (2 threads, the numbers of docs/deployment.md)::

    OMP_NUM_THREADS=2 python tools/deployment/benchmark.py --threads 2 --iters 7
"""

import argparse
import contextlib
import logging
import math
import os
import os.path as osp
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
OUR_CONFIG = osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_r50.py')
MMDET_CONFIG = 'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'
PATHS = (
    'mmdet',
    'ours',
    'optimised',
    'pt2',
    'pt2_bf16',
    'onnxruntime',
    'onnxruntime_deform_conv',
    'onnxruntime_int8',
    'openvino',
    'openvino_bf16',
)
LABELS = {
    'mmdet': 'mmdet 3.3 eager',
    'ours': 'ours eager',
    'optimised': 'ours optimised (apis.optimize_for_inference)',
    'pt2': 'ours pt2 (AOTInductor)',
    'pt2_bf16': 'ours pt2, bf16 autocast (--precision bf16)',
    'onnxruntime': 'ours ONNX Runtime (no custom op, GridSample form)',
    'onnxruntime_deform_conv': 'ours ONNX Runtime (no custom op, --msda-form deform_conv)',
    'onnxruntime_int8': 'ours ONNX Runtime, int8 (deform_conv form, --precision int8)',
    'openvino': 'ours OpenVINO, float32 (same ONNX)',
    'openvino_bf16': 'ours OpenVINO, bf16 inference precision (same ONNX)',
}
#: The weights every eager path loads (mmdet's initialisation), in --work-dir.
WEIGHTS_FILE = 'weights.pth'
#: The exported paths: the runner's model class, the file in --work-dir, and
#: the class's arguments after the file and the number of threads.
EXPORTED = {
    'pt2': ('Pt2Model', 'pt2.pt2', ()),
    'pt2_bf16': ('Pt2Model', 'pt2_bf16.pt2', ()),
    'onnxruntime': ('OnnxModel', 'model.onnx', ()),
    'onnxruntime_deform_conv': ('OnnxModel', 'model_deform_conv.onnx', ()),
    'onnxruntime_int8': ('OnnxModel', 'model_deform_conv_int8.onnx', ()),
    'openvino': ('OpenVinoModel', 'model.onnx', ('f32',)),
    'openvino_bf16': ('OpenVinoModel', 'model.onnx', ('bf16',)),
}

#: How every exported file is written: ``export.py``'s format and its
#: ``--precision`` (pt2) or ``--msda-form`` (onnx); the int8 file is the
#: float32 ``deform_conv`` one quantized (``--precision int8``), calibrated
#: on the benchmark's image (the speed does not depend on the scales).
EXPORT_OPTIONS = {
    'pt2.pt2': ('pt2', 'f32'),
    'pt2_bf16.pt2': ('pt2', 'bf16'),
    'model.onnx': ('onnx', 'grid_sample'),
    'model_deform_conv.onnx': ('onnx', 'deform_conv'),
    'model_deform_conv_int8.onnx': ('onnx_int8', 'model_deform_conv.onnx'),
}


class Timing(NamedTuple):
    """One call, as its process measured it."""

    wall: float  # seconds
    cpu: float  # seconds of CPU time of the process's threads (user + system)
    system: float  # of which in the kernel (page faults, mostly)
    faults: int  # minor page faults


# the first word of a worker's protocol lines (on a stdout of its own, so
# that what libraries print cannot be taken for them)
READY, SKIP, TIMES = 'ready', 'skip', 'times'


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=OUR_CONFIG, help='our config')
    parser.add_argument('--mmdet-config', default=MMDET_CONFIG, help="mmdet's config")
    parser.add_argument('--shape', type=int, nargs=2, default=(512, 672), metavar=('H', 'W'))
    parser.add_argument('--iters', type=int, default=5, help='timed iterations per path')
    parser.add_argument('--warmup', type=int, default=1, help='untimed iterations per path')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads of every runtime')
    parser.add_argument(
        '--pause',
        type=float,
        default=0.2,
        help='seconds between two turns (default: %(default)s)',
    )
    parser.add_argument(
        '--paths',
        nargs='+',
        default=list(PATHS),
        choices=PATHS,
        help='what to time (missing runtimes and APIs are skipped with a note)',
    )
    parser.add_argument('--static', action='store_true', help='export for exactly --shape')
    parser.add_argument('--opset', type=int, default=20, help='ONNX opset (default: %(default)s)')
    parser.add_argument(
        '--work-dir',
        default=None,
        help="where the weights, the exported files and the processes' logs go "
        '(default: a temporary folder)',
    )
    parser.add_argument(
        '--reuse-exports',
        action='store_true',
        help='time the files of EXPORT_OPTIONS (model.onnx, pt2.pt2, ...) already in --work-dir '
        '(exported by an earlier run with the same options) instead of exporting again',
    )
    # the process of one path (started by the benchmark itself)
    parser.add_argument('--serve', choices=PATHS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error('--iters and --threads must be >= 1, --warmup >= 0')
    if not 0 <= args.pause <= 60:
        parser.error(f'--pause must be between 0 and 60 seconds, got {args.pause}')
    if min(args.shape) < 65:
        parser.error(f'--shape must be at least 65x65, got {args.shape}')
    for name in ('onnxruntime_deform_conv', 'onnxruntime_int8'):
        if name in args.paths and args.opset < 19:
            parser.error(f'{name} needs --opset 19 or later (DeformConv), got {args.opset}')
    if args.serve is not None and args.work_dir is None:
        parser.error('--serve needs --work-dir')
    if args.serve is None:
        from mmengine.config import Config

        num_queries = Config.fromfile(args.config).model.get('num_queries', 0)
        tokens = encoder_tokens(args.shape)
        if tokens < num_queries:
            parser.error(
                f'--shape {args.shape[0]} {args.shape[1]} gives {tokens} encoder tokens, fewer '
                f'than the {num_queries} proposals the two-stage models pick among them'
            )
    return args


def encoder_tokens(shape: Tuple[int, int]) -> int:
    """The encoder's tokens for an image of ``shape``: the pixels of the
    maps at strides 8, 16, 32 (ResNet) and 64 (one more stride-2 conv)."""
    sizes = [math.ceil(side / 8) for side in shape]
    tokens = 0
    for _ in range(4):
        tokens += sizes[0] * sizes[1]
        sizes = [math.ceil(side / 2) for side in sizes]
    return tokens


def test_image(shape: Tuple[int, int]) -> np.ndarray:
    """The random uint8 (H, W, 3) image every path runs on."""
    return np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)


def build_model(config: str, weights: Optional[str] = None):
    """A detector of ``config`` built by ``mmdet.apis.init_detector`` (eval
    mode), with ``weights`` (a state dict file) loaded strictly if given.
    ``config`` is a file or a config path inside mmdet's package."""
    import mmdet
    import torch
    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.ERROR)
    if not osp.isfile(config):
        config = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', config)
    model = init_detector(
        Config.fromfile(config), None, device='cpu', cfg_options={'model.backbone.init_cfg': None}
    )
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location='cpu', weights_only=True))
    return model.eval()


def prepare(args: argparse.Namespace, work_dir: str) -> None:
    """Write mmdet's initialised weights and ours exported with them (the
    files the asked exported paths run) into ``work_dir``."""
    import torch

    import mmdet_deform  # noqa: F401  (registers our model and the op)

    torch.set_num_threads(args.threads)
    mmdet_model = build_model(args.mmdet_config)
    torch.manual_seed(0)
    mmdet_model.init_weights()
    torch.save(mmdet_model.state_dict(), osp.join(work_dir, WEIGHTS_FILE))
    files = {EXPORTED[name][1] for name in args.paths if name in EXPORTED}
    to_export = [
        file_name
        for file_name in EXPORT_OPTIONS
        if file_name in files
        and not (args.reuse_exports and osp.isfile(osp.join(work_dir, file_name)))
    ]
    if not to_export:
        return
    from mmengine.config import Config

    from mmdet_deform.apis.export import (
        ExportableDetector,
        export_onnx,
        export_pt2,
        read_preprocessing,
    )

    model = build_model(args.config)
    model.load_state_dict(mmdet_model.state_dict(), strict=True)
    del mmdet_model
    preprocessing = read_preprocessing(Config.fromfile(args.config))
    example = torch.from_numpy(test_image(args.shape))
    done = []
    for file_name in to_export:
        path = osp.join(work_dir, file_name)
        file_format, option = EXPORT_OPTIONS[file_name]
        start = time.perf_counter()
        if file_format == 'pt2':
            dtype = torch.bfloat16 if option == 'bf16' else None
            module = ExportableDetector(model, **preprocessing, autocast_dtype=dtype).eval()
            export_pt2(module, example, path, dynamic=not args.static)
        elif file_format == 'onnx_int8':
            from mmdet_deform.apis.quantize import quantize_onnx

            source = osp.join(work_dir, option)  # written in this run, or reused
            if option not in done and not (args.reuse_exports and osp.isfile(source)):
                module = ExportableDetector(model, **preprocessing).eval()
                export_onnx(module, example, source, args.opset, not args.static, 'deform_conv')
            quantize_onnx(source, path, [test_image(args.shape)])
        else:
            module = ExportableDetector(model, **preprocessing).eval()
            export_onnx(module, example, path, args.opset, not args.static, msda_form=option)
        done.append(file_name)
        print(f'{file_name}: exported in {time.perf_counter() - start:.0f} s', flush=True)


def runner():
    """``tools/deployment/run_exported.py`` as a module: the exported paths
    are timed through the runner's own model classes."""
    import importlib.util

    path = osp.join(REPO_ROOT, 'tools', 'deployment', 'run_exported.py')
    spec = importlib.util.spec_from_file_location('run_exported', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eager_step(model, image: np.ndarray) -> Callable[[], None]:
    """``model.test_step`` on ``image`` (no gradients)."""
    import torch
    from mmdet.structures import DetDataSample

    h, w = image.shape[:2]
    sample = DetDataSample(
        metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0))
    )
    data = dict(
        inputs=[torch.from_numpy(image).permute(2, 0, 1).contiguous()], data_samples=[sample]
    )

    def step():
        with torch.no_grad():
            model.test_step(data)

    return step


class PathUnavailable(Exception):
    """A path that cannot run here (its runtime not installed, its file not runnable)."""


def path_step(args: argparse.Namespace, name: str) -> Callable[[], None]:
    """The call timed for path ``name``, built in this process.

    Raises:
        PathUnavailable: if the path's runtime is not installed or its
            exported file cannot be run.
    """
    image = test_image(args.shape)
    if name in EXPORTED:  # the runner's imports only: no torch for the ONNX paths
        model_class, file_name, extra = EXPORTED[name]
        run = runner()
        path = osp.join(args.work_dir, file_name)
        try:
            model = getattr(run, model_class)(path, args.threads, *extra)
        except ImportError as e:
            raise PathUnavailable(f'{e.name} is not installed') from e
        except run.InputError as e:
            raise PathUnavailable(str(e)) from e
        return lambda: model(image)
    import torch

    torch.set_num_threads(args.threads)
    weights = osp.join(args.work_dir, WEIGHTS_FILE)
    if name == 'mmdet':
        return eager_step(build_model(args.mmdet_config, weights), image)
    import mmdet_deform  # noqa: F401  (registers our model and the op)

    model = build_model(args.config, weights)
    if name == 'optimised':
        from mmdet_deform.apis import optimize_for_inference

        model = optimize_for_inference(model)  # a new model
    return eager_step(model, image)


def serve(args: argparse.Namespace) -> None:
    """The process of path ``args.serve``: build its call, answer ``ready``
    (or ``skip`` with the reason), then time one call per line read from
    stdin and answer ``times`` and its :class:`Timing`, until stdin closes."""
    with os.fdopen(os.dup(1), 'w', buffering=1) as protocol:
        os.dup2(2, 1)  # what the libraries print goes to stderr (the path's log)
        sys.stdout = sys.stderr
        warnings.filterwarnings('ignore')
        try:
            step = path_step(args, args.serve)
        except PathUnavailable as e:
            protocol.write(f'{SKIP} {" ".join(str(e).split())}\n')  # one line
            return
        protocol.write(f'{READY} {os.getpid()}\n')
        for line in sys.stdin:
            if line.strip() != 'run':
                break
            usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            step()
            wall = time.perf_counter() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
            system = after.ru_stime - usage.ru_stime
            cpu = after.ru_utime - usage.ru_utime + system
            faults = after.ru_minflt - usage.ru_minflt
            protocol.write(f'{TIMES} {wall!r} {cpu!r} {system!r} {faults}\n')


class PathProcess:
    """A path's own process (this script with ``--serve NAME``), its output
    going to ``NAME.log`` in the work dir."""

    def __init__(self, args: argparse.Namespace, name: str, work_dir: str) -> None:
        self.name = name
        self.log = osp.join(work_dir, f'{name}.log')
        command = [
            sys.executable,
            osp.abspath(__file__),
            '--serve',
            name,
            '--work-dir',
            work_dir,
            '--config',
            args.config,
            '--mmdet-config',
            args.mmdet_config,
            '--shape',
            *map(str, args.shape),
            '--threads',
            str(args.threads),
        ]
        with open(self.log, 'w') as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )

    def answer(self, expected: Tuple[str, ...]) -> List[str]:
        """The words of the process's next protocol line, whose first is one of ``expected``."""
        line = self.process.stdout.readline()
        words = line.split()
        if not words or words[0] not in expected:
            self.close(kill=True)
            with open(self.log) as f:
                tail = ''.join(f.readlines()[-20:])
            raise RuntimeError(
                f'the process of {self.name!r} stopped (exit code {self.process.returncode}); '
                f'its log {self.log}:\n{tail}'
            )
        return words

    def run(self) -> Timing:
        """One call in the process."""
        self.process.stdin.write('run\n')
        self.process.stdin.flush()
        _, wall, cpu, system, faults = self.answer((TIMES,))
        return Timing(float(wall), float(cpu), float(system), int(faults))

    def close(self, kill: bool = False) -> None:
        """End the process (closing its stdin ends its loop) and its pipes."""
        if kill:
            self.process.kill()
        with contextlib.suppress(BrokenPipeError):  # a process that has stopped
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def start_processes(args: argparse.Namespace, work_dir: str) -> Dict[str, PathProcess]:
    """A ready process per asked path (those whose runtime is missing are
    skipped with a note), in the order of :data:`PATHS`."""
    processes = {name: PathProcess(args, name, work_dir) for name in PATHS if name in args.paths}
    ready = {}
    try:
        for name, process in processes.items():
            words = process.answer((READY, SKIP))
            if words[0] == SKIP:
                print(f'{name}: {" ".join(words[1:])}: its row is skipped', flush=True)
                process.close()
            else:
                print(f'{name}: process {words[1]}', flush=True)
                ready[name] = process
    except BaseException:
        for process in processes.values():
            process.close()
        raise
    return ready


def time_in_turns(
    steps: Dict[str, Callable[[], Timing]], warmup: int, iters: int, pause: float
) -> Dict[str, Tuple[float, float]]:
    """Median (wall, CPU) seconds of every step (a call returning the
    :class:`Timing` it measured), the steps taking turns ``pause`` seconds
    apart."""
    samples = {name: [] for name in steps}
    for it in range(warmup + iters):
        for name, step in steps.items():
            time.sleep(pause)
            wall, cpu, system, faults = step()
            print(
                f'  {name} it {it}: {wall:.3f} s wall, {cpu:.3f} s cpu '
                f'({system:.3f} s system, {faults} minor page faults)',
                flush=True,
            )
            if it >= warmup:
                samples[name].append((wall, cpu))
    return {
        name: tuple(statistics.median(s[i] for s in values) for i in (0, 1))
        for name, values in samples.items()
    }


def format_table(medians: Dict[str, Tuple], shape: Tuple[int, int], threads: int) -> str:
    """The markdown table of ``medians`` (path -> (wall, cpu) seconds); the
    speed-ups are over mmdet's eager inference, ``n/a`` when it was not timed."""
    base = medians.get('mmdet')

    def speed_up(index: int, seconds: float) -> str:
        return 'n/a' if base is None else f'{base[index] / seconds:.2f}x'

    lines = [
        f'| path ({shape[0]}x{shape[1]}, {threads} threads) | wall (s) | speed-up | '
        'CPU (s) | CPU speed-up |',
        '| --- | --- | --- | --- | --- |',
    ]
    for name in PATHS:
        if name not in medians:
            continue
        wall, cpu = medians[name]
        lines.append(
            f'| {LABELS[name]} | {wall:.3f} | {speed_up(0, wall)} | {cpu:.3f} | '
            f'{speed_up(1, cpu)} |'
        )
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Tuple]:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args)
        return {}
    warnings.filterwarnings('ignore')
    work_dir = osp.abspath(args.work_dir or tempfile.mkdtemp(prefix='deploy_bench_'))
    os.makedirs(work_dir, exist_ok=True)
    prepare(args, work_dir)
    processes = start_processes(args, work_dir)
    try:
        print(
            f'timing {list(processes)}: {args.warmup} warm-up + {args.iters} timed, in turn',
            flush=True,
        )
        steps = {name: process.run for name, process in processes.items()}
        medians = time_in_turns(steps, args.warmup, args.iters, args.pause)
    finally:
        for process in processes.values():
            process.close()
    print(format_table(medians, tuple(args.shape), args.threads))
    return medians


if __name__ == '__main__':
    main()
