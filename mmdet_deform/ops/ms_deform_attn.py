"""Multi-scale deformable attention (Zhu et al., arXiv 2010.04159, eq. 3).

In the order every op file of this package follows:

1. :func:`ms_deform_attn_pytorch`: the pure-PyTorch reference (ground truth in
   tests, fallback where the extension is missing);
2. :func:`ms_deform_attn`: the typed wrapper around
   ``torch.ops.mmdet_deform.ms_deform_attn``;
3. fake (meta) kernels for ``torch.compile``;
4. autograd, wiring ``torch.ops.mmdet_deform._ms_deform_attn_backward``;
5. :class:`MultiScaleDeformableAttention`, the ``nn.Module`` (a drop-in for
   mmcv's module of the same name).

Sampling follows ``F.grid_sample(mode='bilinear', padding_mode='zeros',
align_corners=False)`` on every level: a normalised location ``(x, y)`` maps
to the pixel coordinate ``(x * w - 0.5, y * h - 0.5)``, and every bilinear
corner outside the ``h x w`` map (or a non-finite location) contributes zero.
"""

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._extension import has_extension, warn_missing_extension
from .dropout import Dropout
from .precision import at_least_float32

try:  # mmengine gives the module `init_cfg` support; the op itself needs torch only
    from mmengine.model import BaseModule
except ImportError:  # pragma: no cover - torch-only environments (kernel checks)

    class BaseModule(nn.Module):  # type: ignore[no-redef]
        """Minimal stand-in for ``mmengine.model.BaseModule``."""

        def __init__(self, init_cfg: Optional[dict] = None) -> None:
            super().__init__()
            self.init_cfg = init_cfg


__all__ = ['ms_deform_attn', 'ms_deform_attn_pytorch', 'MultiScaleDeformableAttention']


