"""tools/analysis_tools/benchmark_msda.py runs end to end (on a tiny workload)
and measures what it claims to."""

import importlib.util
import os.path as osp

import torch


def load_script(repo_root):
    path = osp.join(repo_root, 'tools', 'analysis_tools', 'benchmark_msda.py')
    spec = importlib.util.spec_from_file_location('benchmark_msda', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prints_side_by_side_table(repo_root, capsys):
    bench = load_script(repo_root)
    bench.main(['--workloads', 'tiny', '--repeat', '1', '--warmup', '1'])
    out = capsys.readouterr().out
    assert '| ours (ms) | mmcv_grid_sample (ms) | reference (ms) |' in out
    for dtype in ('float32', 'bfloat16'):
        for mode in ('forward', 'forward+backward'):
            assert f'| tiny | {dtype} | {mode} |' in out
    assert 'Peak extra memory, forward + backward' in out
    assert 'n/a' not in out  # every implementation ran in both dtypes


def test_encoder_inputs_follow_the_workload(repo_root):
    bench = load_script(repo_root)
    value, shapes, starts, loc, weights = bench.make_inputs(
        'encoder', torch.float32, 'cpu', 'reference', 0
    )
    # a 512 x 672 image at strides 8-64: 5376 + 1344 + 336 + 88 = 7,144 keys
    assert value.shape == (2, 7144, 8, 32)
    assert shapes.tolist() == [[64, 84], [32, 42], [16, 21], [8, 11]]
    assert starts.tolist() == [0, 5376, 6720, 7056]
    assert loc.shape == (2, 7144, 8, 4, 4, 2) and weights.shape == (2, 7144, 8, 4, 4)
    assert torch.allclose(weights.sum((-1, -2)), torch.ones(()))
    # reference locations: each query samples a few pixels from its own pixel centre
    sizes = torch.tensor([[84, 64], [42, 32], [21, 16], [11, 8]])  # (w, h)
    query_level = torch.repeat_interleave(torch.arange(4), sizes.prod(-1))
    centres = torch.cat(
        [
            torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing='xy'), -1).view(
                -1, 2
            )
            for w, h in sizes.tolist()
        ]  # fmt: skip
    )
    centres = (centres + 0.5) / sizes[query_level]  # (num_queries, 2), normalised (x, y)
    offset = (loc - centres[None, :, None, None, None, :]) * sizes[:, None, :]  # pixels
    distance = offset.norm(dim=-1).mean((0, 1, 2, 4))  # per level
    assert ((distance > 1) & (distance < 6)).all(), distance


def test_peak_memory_counts_tensors_allocated_during_the_call(repo_root):
    bench = load_script(repo_root)
    keep = []

    def allocate():
        a = torch.empty(1 << 20, dtype=torch.uint8)  # 1 MiB, freed
        b = torch.empty(3 << 20, dtype=torch.uint8)  # 3 MiB, kept
        del a
        keep.append(b)
        torch.empty(2 << 20, dtype=torch.uint8)  # 2 MiB, freed at once

    peak = bench.peak_extra_memory('cpu', allocate)
    assert 5 << 20 <= peak <= (5 << 20) + (64 << 10)
