"""The README's main job (``make demo``): train and evaluate Deformable DETR on
the embedded shapes dataset, from a fresh machine, without any download.

    python tools/main_job.py [--config CONFIG] [--work-dir DIR] [--data-root DIR]
        [--cfg-options KEY=VALUE ...] [--num-vis 6]

1. generates the shapes dataset into ``data/shapes/`` if needed (seconds;
   skipped when complete);
2. trains ``configs/deformable_detr/two_stage_shapes.py`` (mmengine's logger
   prints losses and the ETA as it goes, and COCO mAP on val every epoch);
3. reports the COCO bbox mAP of the final model on the val split;
4. draws the final model's detections on val images (``predictions.png``,
   through :class:`mmdet_deform.apis.SafeDetInferencer`, mmdet's
   ``DetInferencer`` with checked inputs and weights loaded as data) and the
   loss / mAP curves (``curves.png``),

then prints where everything is. Every run gets its own work dir
(``work_dirs/main_job/<time>/``), so no earlier run is overwritten: the work
dir is locked for the run (a second job started in the same second stops
with a clear error) and refused if it holds another run's checkpoints.
"""

import argparse
import math
import os
import os.path as osp
import sys
import time
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch  # first: mmdet_deform._C needs libtorch loaded
from mmengine.config import Config, DictAction

from mmdet_deform.datasets import ensure_shapes_split
from mmdet_deform.ops import has_extension
from mmdet_deform.utils import build_runner, check_work_dir, load_config, lock_work_dir

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # tools/, for analysis_tools
from analysis_tools.analyze_logs import load_run, plot_curves  # noqa: E402

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_shapes.py')
METRIC_NAMES = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train and evaluate on the shapes dataset')
    parser.add_argument('--config', default=DEFAULT_CONFIG, help='config (default: shapes)')
    parser.add_argument(
        '--work-dir', help='output folder (default: work_dirs/main_job/<YYYYmmdd_HHMMSS>)'
    )
    parser.add_argument('--data-root', help="dataset root (default: the config's, data/shapes/)")
    parser.add_argument('--num-vis', type=int, default=6, help='val images in predictions.png')
    parser.add_argument('--score-thr', type=float, default=0.3, help='score of drawn boxes')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='override config settings'
    )
    args = parser.parse_args(argv)
    if args.num_vis < 0:
        parser.error(f'--num-vis must be >= 0, got {args.num_vis}')
    return args


def _banner(text: str) -> None:
    print(f'\n==== {text} ====', flush=True)


def _dataset_cfgs(cfg: Config) -> List[dict]:
    return [cfg[f'{split}_dataloader'].dataset for split in ('train', 'val', 'test')]


def prepare_data(cfg: Config) -> List[str]:
    """Generate every shapes split the config reads (no-op when complete)."""
    roots = []
    for ds in _dataset_cfgs(cfg):
        if ds.get('generate'):
            ensure_shapes_split(ds.data_root, **ds.generate)
            roots.append(ds.data_root)
    return sorted(set(roots))


def final_metrics(runner, work_dir: str) -> Dict[str, float]:
    """COCO metrics of the final model on val: from the last epoch's
    validation when it ran, else from a validation run now."""
    val = load_run(work_dir).val
    max_epochs = runner.train_loop.max_epochs
    if val and val[-1]['step'] == max_epochs:
        return {k: v for k, v in val[-1].items() if k.startswith('coco/')}
    return {k: v for k, v in runner.val().items() if k.startswith('coco/')}


