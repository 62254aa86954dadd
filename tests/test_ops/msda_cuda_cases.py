"""Inputs, reference gradients and tolerances shared by the tests of the CUDA
kernel of ``ms_deform_attn``: on a GPU (test_ms_deform_attn_cuda.py) and
emulated on the CPU (test_ms_deform_attn_cuda_emulated.py)."""

from typing import Sequence, Tuple

import torch
from torch import Tensor

from mmdet_deform.ops import ms_deform_attn_pytorch

Inputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]

# (bs, [(h, w) per level], num_heads, head_dim, num_queries, num_points), chosen
# to cover every kernel layout: the vector width (channels per lane: 8/4/2/1
# depending on dtype and head_dim), groups of 1..32 lanes with idle lanes,
# head_dim split into several chunks, one and several levels, maps of 1x1.
SHAPE_CASES = [
    (1, [(4, 5)], 1, 1, 5, 1),
    (2, [(6, 5), (3, 2), (1, 1)], 3, 7, 11, 2),
    (3, [(5, 4), (2, 3)], 2, 32, 4, 4),
    (1, [(3, 4), (2, 2)], 1, 70, 3, 2),
]

# Largest error allowed, relative to the largest magnitude of the float64
# reference, per dtype of the kernel's inputs: the kernel reads and writes
# its dtype and accumulates in float32 (float64 for float64).
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def make_inputs(
    bs: int,
    shapes: Sequence[Tuple[int, int]],
    num_heads: int,
    head_dim: int,
    num_queries: int,
    num_points: int,
    dtype: torch.dtype = torch.float64,
    device: str = 'cpu',
    seed: int = 0,
    low: float = -0.2,
    high: float = 1.2,
) -> Inputs:
    """Random ms_deform_attn inputs; locations in [low, high] so that
    border and outside points are covered.

    Returns:
        tuple: value (bs, num_keys, num_heads, head_dim), spatial_shapes
        (num_levels, 2), level_start_index (num_levels,), sampling_locations
        (bs, num_queries, num_heads, num_levels, num_points, 2),
        attention_weights (bs, num_queries, num_heads, num_levels, num_points).
    """
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long).reshape(-1, 2)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_keys = int(areas.sum())
    num_levels = spatial_shapes.shape[0]
    f64 = torch.float64
    value = torch.rand(bs, num_keys, num_heads, head_dim, generator=g, dtype=f64) * 2 - 1
    size = (bs, num_queries, num_heads, num_levels, num_points)
    locations = torch.rand(*size, 2, generator=g, dtype=f64) * (high - low) + low
    weights = torch.rand(*size, generator=g, dtype=f64) + 0.01
    weights = weights / weights.sum((-2, -1), keepdim=True)

    def cast(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype)

    return (
        cast(value),
        spatial_shapes.to(device),
        level_start_index.to(device),
        cast(locations),
        cast(weights),
    )


def as_float64(inputs: Inputs) -> Inputs:
    """The same inputs in float64 (exactly the values the kernel reads)."""
    value, shapes, starts, locations, weights = inputs
    return value.double(), shapes, starts, locations.double(), weights.double()


def reference(inputs: Inputs, grad_output: Tensor) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """Output and (grad_value, grad_sampling_locations, grad_attention_weights)
    of :func:`ms_deform_attn_pytorch` in float64, for ``grad_output``."""
    value, shapes, starts, locations, weights = as_float64(inputs)
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    output = ms_deform_attn_pytorch(leaves[0], shapes, starts, leaves[1], leaves[2])
    grads = torch.autograd.grad(output, leaves, grad_output.double())
    return output.detach(), tuple(grads)


def smooth_points(inputs: Inputs, margin: float = 1e-3) -> Tensor:
    """Points whose pixel coordinates are at least ``margin`` from an integer,
    where the bilinear weights are differentiable (their derivative jumps
    from cell to cell), has shape (bs, num_queries, num_heads, num_levels,
    num_points)."""
    _, shapes, _, locations, _ = inputs
    shapes = shapes.to(locations.device).double()
    # (num_levels, 2) (h, w) -> (num_levels, 2) (w, h), broadcast on (..., num_levels, points, 2)
    size = shapes.flip(-1)[:, None, :]
    pixel = locations.double() * size - 0.5
    distance = (pixel - pixel.round()).abs()
    return (distance > margin).all(-1)


def assert_close_rel(actual: Tensor, expected: Tensor, rel_tol: float, name: str) -> None:
    """max |actual - expected| <= rel_tol * max(1, max |expected|)."""
    assert actual.shape == expected.shape, f'{name}: shape {actual.shape} != {expected.shape}'
    assert torch.isfinite(actual).all(), f'{name}: non-finite values'
    if expected.numel() == 0:
        return
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= rel_tol * scale, f'{name}: max error {error:.3e} > {rel_tol:.1e} * {scale:.3g}'