# --------------------------------------------------------------------------
# 1. Reference implementation
# --------------------------------------------------------------------------
def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention in plain PyTorch (explicit bilinear
    gathers, differentiable with autograd).

    Args:
        value (Tensor): Values of all levels, flattened, has shape
            (bs, num_keys, num_heads, head_dim).
        spatial_shapes (Tensor): (h, w) of every level, int64, has shape
            (num_levels, 2).
        level_start_index (Tensor): Start of every level in ``num_keys``,
            int64, has shape (num_levels,).
        sampling_locations (Tensor): Normalised (x, y) locations, has shape
            (bs, num_queries, num_heads, num_levels, num_points, 2).
        attention_weights (Tensor): Weight of every sampled point, has shape
            (bs, num_queries, num_heads, num_levels, num_points).

    Returns:
        Tensor: Attended values, has shape (bs, num_queries, num_heads * head_dim),
        in ``value``'s dtype. Float16/bfloat16 inputs are computed in float32
        (as the kernels accumulate), which also keeps pixel coordinates and
        gather indices exact on maps wider than 256 pixels.
    """
    out_dtype = value.dtype
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)
    bs, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # (bs, num_keys, num_heads, head_dim) -> (bs, num_heads, num_keys, head_dim)
    value = value.transpose(1, 2)
    output = value.new_zeros(bs, num_heads, num_queries * num_points, head_dim)
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h * w == 0:  # an empty map: every point of this level is outside
            continue
        value_l = value[:, :, start : start + h * w]  # (bs, num_heads, h*w, head_dim)
        # (bs, nq, nh, np, 2) -> (bs, nh, nq*np, 2)
        loc = sampling_locations[:, :, :, level].transpose(1, 2).flatten(2, 3)
        x = loc[..., 0] * w - 0.5
        y = loc[..., 1] * h - 0.5
        x0 = torch.floor(x)
        y0 = torch.floor(y)
        sampled = value.new_zeros(bs, num_heads, num_queries * num_points, head_dim)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xc = x0 + dx
            yc = y0 + dy
            # bilinear weight of this corner: (1 - |x - xc|) * (1 - |y - yc|)
            weight = (1 - (x - xc).abs()) * (1 - (y - yc).abs())
            inside = (xc >= 0) & (xc <= w - 1) & (yc >= 0) & (yc <= h - 1)
            weight = torch.where(inside, weight, torch.zeros_like(weight))
            # int64 key index: exact on maps of any size (float32 is not past 2**24 keys)
            xi = torch.where(inside, xc, torch.zeros_like(xc)).long()
            yi = torch.where(inside, yc, torch.zeros_like(yc)).long()
            index = yi * w + xi
            gathered = torch.gather(
                value_l, 2, index[..., None].expand(-1, -1, -1, head_dim)
            )  # (bs, nh, nq*np, head_dim)
            sampled = sampled + weight[..., None] * gathered
        # (bs, nq, nh, np) -> (bs, nh, nq*np, 1)
        attn = attention_weights[:, :, :, level].transpose(1, 2).flatten(2, 3)[..., None]
        output = output + sampled * attn
    # (bs, nh, nq*np, d) -> (bs, nh, nq, np, d) -> (bs, nq, nh, d) -> (bs, nq, nh*d)
    output = output.view(bs, num_heads, num_queries, num_points, head_dim).sum(3)
    return output.transpose(1, 2).reshape(bs, num_queries, num_heads * head_dim).to(out_dtype)


# --------------------------------------------------------------------------
# 2. Typed wrapper around the compiled op
# --------------------------------------------------------------------------
def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: Optional[int] = None,
) -> Tensor:
    """Multi-scale deformable attention with the compiled kernel.

    Same arguments, shapes and result as :func:`ms_deform_attn_pytorch`; the
    float inputs (``value``, ``sampling_locations``, ``attention_weights``)
    must share one dtype (float32, float64 or bfloat16, plus float16 on CUDA;
    bfloat16 accumulates in float32), otherwise a ``TypeError`` is raised.
    Under ``torch.autocast`` the op runs in float32 (and returns float32)
    unless all three are bfloat16. Any batch size works; an empty batch or
    zero queries give an empty result; non-contiguous inputs are made
    contiguous once. Non-finite sampling locations contribute zero. Every
    malformed input raises a ``ValueError``/``TypeError``/``RuntimeError``
    that names the argument.

    The input check shared by the CPU and CUDA kernels copies
    ``spatial_shapes`` and ``level_start_index`` to the host and validates
    them there (they decide every memory access of the kernels). For CUDA
    tensors this small device-to-host copy synchronises the current stream,
    once in the forward and once in the backward call.

    Differentiable with respect to the three float inputs (the backward is
    the op ``torch.ops.mmdet_deform._ms_deform_attn_backward``; on the CPU its
    gradients are bitwise reproducible at a fixed thread count). Falls back
    to the reference (with a warning) where ``mmdet_deform._C`` is not built.

    Args:
        value (Tensor): has shape (bs, num_keys, num_heads, head_dim).
        spatial_shapes (Tensor): int64, has shape (num_levels, 2), (h, w) of
            every level; ``sum(h * w)`` must be ``num_keys``.
        level_start_index (Tensor): int64, has shape (num_levels,), the
            exclusive cumulative sum of ``h * w``.
        sampling_locations (Tensor): normalised (x, y), has shape
            (bs, num_queries, num_heads, num_levels, num_points, 2).
        attention_weights (Tensor): has shape
            (bs, num_queries, num_heads, num_levels, num_points).
        im2col_step (int, optional): Accepted so that callers of mmcv's
            ``MultiScaleDeformableAttnFunction.apply(..., im2col_step)`` can
            switch over; unused, the kernels take any batch in one launch.
            Must be a positive int when given.

    Returns:
        Tensor: has shape (bs, num_queries, num_heads * head_dim).
    """
    if im2col_step is not None and (
        isinstance(im2col_step, bool) or not isinstance(im2col_step, int) or im2col_step < 1
    ):
        raise ValueError(f'im2col_step must be a positive int or None, got {im2col_step!r}')
    if not has_extension():
        warn_missing_extension()
        return ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.mmdet_deform.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


# --------------------------------------------------------------------------
# 3. Fake kernels and 4. autograd (only where the schema exists)
# --------------------------------------------------------------------------
if has_extension():

    @torch.library.register_fake('mmdet_deform::ms_deform_attn')
    def _ms_deform_attn_fake(
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        torch._check(value.dim() == 4, lambda: 'value must be 4-D')
        torch._check(sampling_locations.dim() == 6, lambda: 'sampling_locations must be 6-D')
        bs, _, num_heads, head_dim = value.shape
        num_queries = sampling_locations.shape[1]
        return value.new_empty((bs, num_queries, num_heads * head_dim))

    @torch.library.register_fake('mmdet_deform::_ms_deform_attn_backward')
    def _ms_deform_attn_backward_fake(
        grad_output: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        # the kernels return contiguous gradients
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    def _setup_context(ctx, inputs, output) -> None:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    def _backward(ctx, grad_output: Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_locations, grad_weights = torch.ops.mmdet_deform._ms_deform_attn_backward(
            grad_output.contiguous(),
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(
        'mmdet_deform::ms_deform_attn', _backward, setup_context=_setup_context
    )


# --------------------------------------------------------------------------
# 5. Module
# --------------------------------------------------------------------------
class MultiScaleDeformableAttention(BaseModule):
    """Multi-scale deformable attention module, a drop-in for mmcv's
    ``MultiScaleDeformableAttention`` (same arguments, parameter names,
    initialisation and forward semantics, so mmcv checkpoints load with
    ``strict=True`` and give the same output), running on this package's op.

    Two ways to compute the same result, chosen by ``sample_then_project``:

    Project, then sample (default, as mmcv)
        ``value_proj`` maps every key to ``num_heads`` heads; each head's
        slice is sampled bilinearly at its sampling locations.

    Sample, then project
        Sampling and the attention-weighted sum are linear, so for head h
        with projection (W_h, b_h)::

            sum_k a_k bilinear(W_h v + b_h)(p_k)
                = W_h [sum_k a_k bilinear(v)(p_k)] + b_h [sum_k a_k bilinear(1)(p_k)]

        where ``v`` is the value with padded keys zeroed and ``1`` the
        indicator of valid keys (a bilinear corner outside the map or on
        padding contributes 0 to both sums, as to the original). Sampling the
        unprojected value and its validity once per (query, head) and
        projecting the samples replaces a
        num_keys x C x C projection by a num_queries x num_heads x C x C/heads
        one. It is used when it is cheaper, ``num_queries * num_heads <
        num_keys`` (a decoder's cross-attention: 300 x 8 queries x heads
        against ~10^4 keys); otherwise the module projects first.

    Under ``torch.autocast`` the sampling locations and attention weights
    stay float32 (the op's autocast kernel then runs in float32): rounding
    locations to bfloat16 would move points by up to a pixel on maps wider
    than 256 pixels.

    Args:
        embed_dims (int): Embedding dimension. Defaults to 256.
        num_heads (int): Number of attention heads. Defaults to 8.
        num_levels (int): Number of feature levels. Defaults to 4.
        num_points (int): Sampling points per head and level. Defaults to 4.
        im2col_step (int): Accepted for compatibility with mmcv and unused:
            the kernels here take any batch size in one launch. Defaults to 64.
        dropout (float): Dropout on the output before the residual (an
            ``nn.Dropout`` subclass, :class:`~mmdet_deform.ops.Dropout`,
            whose CPU masks differ from mmcv's under the same seed).
            Defaults to 0.1.
        batch_first (bool): Whether query/value are (bs, n, c) rather than
            (n, bs, c). Defaults to False.
        norm_cfg (dict, optional): Accepted for compatibility; unused, as in
            mmcv.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
        value_proj_ratio (float): Expansion ratio of ``value_proj``.
            Defaults to 1.0.
        sample_then_project (bool): Sample the unprojected value and project
            the samples when that is cheaper (see above). Same parameters
            and result up to rounding. Defaults to False.
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
        value_proj_ratio: float = 1.0,
        sample_then_project: bool = False,
    ) -> None:
        super().__init__(init_cfg)
        if embed_dims % num_heads != 0:
            raise ValueError(
                f'embed_dims must be divisible by num_heads, got {embed_dims} and {num_heads}'
            )
        head_dim = embed_dims // num_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                f'embed_dims // num_heads = {head_dim} is not a power of 2; the CUDA '
                'kernel vectorises best over power-of-2 head dims.',
                stacklevel=2,
            )
        value_proj_size = int(embed_dims * value_proj_ratio)
        if value_proj_size % num_heads != 0:
            raise ValueError(
                f'embed_dims * value_proj_ratio ({value_proj_size}) must be divisible by '
                f'num_heads ({num_heads})'
            )
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.im2col_step = im2col_step
        self.batch_first = batch_first
        self.norm_cfg = norm_cfg
        self.sample_then_project = sample_then_project
        self.dropout = Dropout(dropout)  # nn.Dropout with a fast CPU mask
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """Offsets start on rays in ``num_heads`` directions, the k-th point
        at distance k (paper, appendix A.2); attention weights are uniform;
        projections are Xavier-uniform with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        device = self.sampling_offsets.weight.device
        angles = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack([angles.cos(), angles.sin()], -1)  # (num_heads, 2)
        # scale each direction so that its larger coordinate is +-1
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        distance = torch.arange(1, self.num_points + 1, dtype=torch.float32, device=device)
        # (num_heads, 1, 1, 2) * (1, 1, num_points, 1) -> (num_heads, num_levels, num_points, 2)
        bias = directions[:, None, None, :] * distance[None, None, :, None]
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        self._is_init = True

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        identity: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        reference_points: Optional[Tensor] = None,
        spatial_shapes: Optional[Tensor] = None,
        level_start_index: Optional[Tensor] = None,
        **kwargs,
    ) -> Tensor:
        """Attend from ``query`` to the multi-scale ``value``.

        Args:
            query (Tensor): Queries, (num_queries, bs, embed_dims), or
                (bs, num_queries, embed_dims) if ``batch_first``.
            key (Tensor, optional): Unused (deformable attention has no keys).
            value (Tensor, optional): Flattened multi-scale features, shaped
                like ``query`` with num_keys instead of num_queries. Defaults
                to ``query``.
            identity (Tensor, optional): Residual added to the output, shaped
                like ``query``. Defaults to ``query`` (before ``query_pos``).
            query_pos (Tensor, optional): Positional encoding added to
                ``query`` before predicting offsets and weights.
            key_padding_mask (Tensor, optional): True at padded keys, which
                are zeroed in ``value``, has shape (bs, num_keys).
            reference_points (Tensor): Normalised reference points, has shape
                (bs, num_queries, num_levels, 2) for points (x, y), or
                (bs, num_queries, num_levels, 4) for boxes (cx, cy, w, h),
                whose offsets are scaled by half the box size.
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).
            level_start_index (Tensor): Start of every level, has shape
                (num_levels,).

        Returns:
            Tensor: Output shaped like ``query``.
        """
        if reference_points is None or spatial_shapes is None or level_start_index is None:
            raise ValueError(
                'MultiScaleDeformableAttention needs reference_points, spatial_shapes '
                'and level_start_index'
            )
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            # (n, bs, c) -> (bs, n, c)
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        locations = self.sampling_locations(query, reference_points, spatial_shapes)
        weights = self.attention_probs(query)
        num_queries, num_keys = query.shape[1], value.shape[1]
        if self.sample_then_project and num_queries * self.num_heads < num_keys:
            output = self._sample_then_project(
                value, key_padding_mask, spatial_shapes, level_start_index, locations, weights
            )
        else:
            output = self._project_then_sample(
                value, key_padding_mask, spatial_shapes, level_start_index, locations, weights
            )
        output = self.output_proj(output)
        if not self.batch_first:
            # (bs, n, c) -> (n, bs, c)
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity

    def sampling_locations(
        self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        """Where every head samples every level: the reference points moved
        by the offsets predicted from the queries.

        Args:
            query (Tensor): Queries (+ positions), has shape
                (bs, num_queries, embed_dims).
            reference_points (Tensor): Points (x, y), has shape
                (bs, num_queries, num_levels, 2), whose offsets are in pixels
                of each level; or boxes (cx, cy, w, h), has shape
                (bs, num_queries, num_levels, 4), whose offsets are in units
                of ``num_points`` times half the box size.
            spatial_shapes (Tensor): (h, w) of every level, has shape
                (num_levels, 2).

        Returns:
            Tensor: Normalised (x, y), computed in float32 or wider (also
            under autocast), has shape
            (bs, num_queries, num_heads, num_levels, num_points, 2).
        """
        bs, num_queries, _ = query.shape
        nh, nl, npts = self.num_heads, self.num_levels, self.num_points
        if reference_points.dim() != 4 or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                'reference_points must have shape (bs, num_queries, num_levels, 2 or 4), got '
                f'{tuple(reference_points.shape)}'
            )
        r = reference_points.shape[-1]
        # Contiguous rows instead of broadcasting small trailing dims:
        # references (bs, nq, nl, r) -> (bs, nq, 1, nl*np*r), offsets
        # (bs, nq, nh*nl*np*2) -> (bs, nq, nh, nl*np*2).
        references = reference_points[:, :, None, :, None, :]
        references = references.expand(bs, num_queries, 1, nl, npts, r)
        references = at_least_float32(references.reshape(bs, num_queries, 1, nl * npts * r))
        offsets = self.sampling_offsets(query).view(bs, num_queries, nh, nl * npts * 2)
        offsets = at_least_float32(offsets)  # (bf16 under autocast)
        if r == 2:
            # offsets are in pixels of each level: divide by its (w, h)
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            normalizer = normalizer[:, None, :].expand(nl, npts, 2).reshape(-1)  # (nl*np*2,)
            locations = references + offsets / normalizer
        else:
            # offsets are relative to the reference box: scale by half its (w, h)
            boxes = references.view(bs, num_queries, 1, nl * npts, 4)
            offsets = offsets.view(bs, num_queries, nh, nl * npts, 2)
            locations = boxes[..., :2] + offsets / npts * boxes[..., 2:] * 0.5
        return locations.view(bs, num_queries, nh, nl, npts, 2)

    def attention_probs(self, query: Tensor) -> Tensor:
        """Softmax over every level and point of a head.

        Args:
            query (Tensor): has shape (bs, num_queries, embed_dims).

        Returns:
            Tensor: float32 or wider (also under autocast), has shape
            (bs, num_queries, num_heads, num_levels, num_points).
        """
        bs, num_queries, _ = query.shape
        nh, nl, npts = self.num_heads, self.num_levels, self.num_points
        weights = self.attention_weights(query).view(bs, num_queries, nh, nl * npts)
        return at_least_float32(weights).softmax(-1).view(bs, num_queries, nh, nl, npts)

    def _project_then_sample(
        self,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        locations: Tensor,
        weights: Tensor,
    ) -> Tensor:
        """Project every key to the heads, then sample: (bs, nk, c) ->
        (bs, nq, nh * head_dim)."""
        bs, num_keys, _ = value.shape
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_keys, self.num_heads, -1)
        return ms_deform_attn(
            value,
            spatial_shapes,
            level_start_index,
            _op_dtype(locations, value),
            _op_dtype(weights, value),
        )

    def _sample_then_project(
        self,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        locations: Tensor,
        weights: Tensor,
    ) -> Tensor:
        """Sample the unprojected value and its validity, then project each
        head's samples: (bs, nk, c) -> (bs, nq, nh * head_dim)."""
        bs, num_queries, nh, nl, npts, _ = locations.shape
        channels = value.shape[-1]
        if key_padding_mask is None:
            valid = value.new_ones(value.shape[:-1] + (1,))  # (bs, nk, 1)
        else:
            valid = (~key_padding_mask)[..., None].to(value.dtype)  # (bs, nk, 1)
            value = value * valid  # padded keys contribute nothing
        # every (query, head) pair samples all channels as one head:
        # (bs, nq, nh, nl, np, 2) -> (bs, nq*nh, 1, nl, np, 2)
        locations = _op_dtype(locations, value).reshape(bs, num_queries * nh, 1, nl, npts, 2)
        weights = _op_dtype(weights, value).reshape(bs, num_queries * nh, 1, nl, npts)
        sampled = ms_deform_attn(
            value[:, :, None, :], spatial_shapes, level_start_index, locations, weights
        )  # (bs, nq*nh, c)
        # the weighted bilinear sum of the validity: what multiplies the bias
        coverage = ms_deform_attn(
            valid[:, :, None, :], spatial_shapes, level_start_index, locations, weights
        )  # (bs, nq*nh, 1)
        # (bs, nq*nh, c) -> (bs, nq, nh, c); (bs, nq*nh, 1) -> (bs, nq, nh, 1)
        sampled = sampled.view(bs, num_queries, nh, channels)
        coverage = coverage.view(bs, num_queries, nh, 1)
        head_weight = self.value_proj.weight.view(nh, -1, channels)  # (nh, d, c)
        head_bias = self.value_proj.bias.view(nh, -1)  # (nh, d)
        # per head: (bs, nq, c) @ (c, d) + coverage * bias -> (bs, nq, nh, d)
        projected = torch.einsum('bqhc,hdc->bqhd', sampled, head_weight)
        projected = projected + coverage * head_bias
        return projected.reshape(bs, num_queries, -1)


def _op_dtype(tensor: Tensor, value: Tensor) -> Tensor:
    """``tensor`` in the dtype the op takes for ``value``: ``value``'s dtype
    outside autocast (the op takes one float dtype), unchanged under autocast,
    whose kernel casts (float32 unless everything is bfloat16), so that
    float32 sampling locations and attention weights keep their precision."""
    if torch.is_autocast_enabled(value.device.type):
        return tensor
    return tensor.to(value.dtype)
