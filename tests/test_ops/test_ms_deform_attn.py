"""The compiled MSDA op (``torch.ops.mmdet_deform.ms_deform_attn``) against
its pure-PyTorch reference: values and gradients over many shapes, dtypes,
autocast, special inputs, determinism, threads, and the ``torch.library``
integration (gradcheck, opcheck, torch.compile)."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

from mmdet_deform.ops import ms_deform_attn, ms_deform_attn_pytorch

from .msda_inputs import DEVICES, assert_all_close, make_inputs, with_grad
from .msda_inputs import forward_backward as fwd_bwd

# --------------------------------------------------------------------------
# float64 against the reference over many shapes
# --------------------------------------------------------------------------
# levels x heads x head_dim x points x batch; queries cycle through 1..50
SHAPES = list(itertools.product((1, 4), (1, 8), (1, 7, 32), (1, 4), (1, 3, 5)))
QUERIES = (1, 2, 13, 29, 50)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize(
    'num_levels,num_heads,head_dim,num_points,bs',
    SHAPES,
    ids=[f'l{nl}-h{nh}-d{d}-p{np}-b{bs}' for nl, nh, d, np, bs in SHAPES],
)
def test_float64_matches_reference(device, num_levels, num_heads, head_dim, num_points, bs):
    case = SHAPES.index((num_levels, num_heads, head_dim, num_points, bs))
    inputs = make_inputs(
        bs, QUERIES[case % len(QUERIES)], num_heads, head_dim, num_levels, num_points,
        device=device, seed=case,
    )  # fmt: skip
    actual = fwd_bwd(ms_deform_attn, inputs)
    expected = fwd_bwd(ms_deform_attn_pytorch, inputs)
    assert actual[0].shape == (bs, QUERIES[case % len(QUERIES)], num_heads * head_dim)
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('head_dim', [2, 4, 8, 12, 16, 24, 40, 64, 72])
def test_every_channel_block_width(device, dtype, head_dim):
    """head_dims that exercise every SIMD block width and the scalar tail."""
    inputs = make_inputs(2, 9, 3, head_dim, 2, 2, dtype=dtype, device=device, seed=head_dim)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    expected = fwd_bwd(ms_deform_attn_pytorch, inputs)
    assert_all_close(fwd_bwd(ms_deform_attn, inputs), expected, **tol)


# --------------------------------------------------------------------------
# lower precision against float64
# --------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize(
    'dtype,tol',
    [
        # location gradients scale by the map size and cancel: 1e-4
        (torch.float32, dict(rtol=1e-4, atol=1e-4)),
        # bf16 outputs are rounded to 8 bits of mantissa (the sums are float32)
        (torch.bfloat16, dict(rtol=1.6e-2, atol=1e-2)),
    ],
)
@pytest.mark.parametrize('head_dim', [7, 32])
def test_low_precision_matches_float64(device, dtype, tol, head_dim):
    inputs = make_inputs(3, 40, 8, head_dim, 4, 4, dtype=dtype, device=device, seed=1)
    # the float64 truth of the same (rounded) inputs
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    grad_out = torch.randn(3, 40, 8 * head_dim, dtype=torch.float64).to(device, dtype)
    actual = fwd_bwd(ms_deform_attn, inputs, grad_out)
    expected = fwd_bwd(ms_deform_attn_pytorch, exact, grad_out.double())
    for a in actual:
        assert a.dtype == dtype
    assert_all_close(actual, expected, loc=inputs[3], shapes=inputs[1], **tol)


def test_reference_low_precision_on_a_wide_map():
    """The reference computes bfloat16 inputs in float32: pixel coordinates
    and gather indices stay exact on a map wider than 256 pixels (in bf16
    they would round, up to an index past the end of the map)."""
    from .msda_inputs import level_metadata

    gen = torch.Generator().manual_seed(0)
    shapes, starts = level_metadata(((3, 600),))
    value = torch.randn(1, 1800, 2, 4, generator=gen).bfloat16()
    loc = torch.rand(1, 50, 2, 1, 2, 2, generator=gen).bfloat16()
    loc[0, 0, 0, 0, 0] = torch.tensor([1.0, 1.0])  # the last pixel's far corner
    weights = torch.rand(1, 50, 2, 1, 2, generator=gen).bfloat16()
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, weights)
    assert out.dtype == torch.bfloat16
    exact = ms_deform_attn_pytorch(value.double(), shapes, starts, loc.double(), weights.double())
    assert_close(out.double(), exact, rtol=1.6e-2, atol=1e-2)


def test_reference_gathers_the_right_key_past_2_to_the_24():
    """Gather indices are int64: on a map of more than 2**24 keys a float32
    index would round an odd key to its even neighbour."""
    h = w = 4100  # 16,810,000 keys
    key = 2**24 + 2 * w + 41  # odd, past 2**24
    yc, xc = divmod(key, w)
    value = torch.zeros(1, h * w, 1, 1)
    value[0, key] = 1.0
    shapes = torch.tensor([[h, w]])
    starts = torch.tensor([0])
    # the centre of the key's pixel (float64 locations, rounded by the reference to float32)
    loc = torch.tensor([(xc + 0.5) / w, (yc + 0.5) / h], dtype=torch.float64)
    loc = loc.view(1, 1, 1, 1, 1, 2).float()
    weights = torch.ones(1, 1, 1, 1, 1)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, weights)
    assert out.item() > 0.99


def test_im2col_step_is_accepted_for_mmcv_callers():
    """mmcv's ``MultiScaleDeformableAttnFunction.apply(..., im2col_step)``
    passes im2col_step last; the wrapper accepts it (any batch runs in one
    launch) and rejects nonsense."""
    inputs = make_inputs(bs=2, num_levels=2, num_heads=2, head_dim=4, num_points=2)
    expected = ms_deform_attn(*inputs)
    assert torch.equal(ms_deform_attn(*inputs, 64), expected)
    assert torch.equal(ms_deform_attn(*inputs, im2col_step=1), expected)
    for bad in (0, -1, 2.0, True, '64'):
        with pytest.raises(ValueError, match='im2col_step'):
            ms_deform_attn(*inputs, im2col_step=bad)


def test_mixed_float_dtypes_raise_type_error():
    value, shapes, starts, loc, weights = make_inputs(dtype=torch.float32)
    with pytest.raises(TypeError, match='sampling_locations must have the dtype of value'):
        ms_deform_attn(value, shapes, starts, loc.double(), weights)
    with pytest.raises(TypeError, match='attention_weights must have the dtype of value'):
        ms_deform_attn(value, shapes, starts, loc, weights.bfloat16())


def test_float16_on_cpu_raises_type_error():
    inputs = [t.half() if t.is_floating_point() else t for t in make_inputs()]
    with pytest.raises(TypeError, match=r'float32, float64 or bfloat16, got Half'):
        ms_deform_attn(*inputs)


# --------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
def test_autocast_runs_float32_unless_all_bfloat16(device):
    value, shapes, starts, loc, weights = make_inputs(2, 6, 2, 8, 2, 3, torch.float32, device)
    low = torch.bfloat16
    with torch.autocast(device, dtype=low):
        out_f32 = ms_deform_attn(value, shapes, starts, loc, weights)
        out_mixed = ms_deform_attn(value.to(low), shapes, starts, loc, weights)
        out_bf16 = ms_deform_attn(value.to(low), shapes, starts, loc.to(low), weights.to(low))
    assert out_f32.dtype == torch.float32
    assert_close(out_f32, ms_deform_attn(value, shapes, starts, loc, weights), rtol=0, atol=0)
    # mixed: value is upcast, the float32 locations keep their precision
    assert out_mixed.dtype == torch.float32
    expected = ms_deform_attn(value.to(low).float(), shapes, starts, loc, weights)
    assert_close(out_mixed, expected, rtol=0, atol=0)
    assert out_bf16.dtype == low
    expected = ms_deform_attn(value.to(low), shapes, starts, loc.to(low), weights.to(low))
    assert_close(out_bf16, expected, rtol=0, atol=0)


@pytest.mark.parametrize('device', DEVICES)
def test_autocast_backward_reaches_low_precision_leaves(device):
    value, shapes, starts, loc, weights = make_inputs(2, 6, 2, 8, 2, 3, torch.float32, device)
    value = value.bfloat16().requires_grad_()
    loc.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ms_deform_attn(value, shapes, starts, loc, weights)
    out.sum().backward()
    assert value.grad.dtype == torch.bfloat16 and loc.grad.dtype == torch.float32
    expected = fwd_bwd(
        ms_deform_attn,
        (value.detach().float(), shapes, starts, loc.detach(), weights),
        torch.ones_like(out),
    )
    assert_close(value.grad, expected[1].bfloat16())
    assert_close(loc.grad, expected[2])


def test_autocast_kernels_are_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        'mmdet_deform::ms_deform_attn', 'AutocastCPU'
    )


# --------------------------------------------------------------------------
# special inputs
# --------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_non_finite_locations_contribute_zero(device, dtype):
    value, shapes, starts, loc, weights = make_inputs(2, 7, 2, 5, 2, 3, dtype, device)
    special = torch.tensor([float('nan'), float('inf'), -float('inf'), 1e30, -1e30])
    bad = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    bad[0, 0, 0, 0, :] = True
    bad[1, 3, 1, 1, 1] = True
    bad[1, 6, :, 0, 2] = True
    n = int(bad.sum())
    bad = bad.to(device)
    loc_bad = loc.clone()
    loc_bad[bad] = torch.stack([special.repeat(n)[:n], special.roll(2).repeat(n)[:n]], -1).to(
        device, dtype
    )
    actual = fwd_bwd(ms_deform_attn, (value, shapes, starts, loc_bad, weights))
    # the same points with zero attention weight, at a finite location
    loc_ok = torch.where(bad[..., None], torch.full_like(loc, 0.5), loc)
    expected = fwd_bwd(ms_deform_attn_pytorch, (value, shapes, starts, loc_ok, weights * ~bad))
    for t in actual:
        assert torch.isfinite(t).all()
    assert_close(actual[0], expected[0])
    assert_close(actual[1], expected[1])
    assert (actual[2][bad] == 0).all() and (actual[3][bad] == 0).all()
    assert_close(actual[2][~bad], expected[2][~bad])
    assert_close(actual[3][~bad], expected[3][~bad])


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize(
    'sizes',
    [
        dict(bs=0),
        dict(num_queries=0),
        dict(num_points=0),
        dict(head_dim=0),
        dict(bs=0, num_queries=0),
    ],
    ids=lambda s: ','.join(f'{k}={v}' for k, v in s.items()),
)
def test_empty_inputs(device, sizes):
    args = dict(bs=2, num_queries=3, num_heads=2, head_dim=4, num_levels=2, num_points=2)
    args.update(sizes)
    inputs = make_inputs(**args, device=device)
    out, grad_value, grad_loc, grad_weights = fwd_bwd(ms_deform_attn, inputs)
    assert out.shape == (args['bs'], args['num_queries'], args['num_heads'] * args['head_dim'])
    assert (out == 0).all()
    for grad, t in zip((grad_value, grad_loc, grad_weights), (inputs[0], inputs[3], inputs[4])):
        assert grad.shape == t.shape and (grad == 0).all()


@pytest.mark.parametrize('device', DEVICES)
def test_empty_levels_and_maps(device):
    """A level with h = 0 (no keys) and zero levels: every point is outside."""
    shapes = torch.tensor([[0, 4], [2, 3]], device=device)
    starts = torch.tensor([0, 0], device=device)
    value = torch.randn(2, 6, 2, 3, dtype=torch.float64, device=device)
    loc = torch.rand(2, 4, 2, 2, 2, 2, dtype=torch.float64, device=device)
    weights = torch.rand(2, 4, 2, 2, 2, dtype=torch.float64, device=device)
    inputs = (value, shapes, starts, loc, weights)
    assert_all_close(fwd_bwd(ms_deform_attn, inputs), fwd_bwd(ms_deform_attn_pytorch, inputs))
    no_levels = (
        torch.randn(2, 0, 2, 3, dtype=torch.float64, device=device),
        torch.zeros(0, 2, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        loc[:, :, :, :0],
        weights[:, :, :, :0],
    )
    out = ms_deform_attn(*no_levels)
    assert out.shape == (2, 4, 6) and (out == 0).all()


@pytest.mark.parametrize('device', DEVICES)
def test_non_contiguous_inputs(device):
    value, shapes, starts, loc, weights = make_inputs(3, 11, 4, 6, 4, 2, device=device)
    # same values, other memory layouts
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_nc = torch.stack([loc[..., 0], loc[..., 1]], 0).movedim(0, -1)
    weights_nc = torch.cat([weights, weights], -1)[..., : weights.shape[-1]]
    shapes_nc = shapes.t().contiguous().t()
    starts_nc = torch.stack([starts, starts], 1)[:, 0]
    for t in (value_nc, loc_nc, weights_nc, shapes_nc, starts_nc):
        assert not t.is_contiguous()
    grad_out = torch.randn(3, 11, 24, dtype=torch.float64, device=device)
    actual = fwd_bwd(
        ms_deform_attn,
        (value_nc, shapes_nc, starts_nc, loc_nc, weights_nc),
        grad_out.transpose(0, 1).contiguous().transpose(0, 1),
    )
    expected = fwd_bwd(ms_deform_attn, (value, shapes, starts, loc, weights), grad_out)
    assert_all_close(actual, expected, rtol=0, atol=0)
    # a non-contiguous grad_output straight into the backward op
    grads = torch.ops.mmdet_deform._ms_deform_attn_backward(
        grad_out.transpose(0, 1).contiguous().transpose(0, 1), value, shapes, starts, loc, weights
    )
    assert_all_close((expected[0],) + tuple(grads), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------
# determinism and threads (CPU)
# --------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    'bs,num_heads',
    [(2, 8), (1, 1)],
    ids=['owned-slices', 'query-groups'],
)
def test_backward_is_bitwise_deterministic(restore_threads, bs, num_heads):
    """Run-to-run identical gradients at a fixed thread count, both with one
    (batch, head) slice per task and with query groups (bs * heads < threads)."""
    torch.set_num_threads(2)
    inputs = make_inputs(bs, 300, num_heads, 32, 4, 4, torch.float32, low=0.2, high=0.4)
    grad_out = torch.randn(bs, 300, num_heads * 32)
    first = torch.ops.mmdet_deform._ms_deform_attn_backward(grad_out, *inputs)
    for _ in range(3):
        again = torch.ops.mmdet_deform._ms_deform_attn_backward(grad_out, *inputs)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize('bs,num_heads', [(2, 8), (1, 1)], ids=['owned-slices', 'query-groups'])
def test_one_and_two_threads_agree(restore_threads, bs, num_heads):
    inputs = make_inputs(bs, 200, num_heads, 16, 4, 4, torch.float64)
    torch.set_num_threads(1)
    one = fwd_bwd(ms_deform_attn, inputs)
    torch.set_num_threads(2)
    two = fwd_bwd(ms_deform_attn, inputs)
    assert_all_close(two, one, rtol=1e-12, atol=1e-12)
    if bs * num_heads >= 2:  # one query group per (batch, head) at 1 and 2 threads
        for a, b in zip(one, two):
            assert torch.equal(a, b)


def test_baseline_isa_matches_reference(repo_root):
    """The kernels compiled for the baseline ISA (taken when torch itself runs
    without AVX2: ATEN_CPU_CAPABILITY=default), in a subprocess."""
    script = textwrap.dedent(
        """
        import torch
        from mmdet_deform.ops import ms_deform_attn, ms_deform_attn_pytorch
        from tests.test_ops.msda_inputs import assert_all_close, forward_backward, make_inputs
        assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 1.6e-2)):
            for head_dim in (3, 8, 32, 40):
                inputs = make_inputs(2, 9, 2, head_dim, 4, 2, dtype=dtype, seed=head_dim)
                exact = [t.double() if t.is_floating_point() else t for t in inputs]
                grad_out = torch.randn(2, 9, 2 * head_dim, dtype=torch.float64).to(dtype)
                actual = forward_backward(ms_deform_attn, inputs, grad_out)
                expected = forward_backward(ms_deform_attn_pytorch, exact, grad_out.double())
                assert_all_close(actual, expected, inputs[3], inputs[1], rtol=tol, atol=tol)
        print('ok')
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY='default', PYTHONPATH=repo_root)
    proc = subprocess.run(
        [sys.executable, '-c', script], cwd=repo_root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]


