"""The counter-based CPU dropout (``torch.ops.mmdet_deform.dropout``): its
mask against the pure-PyTorch reference bit for bit, its statistics, its
reproducibility and thread independence, its gradients and ``torch.library``
integration, and the ``Dropout`` module's switches."""

import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from mmdet_deform.ops import Dropout, dropout, dropout_pytorch
from mmdet_deform.ops.dropout import dropout_mask_pytorch, relu_dropout_pytorch

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('numel', [1, 2, 7, 1024, 40_001, 100_000])
@pytest.mark.parametrize('p', [0.0, 0.1, 0.5, 0.9])
def test_op_matches_reference_bitwise(dtype, numel, p):
    """Same mask and output as the reference for odd/even sizes, sizes that
    span several blocks and parallel tasks, and every float dtype."""
    seed = numel * 7919 - 3
    x = torch.randn(numel, dtype=torch.float64).to(dtype)
    out, mask = torch.ops.mmdet_deform.dropout(x, p, seed)
    expected_out, expected_mask = dropout_pytorch(x, p, seed)
    assert mask.dtype == torch.bool and out.dtype == dtype
    assert torch.equal(mask, expected_mask)
    assert torch.equal(out, expected_out)


@pytest.mark.parametrize('seed', [0, -1, 2**63 - 1, -(2**63), 123456789])
def test_reference_wraps_like_the_kernel(seed):
    """Extreme seeds (int64 wrap-around in the counter) give the same mask."""
    x = torch.ones(999)
    _, mask = torch.ops.mmdet_deform.dropout(x, 0.5, seed)
    assert torch.equal(mask, dropout_mask_pytorch(999, 0.5, seed))


def test_non_contiguous_input_is_dropped_in_row_major_order():
    x = torch.randn(64, 48).t()  # (48, 64), non-contiguous
    out, mask = torch.ops.mmdet_deform.dropout(x, 0.3, 5)
    expected_out, expected_mask = torch.ops.mmdet_deform.dropout(x.contiguous(), 0.3, 5)
    assert torch.equal(out, expected_out) and torch.equal(mask, expected_mask)
    assert out.shape == x.shape


@pytest.mark.parametrize('p', [0.1, 0.5, 0.9])
def test_keep_rate_and_scaling(p):
    """Kept elements are exactly x / (1 - p); the keep rate is within 6
    standard deviations of 1 - p; keep bits are not correlated between
    neighbours (the two halves of one hash, consecutive pairs)."""
    n = 1_000_000
    x = torch.rand(n, dtype=torch.float64) + 0.5
    out, mask = torch.ops.mmdet_deform.dropout(x, p, 42)
    assert torch.equal(out[mask], x[mask] * (1.0 / (1.0 - p)))
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    keep = mask.double()
    std = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 6 * std
    for lag in (1, 2):  # within a pair, across pairs
        both = (keep[:-lag] * keep[lag:]).mean().item()
        assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 / n)


def test_different_seeds_give_independent_masks():
    x = torch.ones(100_000)
    _, a = torch.ops.mmdet_deform.dropout(x, 0.5, 1)
    _, b = torch.ops.mmdet_deform.dropout(x, 0.5, 2)
    agreement = (a == b).double().mean().item()
    assert abs(agreement - 0.5) < 0.01


def test_one_and_two_threads_agree(restore_threads):
    x = torch.randn(300_001)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(torch.ops.mmdet_deform.dropout(x, 0.25, 77))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_functional_seed_comes_from_the_generator():
    x = torch.randn(4096)
    torch.manual_seed(0)
    first = dropout(x, 0.5)
    second = dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.5), first)
    assert not torch.equal(first, second)
    gen = torch.Generator().manual_seed(9)
    with_gen = dropout(x, 0.5, generator=gen)
    assert torch.equal(dropout(x, 0.5, generator=torch.Generator().manual_seed(9)), with_gen)


def test_backward_multiplies_by_the_mask():
    x = torch.randn(3, 1001, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    out = dropout(x, 0.4)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    kept = out != 0
    assert_close(grad, grad_out * kept / 0.6, rtol=0, atol=1e-15)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)

    def fn(t):
        return torch.ops.mmdet_deform.dropout(t, 0.3, 11)[0]

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_opcheck():
    x = torch.randn(4, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.mmdet_deform.dropout.default, (x, 0.2, 3))
    mask = torch.rand(4, 33) > 0.2
    torch.library.opcheck(
        torch.ops.mmdet_deform._dropout_backward.default, (torch.randn(4, 33), mask, 1.25)
    )


@pytest.mark.parametrize('p', [-0.1, 1.0, 1.5, float('nan')])
def test_bad_p_raises_value_error(p):
    with pytest.raises(ValueError, match='p must be in'):
        torch.ops.mmdet_deform.dropout(torch.ones(3), p, 0)
    with pytest.raises(ValueError, match='p must be in'):
        dropout(torch.ones(3), p)


