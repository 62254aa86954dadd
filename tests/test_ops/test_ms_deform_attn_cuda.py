"""CUDA kernel of ``ms_deform_attn`` on a GPU.

Skipped only when no CUDA device is present. With a GPU, a build of
``mmdet_deform._C`` without its CUDA kernel fails these tests (rebuild with
``FORCE_CUDA=1``) instead of skipping them. See docs/cuda.md for the recipe.
"""

import pytest
import torch

from mmdet_deform.ops import (
    MultiScaleDeformableAttention,
    has_cuda_kernel,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)

from .msda_cuda_cases import (
    REL_TOL,
    SHAPE_CASES,
    assert_close_rel,
    make_inputs,
    reference,
    smooth_points,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
]

DEVICE = 'cuda'
backward_op = torch.ops.mmdet_deform._ms_deform_attn_backward if has_cuda_kernel() else None


@pytest.fixture(scope='module', autouse=True)
def require_cuda_kernel():
    assert has_cuda_kernel(), (
        'a GPU is present but mmdet_deform._C has no CUDA kernel: rebuild it with '
        'FORCE_CUDA=1 (see docs/cuda.md)'
    )


@pytest.fixture(params=[False, True], ids=['atomic', 'deterministic'])
def deterministic(request):
    """Runs a test with torch.use_deterministic_algorithms off and on."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(previous)


def run_op(inputs, grad_output):
    """Forward through the dispatcher and the backward op itself."""
    output = ms_deform_attn(*inputs)
    grads = backward_op(grad_output, *inputs)
    torch.cuda.synchronize()
    return output, grads


def check_against_reference(output, grads, inputs, grad_output, rel_tol):
    expected_output, expected_grads = reference(inputs, grad_output)
    assert_close_rel(output, expected_output, rel_tol, 'output')
    smooth = smooth_points(inputs)
    names = ('grad_value', 'grad_sampling_locations', 'grad_attention_weights')
    for name, actual, expected in zip(names, grads, expected_grads):
        if name == 'grad_sampling_locations':
            # the bilinear derivative jumps between cells: compare where it is defined
            actual, expected = actual[smooth], expected[smooth]
        assert_close_rel(actual, expected, rel_tol, name)


def grad_output_like(inputs, dtype, seed=0):
    value, _, _, locations, _ = inputs
    bs, num_queries = locations.shape[:2]
    g = torch.Generator().manual_seed(seed)
    size = (bs, num_queries, value.shape[2] * value.shape[3])
    return (torch.rand(size, generator=g, dtype=torch.float64) * 2 - 1).to(DEVICE, dtype)


EXTRA_CASES = [
    (5, [(20, 25), (10, 13), (5, 7), (3, 4)], 8, 32, 50, 4),  # a small encoder
    (2, [(9, 8), (5, 4)], 4, 256, 6, 2),  # head_dim > 32 lanes * vector: chunks
]


@pytest.mark.parametrize('case', SHAPE_CASES + EXTRA_CASES)
def test_float64_matches_reference(case, deterministic):
    inputs = make_inputs(*case, device=DEVICE, seed=1)
    grad_output = grad_output_like(inputs, torch.float64)
    output, grads = run_op(inputs, grad_output)
    check_against_reference(output, grads, inputs, grad_output, 1e-10)


@pytest.mark.parametrize('head_dim', [6, 32, 64])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_against_float64(dtype, head_dim, deterministic):
    case = (3, [(16, 20), (8, 10), (4, 5), (2, 3)], 8, head_dim, 40, 4)
    inputs = make_inputs(*case, dtype=dtype, device=DEVICE, seed=2)
    grad_output = grad_output_like(inputs, dtype)
    output, grads = run_op(inputs, grad_output)
    assert output.dtype == dtype and all(g.dtype == dtype for g in grads)
    check_against_reference(output, grads, inputs, grad_output, REL_TOL[dtype])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_matches_cpu_kernel(dtype):
    case = (2, [(10, 12), (5, 6)], 4, 16, 30, 4)
    inputs = make_inputs(*case, dtype=dtype, device=DEVICE, seed=3)
    grad_output = grad_output_like(inputs, dtype)
    output, grads = run_op(inputs, grad_output)
    cpu_inputs = [t.cpu() for t in inputs]
    cpu_output = ms_deform_attn(*cpu_inputs)
    cpu_grads = backward_op(grad_output.cpu(), *cpu_inputs)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert_close_rel(output.cpu(), cpu_output, tol, 'output')
    smooth = smooth_points(cpu_inputs)
    for i, (a, b) in enumerate(zip(grads, cpu_grads)):
        a = a.cpu()
        if i == 1:
            a, b = a[smooth], b[smooth]
        assert_close_rel(a, b, tol, f'grad {i}')


def test_gradcheck_float64():
    inputs = make_inputs(1, [(3, 4), (2, 2)], 2, 3, 3, 2, device=DEVICE, seed=4)
    value, shapes, starts, locations, weights = inputs
    # keep the points away from cell borders, where the derivative jumps
    locations = torch.rand_like(locations) * 0.8 + 0.1
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def fn(v, loc, w):
        return ms_deform_attn(v, shapes, starts, loc, w)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_deterministic_mode_is_bitwise_reproducible(dtype):
    """Thousands of queries sampling a tiny map: atomics would add in a
    different order on every run; the deterministic path may not."""
    inputs = make_inputs(2, [(4, 4), (2, 2)], 8, 32, 3000, 4, dtype=dtype, device=DEVICE, seed=5)
    grad_output = grad_output_like(inputs, dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = run_op(inputs, grad_output)[1]
        for _ in range(3):
            again = run_op(inputs, grad_output)[1]
            for a, b in zip(first, again):
                assert torch.equal(a, b)
        torch.use_deterministic_algorithms(False)
        atomic = run_op(inputs, grad_output)[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    for i, (a, b) in enumerate(zip(first, atomic)):
        assert_close_rel(a, b, REL_TOL[dtype] * 10, f'deterministic vs atomic grad {i}')


@pytest.mark.parametrize(('dtype', 'tolerance'), [(torch.float16, 0.02), (torch.bfloat16, 0.1)])
def test_module_under_autocast_has_no_nan(dtype, tolerance):
    """A mixed-precision step of the module: finite output and gradients, and
    an attention output close to float32 (relative Frobenius error; the
    module hands the op locations rounded to the value's dtype, about
    0.05 in bfloat16 on the CPU kernel)."""
    torch.manual_seed(0)
    shapes = torch.tensor([[32, 40], [16, 20], [8, 10], [4, 5]], device=DEVICE)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_keys = int(areas.sum())
    module = MultiScaleDeformableAttention(embed_dims=256, batch_first=True).to(DEVICE).eval()
    query = torch.randn(2, 300, 256, device=DEVICE)
    value = torch.randn(2, num_keys, 256, device=DEVICE)
    reference_points = torch.rand(2, 300, 4, 2, device=DEVICE)
    kwargs = dict(
        reference_points=reference_points, spatial_shapes=shapes, level_start_index=starts
    )

    with torch.no_grad():
        expected = module(query, value=value, **kwargs) - query  # residual removed
    with torch.autocast('cuda', dtype=dtype):
        output = module(query, value=value, **kwargs)
    output.float().square().mean().backward()
    assert torch.isfinite(output).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    attention = output.float() - query
    error = ((attention - expected).norm() / expected.norm()).item()
    assert error < tolerance, f'relative error {error:.3g} under autocast({dtype})'


def test_inputs_on_other_devices_are_rejected():
    inputs = make_inputs(1, [(3, 4)], 2, 8, 5, 2, device=DEVICE, dtype=torch.float32)
    value, shapes, starts, locations, weights = inputs
    with pytest.raises(RuntimeError, match='sampling_locations must be on the device of value'):
        ms_deform_attn(value, shapes, starts, locations.cpu(), weights)
    with pytest.raises(RuntimeError, match='attention_weights must be on the device of value'):
        ms_deform_attn(value, shapes, starts, locations, weights.cpu())
    with pytest.raises(RuntimeError, match='spatial_shapes must be on the device of value'):
        ms_deform_attn(value, shapes.cpu(), starts, locations, weights)
    with pytest.raises(RuntimeError, match='must be on the device of value'):
        ms_deform_attn(value.cpu(), shapes.cpu(), starts.cpu(), locations, weights)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match='sampling_locations must be on the device of value'):
            ms_deform_attn(value, shapes, starts, locations.to('cuda:1'), weights)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA devices')
def test_runs_on_a_non_current_device():
    inputs = make_inputs(2, [(6, 5), (3, 2)], 2, 16, 7, 2, device='cuda:1', seed=6)
    grad_output = grad_output_like(inputs, torch.float64).to('cuda:1')
    with torch.cuda.device(0):
        output = ms_deform_attn(*inputs)
        grads = backward_op(grad_output, *inputs)
    assert output.device == torch.device('cuda:1')
    check_against_reference(output, grads, inputs, grad_output, 1e-10)


def test_runs_on_the_current_stream():
    """With the default stream busy, the op on a side stream finishes first:
    its kernels were launched on the current (side) stream."""
    inputs = make_inputs(2, [(6, 5), (3, 2)], 2, 16, 7, 2, device=DEVICE, seed=7)
    grad_output = grad_output_like(inputs, torch.float64)
    expected = run_op(inputs, grad_output)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of work on the default stream
    with torch.cuda.stream(side):
        output, grads = ms_deform_attn(*inputs), backward_op(grad_output, *inputs)
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    assert not torch.cuda.default_stream().query(), 'the op waited for the default stream'
    torch.cuda.synchronize()
    assert torch.equal(output, expected[0])
    for a, b in zip(grads, expected[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    inputs = make_inputs(2, [(6, 5), (3, 2)], 4, 8, 7, 2, device=DEVICE, seed=8)
    value, shapes, starts, locations, weights = inputs
    # the same values through transposed storage
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    assert not value_t.is_contiguous() and not locations_t.is_contiguous()
    expected = ms_deform_attn(*inputs)
    torch.testing.assert_close(
        ms_deform_attn(value_t, shapes, starts, locations_t, weights), expected, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    'case',
    [
        (0, [(3, 4)], 2, 8, 5, 2),
        (2, [(3, 4)], 2, 8, 0, 2),
        (2, [(0, 4), (3, 0)], 2, 8, 5, 2),
        (2, [(3, 4)], 2, 8, 5, 0),
    ],
    ids=['bs0', 'queries0', 'keys0', 'points0'],
)
def test_empty_inputs(case, deterministic):
    inputs = make_inputs(*case, device=DEVICE, seed=9)
    value, _, _, locations, weights = inputs
    bs, _, num_heads, head_dim, num_queries, _ = case
    grad_output = grad_output_like(inputs, torch.float64)
    output, grads = run_op(inputs, grad_output)
    assert torch.equal(output.cpu(), torch.zeros(bs, num_queries, num_heads * head_dim).double())
    for grad, t in zip(grads, (value, locations, weights)):
        assert torch.equal(grad, torch.zeros_like(t))


@pytest.mark.slow
def test_offsets_beyond_int32():
    """value with more than 2**31 elements, sampled only in its last level, so
    every element offset the kernels compute exceeds 2**31."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f'needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free')
    num_heads, head_dim, num_queries = 8, 32, 20
    big_keys = 2930 * 2930  # * 8 heads * 32 channels > 2**31 elements
    tail_case = (1, [(6, 7)], num_heads, head_dim, num_queries, 2)
    tail, tail_shapes, tail_starts, tail_locations, tail_weights = make_inputs(
        *tail_case, dtype=torch.float16, device=DEVICE, seed=10
    )
    shapes = torch.tensor([[2930, 2930], [6, 7]], device=DEVICE)
    starts = torch.tensor([0, big_keys], device=DEVICE)
    value = torch.zeros(1, big_keys + 42, num_heads, head_dim, dtype=torch.float16, device=DEVICE)
    value[:, big_keys:] = tail
    assert value.numel() > 2**31
    # level 0 points lie far outside their map: only level 1 is sampled
    locations = torch.cat([torch.full_like(tail_locations, 5.0), tail_locations], 3)
    weights = torch.cat([torch.rand_like(tail_weights), tail_weights], 3)
    inputs = (value, shapes, starts, locations, weights)
    grad_output = grad_output_like(inputs, torch.float16)
    expected_output, expected_grads = reference(
        (tail, tail_shapes, tail_starts, tail_locations, tail_weights), grad_output
    )
    tol = REL_TOL[torch.float16]
    for det in (False, True):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(det)
        try:
            output, (grad_value, grad_locations, grad_weights) = run_op(inputs, grad_output)
        finally:
            torch.use_deterministic_algorithms(previous)
        assert_close_rel(output, expected_output, tol, 'output')
        assert_close_rel(grad_value[:, big_keys:], expected_grads[0], tol, 'grad_value')
        assert not grad_value[:, :big_keys].any()
        assert_close_rel(grad_weights[:, :, :, 1:], expected_grads[2], tol, 'grad_weights')
        assert not grad_weights[:, :, :, 0].any() and not grad_locations[:, :, :, 0].any()
        del grad_value


def test_reference_agrees_on_cuda():
    """The float64 reference itself gives the same on CUDA and CPU (the
    tests above compute it on the GPU)."""
    inputs = make_inputs(2, [(6, 5), (3, 2)], 2, 8, 7, 2, device=DEVICE, seed=11)
    expected = ms_deform_attn_pytorch(*[t.cpu() for t in inputs])
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs).cpu(), expected)
