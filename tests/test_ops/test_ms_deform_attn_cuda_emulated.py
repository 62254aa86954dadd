"""The CUDA kernels of ``ms_deform_attn``, run on the CPU by an emulator.

``mmdet_deform/ops/csrc/cuda/ms_deform_attn_cuda.cuh`` (the very source the
GPU build compiles) is compiled with g++ against ``cuda_emulation/``, which
runs every launch with one thread per CUDA thread, real warp-shuffle
exchanges and atomics, and checks what a GPU or compute-sanitizer would
catch: out-of-bounds or misaligned vector accesses, writes past any
allocation, reads of never-written memory (poisoned with NaN), shuffles that
not every lane of the group reaches or that lanes call differently, and
empty launches. This checks the kernels' indexing, vector widths, lane
groups, chunking, shuffle reductions, both grad_value paths and the host
orchestration on every CI run; it does not check GPU-only behaviour (the
sm_90 vector atomics, real scheduling, speed), which
test_ms_deform_attn_cuda.py covers on a GPU.

Compiling the emulator takes about a minute (cached by torch in
``~/.cache/torch_extensions`` afterwards); emulated launches are slow, so the
cases are small.
"""

import os.path as osp

import pytest
import torch

from .msda_cuda_cases import (
    REL_TOL,
    SHAPE_CASES,
    assert_close_rel,
    make_inputs,
    reference,
    smooth_points,
)

pytestmark = pytest.mark.slow

HERE = osp.dirname(osp.abspath(__file__))
REPO_ROOT = osp.dirname(osp.dirname(HERE))
CSRC = osp.join(REPO_ROOT, 'mmdet_deform', 'ops', 'csrc')


@pytest.fixture(scope='module')
def emu():
    """The emulated kernels: forward(...) -> (output, launches),
    backward(...) -> (grad_value, grad_locations, grad_weights, launches),
    geometry(value, offset) -> (vector width, lanes per group, chunks)."""
    from torch.utils.cpp_extension import load

    emulation_dir = osp.join(HERE, 'cuda_emulation')
    return load(
        name='mmdet_deform_msda_cuda_emulation',
        sources=[osp.join(emulation_dir, 'msda_cuda_emulation.cpp')],
        extra_include_paths=[emulation_dir, CSRC],
        extra_cflags=['-O1', '-fvisibility=hidden', '-std=c++20'],
        verbose=False,
    )


def run_both(emu, inputs, grad_output, deterministic, offset=0):
    output, _ = emu.forward(*inputs, offset)
    grads = emu.backward(grad_output, *inputs, deterministic, offset)[:3]
    return output, grads


def check_against_reference(output, grads, inputs, grad_output, rel_tol):
    expected_output, expected_grads = reference(inputs, grad_output)
    assert_close_rel(output, expected_output, rel_tol, 'output')
    smooth = smooth_points(inputs)
    names = ('grad_value', 'grad_sampling_locations', 'grad_attention_weights')
    for name, actual, expected in zip(names, grads, expected_grads):
        if name == 'grad_sampling_locations':
            actual, expected = actual[smooth], expected[smooth]
        assert_close_rel(actual, expected, rel_tol, name)


@pytest.mark.parametrize('deterministic', [False, True], ids=['atomic', 'deterministic'])
@pytest.mark.parametrize('case', SHAPE_CASES, ids=[f'case{i}' for i in range(len(SHAPE_CASES))])
def test_float64_matches_reference(emu, case, deterministic):
    inputs = make_inputs(*case, seed=1)
    bs, _, num_heads, head_dim, num_queries, _ = case
    grad_output = torch.rand(bs, num_queries, num_heads * head_dim, dtype=torch.float64) * 2 - 1
    output, grads = run_both(emu, inputs, grad_output, deterministic)
    check_against_reference(output, grads, inputs, grad_output, REL_TOL[torch.float64])


def test_cases_cover_every_layout(emu):
    """The shape cases reach 1-lane and 32-lane groups, idle lanes and
    several chunks, so the tests above exercise each of them."""
    layouts = set()
    for case in SHAPE_CASES:
        value = make_inputs(*case)[0]
        layouts.add(emu.geometry(value, 0))
    vec_group_chunks = sorted(layouts)
    assert (1, 1, 1) in vec_group_chunks  # head_dim 1: one lane
    assert (1, 8, 1) in vec_group_chunks  # head_dim 7: 7 of 8 lanes busy
    assert (2, 32, 2) in vec_group_chunks  # head_dim 70 in float64: two chunks


@pytest.mark.parametrize('deterministic', [False, True], ids=['atomic', 'deterministic'])
@pytest.mark.parametrize('head_dim', [6, 32])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64(emu, dtype, head_dim, deterministic):
    case = (2, [(5, 6), (2, 3)], 2, head_dim, 7, 3)
    inputs = make_inputs(*case, dtype=dtype, seed=2)
    grad_output = (torch.rand(2, 7, 2 * head_dim, dtype=torch.float64) * 2 - 1).to(dtype)
    output, grads = run_both(emu, inputs, grad_output, deterministic)
    assert output.dtype == dtype and all(g.dtype == dtype for g in grads)
    # the reference sees exactly the (rounded) values the kernel read
    check_against_reference(output, grads, inputs, grad_output, REL_TOL[dtype])


