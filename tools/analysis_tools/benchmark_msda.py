"""Benchmark of multi-scale deformable attention implementations, side by side.

Compares, in one run and on the same inputs:

* ``ours``: :func:`mmdet_deform.ops.ms_deform_attn` (the compiled kernel);
* ``mmcv_grid_sample``: mmcv's ``multi_scale_deformable_attn_pytorch``, the
  ``F.grid_sample`` path that mmcv, mmdet and HF transformers use on the CPU;
* ``reference``: :func:`mmdet_deform.ops.ms_deform_attn_pytorch`, our pure
  PyTorch reference (explicit bilinear gathers);
* ``mmcv_cuda`` (``--device cuda`` only): mmcv's CUDA kernel
  ``MultiScaleDeformableAttnFunction``, when mmcv was built with it.

for the forward pass and forward + backward, in float32 and bfloat16, at two
workloads (``--workloads``):

* ``encoder``: bs 2, levels (64, 84), (32, 42), (16, 21), (8, 11) (a
  512 x 672 image at strides 8-64), 8 heads, head_dim 32, 4 points, one query
  per key (7,144 queries);
* ``decoder``: the same value, 300 queries.

Sampling locations (``--locations``): ``reference`` (default) places them as
a trained Deformable DETR does: encoder queries sit at the pixel centres of
their level, decoder queries at uniformly random reference points, and each
head samples at the module's initial offsets (``num_heads`` directions, k
pixels for the k-th point, on every level) plus Gaussian noise of 2 pixels.
``uniform`` draws them uniformly in [0, 1], the worst case for caches.
Attention weights are a softmax over levels x points of random logits.

Timing: each repetition runs every implementation once, in turn (so that a
busy machine slows them alike), after ``--warmup`` untimed runs; the table
shows the median. On CUDA, times come from CUDA events around each call.
Forward is timed under ``torch.no_grad()``; forward + backward calls
``out.backward(grad_out)`` with a fixed random ``grad_out``, gradients of
value, locations and weights required.

Peak extra memory (forward + backward, in a separate untimed run): on CUDA,
``torch.cuda.max_memory_allocated()`` minus the memory allocated before the
call. On the CPU, torch keeps no such counter, so the run is recorded with
``torch.profiler`` (``profile_memory=True``), which logs every allocation and
free of the CPU tensor allocator with its size; replaying them in time order,
the peak is the maximum over the run of the bytes held by tensors allocated
during it (the inputs, allocated before, do not count; the outputs and
gradients do). Memory outside the tensor allocator (the kernels' small
per-thread scratch buffers, the C library's own arenas) is not included.

Example (the command recorded in ``docs/benchmarks.md``)::

    OMP_NUM_THREADS=2 python tools/analysis_tools/benchmark_msda.py --impls ours mmcv_grid_sample

(the reference, much slower than ours at the encoder workload, is timed
there in a separate run with ``--repeat 1 --warmup 0 --no-memory``).
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

Impl = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

LEVELS = ((64, 84), (32, 42), (16, 21), (8, 11))
WORKLOADS = {
    # name: (bs, spatial shapes, num_heads, head_dim, num_points, num_queries or None = num_keys)
    'encoder': (2, LEVELS, 8, 32, 4, None),
    'decoder': (2, LEVELS, 8, 32, 4, 300),
    # a tiny workload to smoke-test the script itself
    'tiny': (1, ((6, 8), (3, 4)), 2, 8, 2, 20),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument(
        '--workloads', nargs='+', choices=sorted(WORKLOADS), default=['encoder', 'decoder']
    )
    parser.add_argument(
        '--dtypes', nargs='+', choices=['float32', 'bfloat16', 'float16'],
        default=['float32', 'bfloat16'],
    )  # fmt: skip
    parser.add_argument(
        '--impls',
        nargs='+',
        choices=['ours', 'mmcv_grid_sample', 'reference', 'mmcv_cuda'],
        default=None,
        help='implementations to run (default: all available on the device)',
    )
    parser.add_argument('--locations', choices=['reference', 'uniform'], default='reference')
    parser.add_argument('--repeat', type=int, default=10, help='timed repetitions (median shown)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory runs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, help='also write the results to this file')
    return parser.parse_args(argv)


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
def make_inputs(
    workload: str, dtype: torch.dtype, device: str, locations: str, seed: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Inputs of one workload.

    Returns:
        tuple: value (bs, num_keys, num_heads, head_dim), spatial_shapes
        (num_levels, 2), level_start_index (num_levels,), sampling_locations
        (bs, num_queries, num_heads, num_levels, num_points, 2) and
        attention_weights (bs, num_queries, num_heads, num_levels, num_points).
    """
    bs, levels, num_heads, head_dim, num_points, num_queries = WORKLOADS[workload]
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_keys = int(sizes.sum())
    num_levels = len(levels)
    if num_queries is None:  # encoder: one query per key, at its pixel centre
        refs = []
        for h, w in levels:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing='ij'
            )
            refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        ref = torch.cat(refs).expand(bs, -1, -1)  # (bs, num_keys, 2)
        num_queries = num_keys
    else:  # decoder: learned reference points, anywhere in the image
        ref = torch.rand(bs, num_queries, 2, generator=gen)
    if locations == 'uniform':
        loc = torch.rand(bs, num_queries, num_heads, num_levels, num_points, 2, generator=gen)
    else:
        # initial offsets of the module: head directions, k pixels for point k
        angles = torch.arange(num_heads) * (2 * math.pi / num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        distance = torch.arange(1, num_points + 1, dtype=torch.float32)
        # (nh, 1, 1, 2) * (1, 1, np, 1) -> (nh, 1, np, 2)
        offsets = directions[:, None, None] * distance[None, None, :, None]
        offsets = offsets + 2.0 * torch.randn(
            bs, num_queries, num_heads, num_levels, num_points, 2, generator=gen
        )
        normalizer = shapes.flip(-1).float()  # (num_levels, 2) as (w, h)
        # (bs, nq, 1, 1, 1, 2) + (bs, nq, nh, nl, np, 2) / (nl, 1, 2)
        loc = ref[:, :, None, None, None, :] + offsets / normalizer[:, None, :]
    logits = torch.randn(bs, num_queries, num_heads, num_levels * num_points, generator=gen)
    weights = logits.softmax(-1).view(bs, num_queries, num_heads, num_levels, num_points)
    value = torch.randn(bs, num_keys, num_heads, head_dim, generator=gen)
    return (
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        loc.to(device, dtype).contiguous(),
        weights.to(device, dtype),
    )


# --------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------
def get_impls(device: str, names: Optional[List[str]]) -> Dict[str, Impl]:
    """The implementations to compare, by name (skipping unavailable ones
    with a message on stderr)."""
    from mmdet_deform.ops import has_extension, ms_deform_attn, ms_deform_attn_pytorch

    impls: Dict[str, Impl] = {}
    wanted = names or ['ours', 'mmcv_grid_sample', 'reference', 'mmcv_cuda']
    if 'ours' in wanted:
        if not has_extension():
            sys.exit('mmdet_deform._C is not built: run `python setup.py build_ext --inplace`')
        impls['ours'] = ms_deform_attn
    if 'mmcv_grid_sample' in wanted or 'mmcv_cuda' in wanted:
        try:
            from mmcv.ops.multi_scale_deform_attn import (
                MultiScaleDeformableAttnFunction,
                multi_scale_deformable_attn_pytorch,
            )
        except ImportError as e:
            print(f'mmcv is not importable ({e}): skipping mmcv', file=sys.stderr)
        else:
            if 'mmcv_grid_sample' in wanted:
                impls['mmcv_grid_sample'] = (
                    lambda value, shapes, starts, loc, weights: multi_scale_deformable_attn_pytorch(
                        value, shapes, loc, weights
                    )
                )
            if 'mmcv_cuda' in wanted and device == 'cuda':
                impls['mmcv_cuda'] = lambda value, shapes, starts, loc, weights: (
                    MultiScaleDeformableAttnFunction.apply(value, shapes, starts, loc, weights, 64)
                )
    if 'reference' in wanted:
        impls['reference'] = ms_deform_attn_pytorch
    return impls


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------
def run_once(impl: Impl, inputs: Tuple[Tensor, ...], grad_out: Optional[Tensor]) -> None:
    """One forward (grad_out None, under no_grad) or forward + backward."""
    if grad_out is None:
        with torch.no_grad():
            impl(*inputs)
        return
    for t in (inputs[0], inputs[3], inputs[4]):
        t.grad = None
    impl(*inputs).backward(grad_out)


class Timer:
    """Wall-clock milliseconds of a call: perf_counter on the CPU, CUDA events
    (after a synchronize) on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device == 'cuda'

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def peak_extra_memory(device: str, fn: Callable[[], None]) -> int:
    """Peak bytes held by tensors allocated during ``fn()`` (see the module
    docstring for how they are counted)."""
    if device == 'cuda':
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)['traceEvents']
    memory = [
        e for e in events if e.get('name') == '[memory]' and e['args'].get('Device Type') == 0
    ]
    memory.sort(key=lambda e: (float(e['ts']), e['args'].get('Ev Idx', 0)))
    live: Dict[int, int] = {}  # address -> bytes of the tensors allocated during fn()
    held = peak = 0
    for e in memory:
        nbytes, addr = int(e['args']['Bytes']), int(e['args']['Addr'])
        if nbytes > 0:
            live[addr] = live.get(addr, 0) + nbytes
            held += nbytes
            peak = max(peak, held)
        elif addr in live:  # a free of something allocated before fn() is ignored
            held -= live.pop(addr)
    return peak


def measure(
    impls: Dict[str, Impl],
    inputs: Tuple[Tensor, ...],
    grad_out: Optional[Tensor],
    args: argparse.Namespace,
) -> dict:
    """Median milliseconds (``<name>_ms``) and, for forward + backward, peak
    extra MiB (``<name>_mib``) of every implementation on one input set."""
    timer = Timer(args.device)
    usable = {}
    for name, impl in impls.items():
        try:
            for _ in range(args.warmup):
                run_once(impl, inputs, grad_out)
            usable[name] = impl
        except (RuntimeError, NotImplementedError) as e:  # e.g. a dtype it lacks
            first_line = str(e).strip().split('\n')[0]
            print(f'{name}: {first_line}', file=sys.stderr)
    times: Dict[str, List[float]] = {name: [] for name in usable}
    for _ in range(args.repeat):
        for name, impl in usable.items():
            times[name].append(timer(lambda impl=impl: run_once(impl, inputs, grad_out)))
    row = {
        f'{name}_ms': statistics.median(times[name]) if name in times else None for name in impls
    }
    if grad_out is not None and not args.no_memory:
        for name in impls:
            row[f'{name}_mib'] = None
            if name in usable:
                peak = peak_extra_memory(
                    args.device, lambda impl=usable[name]: run_once(impl, inputs, grad_out)
                )
                row[f'{name}_mib'] = peak / 2**20
    return row


def benchmark(args: argparse.Namespace) -> List[dict]:
    """Time (and measure) every implementation on every workload and dtype."""
    impls = get_impls(args.device, args.impls)
    rows = []
    for workload in args.workloads:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            base = make_inputs(workload, dtype, args.device, args.locations, args.seed)
            bs, num_queries = base[3].shape[:2]
            nh, d = base[0].shape[2:]
            gen = torch.Generator().manual_seed(args.seed + 1)
            grad_out = torch.randn(bs, num_queries, nh * d, generator=gen).to(args.device, dtype)
            for mode in ('forward', 'forward+backward'):
                backward = mode != 'forward'
                inputs = tuple(
                    t.detach().clone().requires_grad_(backward and t.is_floating_point())
                    for t in base
                )
                row = dict(workload=workload, dtype=dtype_name, mode=mode)
                row.update(measure(impls, inputs, grad_out if backward else None, args))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------
def fmt(x: Optional[float], spec: str = '.1f') -> str:
    return 'n/a' if x is None else format(x, spec)


def ratio(num: Optional[float], den: Optional[float]) -> str:
    return 'n/a' if num is None or den is None or den == 0 else f'{num / den:.1f}x'


def format_tables(rows: List[dict], impl_names: List[str]) -> str:
    """Markdown tables: times with speed-ups of ours, then peak memory."""
    others = [n for n in impl_names if n != 'ours']
    head = ['workload', 'dtype', 'pass'] + [f'{n} (ms)' for n in impl_names]
    head += [f'{n} / ours' for n in others]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for r in rows:
        cells = [r['workload'], r['dtype'], r['mode']]
        cells += [fmt(r.get(f'{n}_ms')) for n in impl_names]
        cells += [ratio(r.get(f'{n}_ms'), r.get('ours_ms')) for n in others]
        lines.append('| ' + ' | '.join(cells) + ' |')
    mem_rows = [r for r in rows if any(k.endswith('_mib') for k in r)]
    if mem_rows:
        head = ['workload', 'dtype'] + [f'{n} (MiB)' for n in impl_names]
        head += [f'ours / {n}' for n in others]
        lines += ['', 'Peak extra memory, forward + backward:', '']
        lines += ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
        for r in mem_rows:
            cells = [r['workload'], r['dtype']] + [fmt(r.get(f'{n}_mib')) for n in impl_names]
            for n in others:
                ours, other = r.get('ours_mib'), r.get(f'{n}_mib')
                cells.append('n/a' if ours is None or not other else f'{ours / other:.3f}')
            lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('--device cuda: no CUDA device is available')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows = benchmark(args)
    impl_names = list(get_impls(args.device, args.impls))
    if args.device == 'cuda':
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f'{torch.get_num_threads()} threads'
    print(
        f'# torch {torch.__version__}, device {args.device} ({device_name}), '
        f'locations {args.locations}, median of {args.repeat}'
    )
    print(format_tables(rows, impl_names))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