def draw_predictions(
    cfg: Config, checkpoint: str, images: List[str], out_dir: str, score_thr: float
) -> str:
    """Run ``SafeDetInferencer`` on ``images`` and tile the drawn results into one PNG."""
    from mmdet_deform.apis import SafeDetInferencer

    inferencer = SafeDetInferencer(model=cfg, weights=checkpoint, device='cpu', show_progress=False)
    inferencer(images, out_dir=out_dir, pred_score_thr=score_thr, no_save_pred=False)
    tiles = [cv2.imread(osp.join(out_dir, 'vis', osp.basename(p))) for p in images]
    size = max(max(t.shape[:2]) for t in tiles)
    tiles = [cv2.resize(t, (size, size)) if t.shape[:2] != (size, size) else t for t in tiles]
    for tile, path in zip(tiles, images):
        cv2.putText(tile, osp.basename(path), (4, 14), 0, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tiles += [np.zeros_like(tiles[0])] * (rows * cols - len(tiles))
    grid = np.concatenate(
        [np.concatenate(tiles[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0
    )
    out = osp.join(osp.dirname(out_dir), 'predictions.png')
    cv2.imwrite(out, grid)
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    work_dir = args.work_dir or osp.join(
        'work_dirs', 'main_job', time.strftime('%Y%m%d_%H%M%S', time.localtime())
    )
    cfg = load_config(args.config, args.cfg_options, work_dir)
    with lock_work_dir(cfg):  # another job in this work dir stops here
        check_work_dir(cfg)
        return run_job(args, cfg)


def run_job(args: argparse.Namespace, cfg: Config) -> Dict[str, float]:
    """The four steps, in the locked work dir ``cfg.work_dir``."""
    start = time.perf_counter()
    work_dir = cfg.work_dir
    timings = {}
    if args.data_root:
        for ds in _dataset_cfgs(cfg):
            ds.data_root = args.data_root

    msda = 'compiled (mmdet_deform._C)' if has_extension() else 'pure-PyTorch fallback (slow)'
    print(f'multi-scale deformable attention: {msda}, {torch.get_num_threads()} threads')

    _banner('1/4 data: the synthetic shapes dataset (generated on first use)')
    t = time.perf_counter()
    roots = prepare_data(cfg)
    timings['data'] = time.perf_counter() - t
    print(f'data ready in {timings["data"]:.1f} s: {", ".join(roots) or "(config data)"}')

    _banner(f'2/4 train: {osp.relpath(args.config, REPO_ROOT)} -> {work_dir}')
    t = time.perf_counter()
    runner = build_runner(cfg)
    runner.train()
    timings['train'] = time.perf_counter() - t
    with open(osp.join(work_dir, 'last_checkpoint'), encoding='utf-8') as f:
        checkpoint = f.read().strip()

    _banner('3/4 evaluate: COCO bbox mAP of the final model on val')
    t = time.perf_counter()
    metrics = final_metrics(runner, work_dir)
    timings['evaluate'] = time.perf_counter() - t
    print('  '.join(f'{k}: {v:.3f}' for k, v in metrics.items()))

    _banner('4/4 pictures: detections on val images and the training curves')
    t = time.perf_counter()
    val_ds = cfg.val_dataloader.dataset
    val_dir = osp.join(val_ds.data_root, val_ds.data_prefix['img'])
    images = sorted(osp.join(val_dir, n) for n in os.listdir(val_dir))[: args.num_vis]
    pred_png = None
    if images:
        pred_png = draw_predictions(
            cfg, checkpoint, images, osp.join(work_dir, 'predictions'), args.score_thr
        )
    run = load_run(work_dir, osp.splitext(osp.basename(args.config))[0])
    logged = {k for rec in run.train + run.val for k in rec}
    curves_png = plot_curves(
        [run],
        osp.join(work_dir, 'curves.png'),
        keys=[k for k in ('loss', 'coco/bbox_mAP', 'coco/bbox_mAP_50') if k in logged],
        title=f'{osp.basename(args.config)}: training loss and val mAP',
    )
    timings['pictures'] = time.perf_counter() - t
    timings['total'] = time.perf_counter() - start

    _banner('done')
    log_files = sorted(
        os.path.join(root, n)
        for root, _, names in os.walk(work_dir)
        for n in names
        if n.endswith('.log')
    )
    rows = [
        ('data', ', '.join(roots)),
        ('work dir', work_dir),
        ('config', osp.join(work_dir, osp.basename(args.config))),
        ('checkpoint', checkpoint),
        ('log', log_files[-1] if log_files else '-'),
        ('predictions', pred_png or '-'),
        ('curves', curves_png),
    ]
    for name, value in rows:
        print(f'{name:>12}: {value}')
    summary = '  '.join(
        f'{n}={metrics[f"coco/bbox_{n}"]:.3f}' for n in METRIC_NAMES if f'coco/bbox_{n}' in metrics
    )
    print(f'{"val COCO":>12}: {summary}')
    print(
        f'{"time":>12}: {timings["total"] / 60:.1f} min (data {timings["data"]:.0f} s, '
        f'train {timings["train"] / 60:.1f} min, evaluate {timings["evaluate"]:.0f} s, '
        f'pictures {timings["pictures"]:.0f} s)',
        flush=True,
    )
    return metrics


if __name__ == '__main__':
    main()