# --------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------
@pytest.mark.parametrize('device', DEVICES)
def test_gradcheck(device):
    inputs = with_grad(make_inputs(2, 3, 2, 3, 2, 2, device=device, seed=3))
    assert torch.autograd.gradcheck(ms_deform_attn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_opcheck(device):
    inputs = make_inputs(2, 4, 2, 3, 2, 2, device=device, seed=4)
    torch.library.opcheck(torch.ops.mmdet_deform.ms_deform_attn.default, with_grad(inputs))
    grad_out = torch.randn(2, 4, 6, dtype=torch.float64, device=device)
    torch.library.opcheck(
        torch.ops.mmdet_deform._ms_deform_attn_backward.default, (grad_out,) + tuple(inputs)
    )


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    def attend(value, shapes, starts, loc, logits):
        weights = logits.softmax(-1).view(logits.shape[:-1] + (2, 2))
        return ms_deform_attn(value * 2, shapes, starts, loc.clamp(-0.1, 1.1), weights)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True)
    for bs in (2, 3):  # a second batch size recompiles (or runs a dynamic graph)
        value, shapes, starts, loc, weights = make_inputs(bs, 5, 2, 4, 2, 2, seed=bs)
        logits = weights.flatten(-2)
        args = with_grad((value, shapes, starts, loc, logits))
        out = compiled(*args)
        out.square().sum().backward()
        ref_args = with_grad((value, shapes, starts, loc, logits))
        expected = attend(*ref_args)
        expected.square().sum().backward()
        assert_close(out, expected)
        for a, e in zip(args, ref_args):
            if a.is_floating_point():
                assert_close(a.grad, e.grad)
