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
the model classes of ``run_exported.py`` (what a deployment runs). The paths run in
turn within every iteration (1 warm-up + ``--iters`` timed), so a change of
machine load hits all of them; the table gives the medians and the speed-up
over mmdet's eager inference.

Example (2 threads, the numbers of docs/deployment.md)::

    OMP_NUM_THREADS=2 python tools/deployment/benchmark.py --threads 2 --iters 5
"""

import argparse
import logging
import os
import os.path as osp
import statistics
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

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
    'openvino': 'ours OpenVINO, float32 (same ONNX)',
    'openvino_bf16': 'ours OpenVINO, bf16 inference precision (same ONNX)',
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=OUR_CONFIG, help='our config')
    parser.add_argument('--mmdet-config', default=MMDET_CONFIG, help="mmdet's config")
    parser.add_argument('--shape', type=int, nargs=2, default=(512, 672), metavar=('H', 'W'))
    parser.add_argument('--iters', type=int, default=5, help='timed iterations per path')
    parser.add_argument('--warmup', type=int, default=1, help='untimed iterations per path')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads of every runtime')
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
        '--work-dir', default=None, help='where the exported files go (default: a temporary folder)'
    )
    parser.add_argument(
        '--reuse-exports',
        action='store_true',
        help='time model.onnx / model_deform_conv.onnx / pt2.pt2 / pt2_bf16.pt2 already in '
        '--work-dir (exported by an earlier run with the same options) instead of exporting again',
    )
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error('--iters and --threads must be >= 1, --warmup >= 0')
    if min(args.shape) < 65:
        parser.error(f'--shape must be at least 65x65, got {args.shape}')
    if 'onnxruntime_deform_conv' in args.paths and args.opset < 19:
        parser.error(
            f'onnxruntime_deform_conv needs --opset 19 or later (DeformConv), got {args.opset}'
        )
    return args


def build_models(args: argparse.Namespace):
    """mmdet's and our detector (eval mode), with mmdet's initialised weights in both."""
    import mmdet
    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.ERROR)
    mmdet_config = args.mmdet_config
    if not osp.isfile(mmdet_config):
        mmdet_config = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', mmdet_config)
    options = {'model.backbone.init_cfg': None}
    models = {}
    for name, path in (('mmdet', mmdet_config), ('ours', args.config)):
        models[name] = init_detector(
            Config.fromfile(path), None, device='cpu', cfg_options=dict(options)
        )
    torch.manual_seed(0)
    models['mmdet'].init_weights()
    models['ours'].load_state_dict(models['mmdet'].state_dict(), strict=True)
    for model in models.values():
        model.eval()
    return models, Config.fromfile(args.config)


def eager_step(model, image: np.ndarray) -> Callable[[], None]:
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


def exported_steps(args, model, cfg, image: np.ndarray, work_dir: str) -> Dict[str, Callable]:
    """Export ours once per format and return the runners of the asked paths."""
    from mmdet_deform.apis.export import (
        ExportableDetector,
        export_onnx,
        export_pt2,
        read_preprocessing,
    )

    preprocessing = read_preprocessing(cfg)
    module = ExportableDetector(model, **preprocessing).eval()
    example = torch.from_numpy(image)
    dynamic = not args.static
    run = runner()
    steps = {}
    for name, dtype in (('pt2', None), ('pt2_bf16', torch.bfloat16)):
        if name not in args.paths:
            continue
        path = osp.join(work_dir, f'{name}.pt2')
        if not (args.reuse_exports and osp.isfile(path)):
            start = time.perf_counter()
            exported = ExportableDetector(model, **preprocessing, autocast_dtype=dtype).eval()
            export_pt2(exported, example, path, dynamic=dynamic)
            seconds = time.perf_counter() - start
            print(f'{name}: exported and compiled in {seconds:.0f} s', flush=True)
        steps[name] = exported_step(run, 'Pt2Model', image, path, args.threads)

    def onnx_file(name: str, msda_form: str) -> str:
        path = osp.join(work_dir, name)
        if not (args.reuse_exports and osp.isfile(path)):
            start = time.perf_counter()
            export_onnx(module, example, path, args.opset, dynamic, msda_form=msda_form)
            seconds = time.perf_counter() - start
            print(f'onnx ({msda_form}): exported in {seconds:.0f} s', flush=True)
        return path

    if {'onnxruntime', 'openvino', 'openvino_bf16'} & set(args.paths):
        path = onnx_file('model.onnx', 'grid_sample')
        if 'onnxruntime' in args.paths:
            steps['onnxruntime'] = exported_step(run, 'OnnxModel', image, path, args.threads)
        for name, precision in (('openvino', 'f32'), ('openvino_bf16', 'bf16')):
            if name in args.paths:
                steps[name] = exported_step(
                    run, 'OpenVinoModel', image, path, args.threads, precision
                )
    if 'onnxruntime_deform_conv' in args.paths:
        path = onnx_file('model_deform_conv.onnx', 'deform_conv')
        steps['onnxruntime_deform_conv'] = exported_step(
            run, 'OnnxModel', image, path, args.threads
        )
    return {k: v for k, v in steps.items() if v is not None}


def runner():
    """``tools/deployment/run_exported.py`` as a module: the exported paths
    are timed through the runner's own model classes."""
    import importlib.util

    path = osp.join(REPO_ROOT, 'tools', 'deployment', 'run_exported.py')
    spec = importlib.util.spec_from_file_location('run_exported', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported_step(run, model_class: str, image: np.ndarray, *args) -> Optional[Callable]:
    """The runner's (``run``) ``model_class(*args)`` run on ``image``, or None
    with a note where its runtime is not installed."""
    try:
        model = getattr(run, model_class)(*args)
    except ImportError as e:
        print(f'{e.name} is not installed: its row is skipped')
        return None
    except run.InputError as e:
        print(f'{e}: its row is skipped')
        return None
    return lambda: model(image)


def optimised_step(model, image: np.ndarray) -> Callable:
    """Ours after ``mmdet_deform.apis.optimize_for_inference`` (a new model;
    ``model`` is unchanged)."""
    from mmdet_deform.apis import optimize_for_inference

    return eager_step(optimize_for_inference(model), image)


def time_interleaved(steps: Dict[str, Callable], warmup: int, iters: int) -> Dict[str, Tuple]:
    """Median (wall, cpu) seconds of every step, the steps taking turns."""
    samples = {name: [] for name in steps}
    for it in range(warmup + iters):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f'  {name} it {it}: {wall:.3f} s wall, {cpu:.3f} s cpu', flush=True)
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
    warnings.filterwarnings('ignore')
    torch.set_num_threads(args.threads)
    import mmdet_deform  # noqa: F401  (registers our model and the op)

    gen = np.random.default_rng(0)
    image = gen.integers(0, 256, (*args.shape, 3), dtype=np.uint8)
    models, cfg = build_models(args)
    steps = {}
    if 'mmdet' in args.paths:
        steps['mmdet'] = eager_step(models['mmdet'], image)
    if 'ours' in args.paths:
        steps['ours'] = eager_step(models['ours'], image)
    if 'optimised' in args.paths:
        step = optimised_step(models['ours'], image)
        if step is not None:
            steps['optimised'] = step
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='deploy_bench_')
    os.makedirs(work_dir, exist_ok=True)
    steps.update(exported_steps(args, models['ours'], cfg, image, work_dir))
    print(f'timing {list(steps)}: {args.warmup} warm-up + {args.iters} timed, in turn', flush=True)
    medians = time_interleaved(steps, args.warmup, args.iters)
    print(format_table(medians, tuple(args.shape), args.threads))
    return medians


if __name__ == '__main__':
    main()
