"""Test (and evaluate) a detector checkpoint with mmengine's Runner.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
        [--show-dir DIR] [--show] [--cfg-options KEY=VALUE ...] [--launcher ...]

``--optimize-for-inference`` tests the model returned by
:func:`mmdet_deform.apis.optimize_for_inference` (BatchNorms folded into the
convolutions). Evaluates with the config's ``test_evaluator`` (COCO mAP for our configs,
printed as ``coco/bbox_mAP``). ``--out`` also dumps the predictions to a
pickle; ``--show-dir`` draws them on the images. Multi-process:
``tools/dist_test.sh``.

The checkpoint is loaded as data (see :class:`mmdet_deform.engine.SafeRunner`):
no code in it runs, and an empty, truncated or incomplete file stops the tool
with a message naming it. Each test image is checked after loading
(:class:`mmdet_deform.datasets.CheckImage`: grayscale becomes 3-channel; an
empty image or non-finite values raise ``ValueError`` naming the file).
"""

import argparse
import os
from typing import List, Optional

import torch  # noqa: F401  (first: mmdet_deform._C needs libtorch loaded)
from mmdet.engine.hooks.utils import trigger_visualization_hook
from mmdet.evaluation import DumpDetResults
from mmengine.config import DictAction

from mmdet_deform.datasets import add_image_check
from mmdet_deform.engine import checkpoint_header_problem
from mmdet_deform.utils import build_runner, load_config
from mmdet_deform.utils.launch import LAUNCHERS


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument('--out', help='dump the predictions to this pickle file (.pkl/.pickle)')
    parser.add_argument('--show', action='store_true', help='show the predictions in a window')
    parser.add_argument(
        '--show-dir', help='save images with drawn predictions under work_dir/<time>/SHOW_DIR'
    )
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per shown image')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, KEY=VALUE with dotted keys (see tools/train.py)',
    )
    parser.add_argument(
        '--optimize-for-inference',
        action='store_true',
        help='test mmdet_deform.apis.optimize_for_inference(model) (BatchNorms folded into the '
        'convolutions): same predictions up to float rounding, faster',
    )
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must be a .pkl or .pickle file, got {args.out!r}')
    problem = checkpoint_header_problem(args.checkpoint)
    if problem == 'does not exist':
        parser.error(f'checkpoint not found: {args.checkpoint!r}')
    if problem is not None:
        parser.error(f'checkpoint {args.checkpoint!r} {problem}')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def optimize_runner_model(runner) -> None:
    """Load the checkpoint into the runner's model, then replace the model
    by its :func:`~mmdet_deform.apis.optimize_for_inference` copy (inside a
    distributed wrapper, if any)."""
    from mmengine.model import is_model_wrapper

    from mmdet_deform.apis import optimize_for_inference

    runner.load_or_resume()  # the optimised model has no BatchNorm entries to load into
    if is_model_wrapper(runner.model):
        runner.model.module = optimize_for_inference(runner.model.module)
    else:
        runner.model = optimize_for_inference(runner.model)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    cfg.load_from = args.checkpoint
    dataset = cfg.test_dataloader.dataset
    if 'pipeline' in dataset:
        dataset.pipeline = add_image_check(dataset.pipeline)
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    runner = build_runner(cfg)
    if args.optimize_for_inference:
        optimize_runner_model(runner)
    if args.out is not None:
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    return runner.test()


if __name__ == '__main__':
    main()
