"""Float32 matrix products of the encoder's Linear layers in torch and in ONNX
Runtime, side by side in one run: how much of the gap between our eager model
and its ONNX Runtime export is the runtimes' GEMM kernels alone.

    OMP_NUM_THREADS=2 python tools/analysis_tools/benchmark_gemm_runtimes.py --threads 2

Every shape is ``(tokens, in) @ (in, out) + bias``, as ``nn.Linear`` on the
encoder's tokens (7,144 for a 512x672 image): torch runs
``torch.nn.functional.linear``, ONNX Runtime a one-node ``Gemm`` graph
(``transB=1``, the weight as an initializer: prepacked, as in an exported
model). The runtimes run in blocks (1 warm-up + ``--iters`` timed calls),
alternating for ``--rounds`` rounds; ONNX Runtime's threads do not spin
between calls. Blocks, not call-by-call turns: right after a torch call,
torch's OpenMP workers keep spinning for a while and take a core from the next
runtime, which made ONNX Runtime's call up to twice as slow when the two
alternated call by call (``GOMP_SPINCOUNT=0`` removes that effect, and so
does the untimed first call of every block). Prints the medians and torch's
speed-up over ONNX Runtime.
"""

import argparse
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

#: (tokens, in, out) of the encoder's Linear layers at 512x672: the FFN's two
#: layers and the attention's value / output projections
SHAPES = ((7144, 256, 1024), (7144, 1024, 256), (7144, 256, 256))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--iters', type=int, default=5, help='timed calls per block (after a warm-up call)'
    )
    parser.add_argument(
        '--rounds', type=int, default=4, help='blocks per runtime and shape, alternating'
    )
    parser.add_argument(
        '--shape',
        type=int,
        nargs=3,
        action='append',
        metavar=('TOKENS', 'IN', 'OUT'),
        help='a shape to time (repeatable; default: the encoder Linear layers at 512x672)',
    )
    args = parser.parse_args(argv)
    if min(args.threads, args.iters, args.rounds) < 1:
        parser.error('--threads, --iters and --rounds must be >= 1')
    if args.shape and min(min(s) for s in args.shape) < 1:
        parser.error(f'--shape sizes must be >= 1, got {args.shape}')
    return args


def gemm_session(weight: np.ndarray, bias: np.ndarray, threads: int):
    """An ONNX Runtime session of ``y = x @ weight.T + bias`` (one ``Gemm``)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise SystemExit(
            f'benchmark_gemm_runtimes.py needs onnx and onnxruntime ({e}): '
            '`pip install -e .[deploy]`'
        ) from e

    out_features, in_features = weight.shape
    graph = helper.make_graph(
        [helper.make_node('Gemm', ['x', 'weight', 'bias'], ['y'], transB=1)],
        'linear',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['tokens', in_features])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['tokens', out_features])],
        [numpy_helper.from_array(weight, 'weight'), numpy_helper.from_array(bias, 'bias')],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=['CPUExecutionProvider']
    )


def time_shape(shape: Sequence[int], threads: int, iters: int, rounds: int) -> Dict[str, float]:
    """Median milliseconds of torch and ONNX Runtime for one shape (``rounds``
    alternating blocks of a warm-up and ``iters`` timed calls each), and their
    outputs' largest difference."""
    tokens, in_features, out_features = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, in_features), dtype=np.float32)
    weight = (rng.standard_normal((out_features, in_features)) / in_features**0.5).astype(
        np.float32
    )
    bias = rng.standard_normal(out_features, dtype=np.float32)
    session = gemm_session(weight, bias, threads)
    x_t, weight_t, bias_t = (torch.from_numpy(a) for a in (x, weight, bias))
    steps = {
        'torch': lambda: torch.nn.functional.linear(x_t, weight_t, bias_t),
        'onnxruntime': lambda: session.run(None, {'x': x})[0],
    }
    samples = {name: [] for name in steps}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, step in steps.items():
                step()  # warm-up: the other runtime's threads settle
                for _ in range(iters):
                    start = time.perf_counter()
                    step()
                    samples[name].append(1000 * (time.perf_counter() - start))
        difference = np.abs(steps['torch']().numpy() - steps['onnxruntime']()).max()
    result = {name: statistics.median(values) for name, values in samples.items()}
    result['max_abs_difference'] = float(difference)
    return result


def format_table(results: Dict[Tuple[int, int, int], Dict[str, float]], threads: int) -> str:
    lines = [
        f'| shape (tokens x in -> out), {threads} threads | torch (ms) | ONNX Runtime (ms) | '
        'torch speed-up | max abs difference |',
        '| --- | --- | --- | --- | --- |',
    ]
    for (tokens, in_features, out_features), r in results.items():
        lines.append(
            f'| {tokens} x {in_features} -> {out_features} | {r["torch"]:.2f} | '
            f'{r["onnxruntime"]:.2f} | {r["onnxruntime"] / r["torch"]:.2f}x | '
            f'{r["max_abs_difference"]:.1e} |'
        )
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[Tuple[int, int, int], Dict[str, float]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(s) for s in args.shape] if args.shape else list(SHAPES)
    results = {shape: time_shape(shape, args.threads, args.iters, args.rounds) for shape in shapes}
    print(format_table(results, args.threads))
    return results


if __name__ == '__main__':
    main()