def test_bad_inputs_raise_named_errors():
    with pytest.raises(TypeError, match='input must be a floating point tensor'):
        torch.ops.mmdet_deform.dropout(torch.ones(3, dtype=torch.int64), 0.1, 0)
    with pytest.raises(TypeError, match='input must be a floating point tensor'):
        dropout(torch.ones(3, dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match='mask must be Bool'):
        torch.ops.mmdet_deform._dropout_backward(torch.ones(3), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match='mask must have the shape of grad_output'):
        torch.ops.mmdet_deform._dropout_backward(
            torch.ones(3), torch.ones(4, dtype=torch.bool), 1.0
        )


def test_empty_input():
    out, mask = torch.ops.mmdet_deform.dropout(torch.ones(0, 5), 0.5, 1)
    assert out.shape == (0, 5) and mask.shape == (0, 5)


def test_module_is_an_nn_dropout_with_its_switches():
    module = Dropout(0.5)
    assert isinstance(module, nn.Dropout)
    x = torch.randn(64, 32)
    torch.manual_seed(2)
    out = module(x)
    torch.manual_seed(2)
    assert torch.equal(module(x), out)  # reproducible under manual_seed
    kept = out != 0
    assert 0 < kept.sum() < x.numel()
    assert torch.equal(out[kept], x[kept] * 2)
    module.eval()
    assert module(x) is x or torch.equal(module(x), x)
    module.train()
    module.p = 0.0
    assert torch.equal(module(x), x)


# --------------------------------------------------------------------------
# relu_dropout: dropout(relu(x)) in one pass
# --------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('numel', [1, 7, 40_001])
@pytest.mark.parametrize('p', [0.0, 0.1, 0.5])
def test_relu_dropout_matches_reference_and_the_dropout_mask(dtype, numel, p):
    seed = numel + 17
    x = torch.randn(numel, dtype=torch.float64).to(dtype)
    out = torch.ops.mmdet_deform.relu_dropout(x, p, seed)
    assert torch.equal(out, relu_dropout_pytorch(x, p, seed))
    # the same mask as dropout for the same seed
    assert torch.equal(out, torch.ops.mmdet_deform.dropout(torch.relu(x), p, seed)[0])


def test_relu_dropout_keeps_nan_and_zeroes_negatives():
    x = torch.tensor([float('nan'), -1.0, -0.0, 0.0, 2.0, float('inf'), float('-inf')])
    out = torch.ops.mmdet_deform.relu_dropout(x, 0.0, 0)
    assert torch.equal(out.isnan(), torch.relu(x).isnan())
    assert torch.equal(out[1:], torch.relu(x)[1:])


def test_relu_dropout_gradients():
    """The backward equals that of relu followed by dropout (same mask), and
    passes gradcheck / gradgradcheck away from the ReLU's kink."""
    x = torch.randn(6, 301, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x).requires_grad_(True)
    out = torch.ops.mmdet_deform.relu_dropout(x, 0.3, 9)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    expected_out, _ = torch.ops.mmdet_deform.dropout(torch.relu(x_ref), 0.3, 9)
    (expected,) = torch.autograd.grad(expected_out, x_ref, grad_out)
    assert torch.equal(grad, expected)

    def fn(t):
        return torch.ops.mmdet_deform.relu_dropout(t, 0.3, 9)

    small = x.detach()[:2, :20].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (small,))
    assert torch.autograd.gradgradcheck(fn, (small,))


def test_relu_dropout_opcheck_and_bad_inputs():
    x = torch.randn(4, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.mmdet_deform.relu_dropout.default, (x, 0.2, 3))
    out = torch.ops.mmdet_deform.relu_dropout(x.detach(), 0.2, 3)
    torch.library.opcheck(
        torch.ops.mmdet_deform._relu_dropout_backward.default, (torch.randn(4, 33), out, 1.25)
    )
    with pytest.raises(ValueError, match='p must be in'):
        torch.ops.mmdet_deform.relu_dropout(x, 1.0, 0)
    with pytest.raises(TypeError, match='input must be a floating point tensor'):
        torch.ops.mmdet_deform.relu_dropout(torch.ones(3, dtype=torch.int64), 0.1, 0)
    with pytest.raises(ValueError, match='output must have the shape of grad_output'):
        torch.ops.mmdet_deform._relu_dropout_backward(torch.ones(3), torch.ones(4), 1.0)
    with pytest.raises(TypeError, match=r'output must be Float \(the dtype of grad_output\)'):
        torch.ops.mmdet_deform._relu_dropout_backward(
            torch.ones(3), torch.ones(3, dtype=torch.float64), 1.0
        )


def test_module_relu_forward():
    """The fused path draws the mask forward would (same seed), and the
    fallbacks compute relu then dropout without touching the input unless
    asked to."""
    module = Dropout(0.5)
    x = torch.randn(64, 32)
    torch.manual_seed(8)
    fused = module.relu_forward(x)
    torch.manual_seed(8)
    assert torch.equal(fused, module(torch.relu(x)))
    module.eval()
    original = x.clone()
    assert torch.equal(module.relu_forward(x), torch.relu(original))
    assert torch.equal(x, original)  # not in place by default
    module.relu_forward(x, inplace_relu=True)
    assert torch.equal(x, torch.relu(original))


def test_module_falls_back_to_nn_dropout():
    """inplace=True and p=1 behave exactly as nn.Dropout (same masks under
    the same seed)."""
    x = torch.randn(50, 20)
    for kwargs in (dict(p=0.5, inplace=True), dict(p=1.0)):
        torch.manual_seed(4)
        expected = nn.Dropout(**kwargs)(x.clone())
        torch.manual_seed(4)
        assert torch.equal(Dropout(**kwargs)(x.clone()), expected)
