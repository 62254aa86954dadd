"""Where an exported ONNX model (``tools/deployment/export.py``) spends its
time in ONNX Runtime: the operators' kernel times from ONNX Runtime's own
profiler (``SessionOptions.enable_profiling``), summed per operator type and
listed for the slowest nodes, per run of one random image.

    python tools/deployment/profile_onnxruntime.py MODEL [--shape H W] [--threads 2]
        [--iters 3] [--top 15]

The image is a random uint8 (H, W, 3) image (default 512x672, the size of
the deployment benchmark); the profile covers ``--iters`` runs after one
warm-up and reports milliseconds per run. Operator types are those of the
graph ONNX Runtime executes, after its own fusions (``FusedConv``,
``FusedGemm``, ``SkipLayerNormalization``, ...). The times are kernel times:
they add up to a little less than the run's wall time.

A missing or unreadable model, a model whose input is not one uint8
(H, W, 3) image, or a size the model does not take stops with a message
naming it (exit code 2). Needs onnxruntime and numpy only.
"""

import argparse
import collections
import json
import os.path as osp
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np


class InputError(Exception):
    """Bad input, named in the message."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='an exported .onnx file')
    parser.add_argument('--shape', type=int, nargs=2, default=(512, 672), metavar=('H', 'W'))
    parser.add_argument('--threads', type=int, default=2, help='intra-op threads')
    parser.add_argument('--iters', type=int, default=3, help='profiled runs (after 1 warm-up)')
    parser.add_argument('--top', type=int, default=15, help='slowest nodes listed')
    args = parser.parse_args(argv)
    if min(args.shape) < 1 or args.threads < 1 or args.iters < 1 or args.top < 0:
        parser.error('--shape, --threads and --iters must be >= 1, --top >= 0')
    return args


def open_session(path: str, threads: int, profile_dir: str):
    """An ONNX Runtime CPU session of ``path`` that profiles its runs into
    ``profile_dir``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise InputError(
            'onnxruntime is not installed: `pip install onnxruntime` or `pip install -e .[deploy]`'
        ) from e
    if not osp.isfile(path):
        raise InputError(f'model {path!r} not found')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = osp.join(profile_dir, 'profile')
    try:
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime raises its own exception types
        raise InputError(f'model {path!r} is not an ONNX model ONNX Runtime can run: {e}') from e
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != 'tensor(uint8)' or len(inputs[0].shape) != 3:
        found = [(i.name, i.type, i.shape) for i in inputs]
        raise InputError(
            f'model {path!r} takes {found}; expected one uint8 (H, W, 3) image '
            '(a file of tools/deployment/export.py)'
        )
    return session


def check_shape(session, path: str, shape: Tuple[int, int]) -> None:
    """Raise :class:`InputError` if a static axis of the model's input
    differs from ``shape``."""
    expected = session.get_inputs()[0].shape
    for axis, (dim, size) in enumerate(zip(expected, (*shape, 3))):
        if isinstance(dim, int) and dim != size:
            raise InputError(
                f'model {path!r} takes images of shape {expected} (exported with --shape); '
                f'got --shape {shape[0]} {shape[1]} (axis {axis}: {size})'
            )


def profile_runs(session, image: np.ndarray, iters: int) -> Tuple[List[Dict], List[float]]:
    """Run once untimed and ``iters`` times profiled; the profiler's events of
    the profiled runs and their wall times (ms)."""
    name = session.get_inputs()[0].name
    for _ in range(1 + iters):
        session.run(None, {name: image})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = sorted((e['ts'], e['ts'] + e['dur']) for e in events if e.get('name') == 'model_run')
    runs = runs[-iters:]  # the warm-up's run is the first
    if len(runs) < iters:
        raise RuntimeError(f'the profile holds {len(runs)} runs, expected {iters}')
    first = runs[0][0]
    profiled = [e for e in events if e.get('ts', -1) >= first and e.get('cat') == 'Node']
    return profiled, [(end - begin) / 1000 for begin, end in runs]


def summarize(events: List[Dict], iters: int) -> Tuple[Dict[str, Tuple[float, int]], List]:
    """Milliseconds and node count per run of every operator type, and of
    every node: ``({op_type: (ms, nodes)}, [(ms, op_type, node, input shapes)])``
    sorted from the slowest."""
    per_type = collections.Counter()
    calls = collections.Counter()
    per_node = collections.Counter()
    shapes = {}
    for event in events:
        if event.get('cat') != 'Node' or not event['name'].endswith('_kernel_time'):
            continue
        op_type = event['args']['op_name']
        node = event['name'][: -len('_kernel_time')]
        per_type[op_type] += event['dur']
        calls[op_type] += 1
        per_node[(op_type, node)] += event['dur']
        shapes[(op_type, node)] = [
            next(iter(s.values())) for s in event['args'].get('input_type_shape', [])
        ]
    types = {
        op_type: (us / iters / 1000, calls[op_type] // iters)
        for op_type, us in per_type.most_common()
    }
    nodes = [
        (us / iters / 1000, op_type, node, shapes[(op_type, node)])
        for (op_type, node), us in per_node.most_common()
    ]
    return types, nodes


def format_tables(
    types: Dict[str, Tuple[float, int]], nodes: List, wall_ms: float, top: int
) -> str:
    """Markdown tables of the operator types and the ``top`` slowest nodes."""
    total = sum(ms for ms, _ in types.values())
    lines = [
        f'kernel time {total:.1f} ms per run, wall time {wall_ms:.1f} ms (median)',
        '',
        '| operator | ms per run | share | nodes |',
        '| --- | --- | --- | --- |',
    ]
    for op_type, (ms, count) in types.items():
        lines.append(f'| {op_type} | {ms:.1f} | {100 * ms / total:.1f}% | {count} |')
    if top:
        lines += [
            '',
            '| node | operator | ms per run | input shapes |',
            '| --- | --- | --- | --- |',
        ]
        for ms, op_type, node, shapes in nodes[:top]:
            lines.append(f'| {node} | {op_type} | {ms:.2f} | {shapes} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Tuple[float, int]]:
    args = parse_args(argv)
    image = np.random.default_rng(0).integers(0, 256, (*args.shape, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as profile_dir:
        try:
            session = open_session(args.model, args.threads, profile_dir)
            check_shape(session, args.model, tuple(args.shape))
            try:
                events, walls = profile_runs(session, image, args.iters)
            except Exception as e:  # onnxruntime's failure on a size the graph cannot take
                raise InputError(
                    f'model {args.model!r} failed on a {args.shape[0]}x{args.shape[1]} image: {e}'
                ) from e
        except InputError as e:
            print(f'profile_onnxruntime.py: error: {e}', file=sys.stderr)
            sys.exit(2)
    types, nodes = summarize(events, args.iters)
    print(f'{args.model}: {args.shape[0]}x{args.shape[1]} image, {args.threads} threads')
    print(format_tables(types, nodes, float(np.median(walls)), args.top))
    return types


if __name__ == '__main__':
    main()
