"""Inputs of multi-scale deformable attention for the op tests."""

from typing import Sequence, Tuple

import pytest
import torch
from torch import Tensor

# Level layouts used by the tests: non-square maps, a 2 x 2 and a one-row map.
LEVELS = {
    1: ((5, 7),),
    2: ((4, 6), (2, 3)),
    4: ((6, 9), (3, 5), (2, 2), (1, 3)),
}

DEVICES = [
    'cpu',
    pytest.param(
        'cuda',
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
        ],
    ),
]


def level_metadata(levels: Sequence[Tuple[int, int]], device='cpu') -> Tuple[Tensor, Tensor]:
    """``spatial_shapes`` (num_levels, 2) and ``level_start_index`` (num_levels,)."""
    shapes = torch.tensor(levels, dtype=torch.long).view(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return shapes.to(device), starts.to(device)


def make_inputs(
    bs: int = 2,
    num_queries: int = 5,
    num_heads: int = 2,
    head_dim: int = 4,
    num_levels: int = 2,
    num_points: int = 3,
    dtype: torch.dtype = torch.float64,
    device='cpu',
    seed: int = 0,
    low: float = -0.2,
    high: float = 1.2,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random inputs: value (bs, num_keys, num_heads, head_dim), spatial_shapes,
    level_start_index, sampling_locations (bs, num_queries, num_heads,
    num_levels, num_points, 2) uniform in [low, high] (so that borders and
    points outside the maps are covered) and attention_weights (bs,
    num_queries, num_heads, num_levels, num_points)."""
    gen = torch.Generator().manual_seed(seed)
    shapes, starts = level_metadata(LEVELS[num_levels], device)
    num_keys = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(bs, num_keys, num_heads, head_dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(
        bs, num_queries, num_heads, num_levels, num_points, 2, generator=gen, dtype=torch.float64
    )
    loc = loc * (high - low) + low
    weights = torch.rand(
        bs, num_queries, num_heads, num_levels, num_points, generator=gen, dtype=torch.float64
    )
    return (
        value.to(device, dtype),
        shapes,
        starts,
        loc.to(device, dtype),
        weights.to(device, dtype),
    )


def with_grad(inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """Detached copies of the inputs, the float ones requiring grad."""
    return tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)


def forward_backward(fn, inputs: Sequence[Tensor], grad_out: Tensor = None):
    """Output and the gradients of value, sampling_locations, attention_weights."""
    inputs = with_grad(inputs)
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
        grad_out = grad_out.view(out.shape)
    out.backward(grad_out)
    return (out.detach(), inputs[0].grad, inputs[3].grad, inputs[4].grad)


def at_pixel_edge(sampling_locations: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Where a location coordinate falls exactly on a pixel centre (x * w - 0.5
    is an integer), has the shape of ``sampling_locations``. The bilinear
    interpolant has a kink there: the kernels take the one-sided derivative
    (as ``F.grid_sample``), autograd through the reference another one. Coarse
    bfloat16 locations hit such points often."""
    size = spatial_shapes.flip(-1).to(torch.float64)  # (num_levels, 2) as (w, h)
    pixel = sampling_locations.double() * size[:, None, :] - 0.5
    return pixel == pixel.floor()


def assert_all_close(actual, expected, loc=None, shapes=None, **tol) -> None:
    """Compare (output, grad_value, grad_sampling_locations,
    grad_attention_weights); with ``loc``/``shapes``, location gradients at
    pixel edges (see :func:`at_pixel_edge`) are left out."""
    from torch.testing import assert_close

    names = ('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights')
    for i, (name, a, e) in enumerate(zip(names, actual, expected)):
        a = a.to(e.dtype)
        if i == 2 and loc is not None:
            keep = ~at_pixel_edge(loc, shapes)
            a, e = a[keep], e[keep]
        assert_close(a, e, msg=lambda m, name=name: f'{name}: {m}', **tol)
