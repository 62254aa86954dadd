"""Measure the inference speed (images/s) of a detector config.

    python tools/analysis_tools/benchmark.py CONFIG [--checkpoint CKPT]
        [--max-iter 50] [--warmup 5] [--batch-size 1] [--synthetic --img-size 320]
        [--device cpu] [--threads N] [--cfg-options ...]

Times ``model.test_step`` (data preprocessing, forward, post-processing) on
batches of the config's test set, or with ``--synthetic`` on random images of
``--img-size``, after ``--warmup`` untimed iterations; data loading is not
timed. Prints the running and the overall images/s.
"""

import argparse
import time
from typing import List, Optional

import torch
from mmengine.config import DictAction

from mmdet_deform.utils import load_config


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Inference speed of a detector config')
    parser.add_argument('config', help='config file')
    parser.add_argument('--checkpoint', help='checkpoint (default: random weights)')
    parser.add_argument('--max-iter', type=int, default=50, help='timed iterations')
    parser.add_argument('--warmup', type=int, default=5, help='untimed iterations first')
    parser.add_argument('--log-interval', type=int, default=10, help='print every N iterations')
    parser.add_argument('--batch-size', type=int, default=1, help='images per iteration')
    parser.add_argument(
        '--synthetic', action='store_true', help='random images instead of the test set'
    )
    parser.add_argument('--img-size', type=int, default=320, help='side of synthetic images')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i] (default: cpu)')
    parser.add_argument('--threads', type=int, help='torch threads (default: torch default)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override settings')
    parser.add_argument(
        '--optimize-for-inference',
        action='store_true',
        help='time mmdet_deform.apis.optimize_for_inference(model) (BatchNorms folded)',
    )
    args = parser.parse_args(argv)
    for name in ('max_iter', 'batch_size', 'img_size', 'log_interval'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    return args


def _synthetic_batches(batch_size: int, size: int):
    """Endless batches of random images in the format of a detection dataloader."""
    from mmdet.structures import DetDataSample

    gen = torch.Generator().manual_seed(0)
    while True:
        inputs = [torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8)]
        inputs = inputs * batch_size
        meta = dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
        yield dict(inputs=inputs, data_samples=[DetDataSample(metainfo=meta)] * batch_size)


def _dataset_batches(cfg, batch_size: int):
    """Endless batches of the config's test set (cycled)."""
    from mmengine.runner import Runner

    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.update(batch_size=batch_size, num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg)
    while True:
        yield from loader


def benchmark(args: argparse.Namespace) -> float:
    """Run the benchmark; returns the overall images/s."""
    from mmengine.registry import init_default_scope

    from mmdet_deform.apis import load_weights, optimize_for_inference
    from mmdet_deform.registry import MODELS

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet_deform'))
    model = MODELS.build(cfg.model)
    if args.checkpoint:
        checkpoint = load_weights(args.checkpoint)  # as data: no code in it runs
        model.load_state_dict(checkpoint.get('state_dict', checkpoint))
    model = model.to(args.device).eval()
    if args.optimize_for_inference:
        model = optimize_for_inference(model)
    batches = (
        _synthetic_batches(args.batch_size, args.img_size)
        if args.synthetic
        else _dataset_batches(cfg, args.batch_size)
    )
    print(
        f'{args.config}: batch {args.batch_size}, device {args.device}, '
        f'{torch.get_num_threads()} threads, '
        f'{"synthetic " + str(args.img_size) + " px" if args.synthetic else "test set"}'
    )
    total_time, total_imgs = 0.0, 0
    with torch.no_grad():
        for i in range(args.warmup + args.max_iter):
            data = next(batches)
            if args.device.startswith('cuda'):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.test_step(data)
            if args.device.startswith('cuda'):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if i < args.warmup:
                continue
            total_time += elapsed
            total_imgs += len(data['inputs'])
            done = i - args.warmup + 1
            if done % args.log_interval == 0:
                print(f'iter [{done}/{args.max_iter}]: {total_imgs / total_time:.2f} img/s')
    fps = total_imgs / total_time
    print(f'Overall: {fps:.2f} img/s ({1000 / fps:.1f} ms/img)')
    return fps


def main(argv: Optional[List[str]] = None) -> float:
    return benchmark(parse_args(argv))


if __name__ == '__main__':
    main()
