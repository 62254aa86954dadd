"""Benchmark of training-mode dropout on the CPU, side by side.

Compares, in one run and on the same tensors, ``nn.Dropout`` (ATen's
``bernoulli_`` mask) with :class:`mmdet_deform.ops.Dropout` (the
counter-based kernel), forward and forward + backward, at the shapes of the
deformable encoder's dropouts for a batch of 2 512x672 images (7,144 tokens
per image): the FFN hidden activations (2 x 7144 x 1024) and the attention /
FFN outputs (2 x 7144 x 256). Each repetition runs both in turn (a busy
machine slows them alike); the table shows medians and nn.Dropout / ours.

Example::

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python tools/analysis_tools/benchmark_dropout.py
"""

import argparse
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

SHAPES = {'ffn hidden': (2, 7144, 1024), 'attention/ffn output': (2, 7144, 256)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--p', type=float, default=0.1, help='dropout probability')
    parser.add_argument('--repeat', type=int, default=10, help='timed repetitions')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument(
        '--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES), help='workloads'
    )
    args = parser.parse_args(argv)
    if not 0.0 < args.p < 1.0:
        parser.error(f'--p must be in (0, 1), got {args.p}')
    if args.repeat < 1:
        parser.error(f'--repeat must be >= 1, got {args.repeat}')
    return args


def run_pass(module: nn.Module, label: str, x: Tensor, grad_out: Tensor) -> float:
    """Milliseconds of one forward (no grad) or forward + backward (w.r.t.
    ``x``) of ``module``."""
    start = time.perf_counter()
    if label == 'forward':
        with torch.no_grad():
            module(x)
    else:
        torch.autograd.grad(module(x), x, grad_out)
    return (time.perf_counter() - start) * 1e3


def main(argv: Optional[List[str]] = None) -> List[Tuple[str, str, float, float]]:
    """Run the benchmark; returns rows (workload, pass, nn.Dropout ms, ours ms)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from mmdet_deform.ops import Dropout, has_extension

    if not has_extension():
        raise SystemExit('mmdet_deform._C is not built: nothing to compare')
    modules: Dict[str, nn.Module] = {'nn.Dropout': nn.Dropout(args.p), 'ours': Dropout(args.p)}
    rows = []
    for name in args.shapes:
        x = torch.randn(SHAPES[name], requires_grad=True)
        grad_out = torch.randn_like(x)
        for label in ('forward', 'forward+backward'):
            samples: Dict[str, List[float]] = {key: [] for key in modules}
            for module in modules.values():  # warm-up
                run_pass(module, label, x, grad_out)
            for _ in range(args.repeat):
                for key, module in modules.items():
                    samples[key].append(run_pass(module, label, x, grad_out))
            theirs, ours = (statistics.median(samples[k]) for k in ('nn.Dropout', 'ours'))
            rows.append((name, label, theirs, ours))
    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, p={args.p}, '
        f'median of {args.repeat}'
    )
    print('| workload | shape | pass | nn.Dropout (ms) | ours (ms) | nn.Dropout / ours |')
    print('| --- | --- | --- | --- | --- | --- |')
    for name, label, theirs, ours in rows:
        shape = 'x'.join(map(str, SHAPES[name]))
        print(f'| {name} | {shape} | {label} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x |')
    return rows


if __name__ == '__main__':
    main()