@pytest.mark.parametrize(
    ('dtype', 'offset', 'vec'),
    [
        (torch.float32, 0, 4),
        (torch.float32, 1, 1),
        (torch.float32, 2, 2),
        (torch.float16, 0, 8),
        (torch.float16, 4, 4),
        (torch.float16, 1, 1),
        (torch.float64, 1, 1),
    ],
)
def test_misaligned_inputs_use_narrower_vectors(emu, dtype, offset, vec):
    """Inputs starting `offset` elements after an aligned address get the
    widest vector their alignment allows (the emulator rejects any
    misaligned vector access) and the same result."""
    case = (1, [(4, 3), (2, 2)], 2, 16, 5, 2)
    inputs = make_inputs(*case, dtype=dtype, seed=3)
    assert emu.geometry(inputs[0], offset)[0] == vec
    grad_output = (torch.rand(1, 5, 32, dtype=torch.float64) * 2 - 1).to(dtype)
    for deterministic in (False, True):
        output, grads = run_both(emu, inputs, grad_output, deterministic, offset=offset)
        check_against_reference(output, grads, inputs, grad_output, REL_TOL[dtype])


@pytest.mark.parametrize('deterministic', [False, True], ids=['atomic', 'deterministic'])
def test_non_finite_and_far_locations_contribute_zero(emu, deterministic):
    value, shapes, starts, locations, weights = make_inputs(2, [(4, 5), (2, 2)], 2, 8, 6, 3, seed=4)
    bad = [float('nan'), float('inf'), -float('inf'), 1e30, -1e30, 3.0]
    for i, x in enumerate(bad):
        locations[0, i, 0, 0, 0, i % 2] = x  # one coordinate bad
        locations[1, i, 1, 1, 2] = x  # both coordinates bad
    grad_output = torch.rand(2, 6, 16, dtype=torch.float64) * 2 - 1
    output, grads = run_both(
        emu, (value, shapes, starts, locations, weights), grad_output, deterministic
    )
    # expected: the reference with those points moved far outside the maps
    far = torch.where(torch.isfinite(locations), locations, torch.full_like(locations, 5.0))
    expected_inputs = (value, shapes, starts, far, weights)
    check_against_reference(output, grads, expected_inputs, grad_output, 1e-12)
    for i in range(len(bad)):
        for point in ((0, i, 0, 0, 0), (1, i, 1, 1, 2)):
            assert (grads[1][point] == 0).all() and grads[2][point] == 0


def test_deterministic_grad_value_is_reproducible(emu):
    """Many queries sample the same few keys: the atomic path adds them in
    whatever order threads run, the deterministic path in a fixed order."""
    inputs = make_inputs(2, [(2, 2)], 2, 8, 40, 4, dtype=torch.float32, seed=5)
    grad_output = torch.rand(2, 40, 16) * 2 - 1
    first = emu.backward(grad_output, *inputs, True, 0)[:3]
    for _ in range(2):
        again = emu.backward(grad_output, *inputs, True, 0)[:3]
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    atomic = emu.backward(grad_output, *inputs, False, 0)[:3]
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_deterministic_path_launches_sort_pipeline(emu):
    """Deterministic mode runs backward + contribution keys + gather (3
    launches), the atomic path a single backward launch."""
    inputs = make_inputs(1, [(3, 3)], 1, 4, 2, 1, seed=6)
    grad_output = torch.rand(1, 2, 4, dtype=torch.float64)
    assert emu.backward(grad_output, *inputs, False, 0)[3] == 1
    assert emu.backward(grad_output, *inputs, True, 0)[3] == 3


@pytest.mark.parametrize(
    'case',
    [
        (0, [(3, 4)], 2, 8, 5, 2),  # empty batch
        (2, [(3, 4)], 2, 8, 0, 2),  # no queries
        (2, [(0, 4), (3, 0)], 2, 8, 5, 2),  # no keys
        (2, [(3, 4)], 2, 8, 5, 0),  # no points
    ],
    ids=['bs0', 'queries0', 'keys0', 'points0'],
)
def test_empty_inputs(emu, case):
    inputs = make_inputs(*case, seed=7)
    bs, _, num_heads, head_dim, num_queries, _ = case
    grad_output = torch.rand(bs, num_queries, num_heads * head_dim, dtype=torch.float64)
    value, _, _, locations, weights = inputs
    for deterministic in (False, True):
        output, grads = run_both(emu, inputs, grad_output, deterministic)
        # nothing to sample, or nobody sampling: zeros of the right shapes
        assert torch.equal(output, torch.zeros(bs, num_queries, num_heads * head_dim).double())
        for grad, t in zip(grads, (value, locations, weights)):
            assert torch.equal(grad, torch.zeros_like(t))
