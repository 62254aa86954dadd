"""The deformable attentions of the encoder and the decoder, computed with
the parameters of :class:`~mmdet_deform.ops.MultiScaleDeformableAttention`
(same result as calling the module), in layouts that suit each.

Sampling locations
    ``reference + offset / (w, h)`` (points) broadcasts small trailing
    dimensions ((num_levels, num_points, 2)) over queries and heads, which
    elementwise kernels handle slowly. Here the reference points are expanded
    once per forward to (bs, num_queries, 1, num_levels * num_points * 2)
    (:func:`expand_reference_points`, shared by all layers) and the offsets,
    viewed as (bs, num_queries, num_heads, num_levels * num_points * 2), are
    divided by a matching vector: contiguous rows, the same arithmetic.

Sample, then project (decoder)
    The module projects every memory position with ``value_proj`` (W, b) and
    samples each head's slice bilinearly. Sampling and the attention-weighted
    sum are linear, so for head h::

        sum_k a_k bilinear(W_h m + b_h)(p_k)
            = W_h [sum_k a_k bilinear(m)(p_k)] + b_h [sum_k a_k bilinear(1)(p_k)]

    where ``m`` is the memory with padded positions zeroed and ``1`` the
    indicator of valid positions (a corner outside the map or on padding
    contributes 0 to both sums, as to the original). Sampling the unprojected
    memory, with its validity as one extra channel, once per (query, head)
    and then applying W_h to the samples replaces a num_keys x C x C
    projection per decoder layer by a num_queries x num_heads x C x C/heads
    one: worth it when num_queries * num_heads < num_keys (the decoder: 300 x
    8 against ~10^4 positions).

Both run the module's Linear layers through
:func:`mmdet_deform.models.utils.linear` (a prepacked oneDNN weight in CPU
float32 inference, the module's own call otherwise).
"""

from typing import Optional

import torch
from torch import Tensor

from mmdet_deform.ops import MultiScaleDeformableAttention, ms_deform_attn

from ...utils import linear

__all__ = [
    'deformable_attention',
    'expand_reference_points',
    'memory_with_validity',
    'sample_then_project_attention',
]


def expand_reference_points(reference_points: Tensor, num_points: int) -> Tensor:
    """Reference points repeated for every sampling point, flattened.

    Args:
        reference_points (Tensor): Normalised points (x, y) of shape
            (bs, num_queries, num_levels, 2), or boxes (cx, cy, w, h) of
            shape (bs, num_queries, num_levels, 4).
        num_points (int): Sampling points per head and level.

    Returns:
        Tensor: has shape (bs, num_queries, 1, num_levels * num_points * r),
        r = 2 or 4, ordered (level, point, coordinate).
    """
    bs, num_queries, num_levels, r = reference_points.shape
    # (bs, nq, nl, r) -> (bs, nq, nl, np, r) -> (bs, nq, 1, nl*np*r)
    expanded = reference_points[:, :, :, None, :].expand(bs, num_queries, num_levels, num_points, r)
    return expanded.reshape(bs, num_queries, 1, num_levels * num_points * r)


def _sampling_locations(
    attn: MultiScaleDeformableAttention,
    query: Tensor,
    expanded_references: Tensor,
    spatial_shapes: Tensor,
) -> Tensor:
    """Sampling locations, as the module computes them.

    Args:
        attn (MultiScaleDeformableAttention): Gives ``sampling_offsets``.
        query (Tensor): Queries (+ positions), has shape (bs, nq, c).
        expanded_references (Tensor): :func:`expand_reference_points` of the
            reference points, has shape (bs, nq, 1, nl * np * r).
        spatial_shapes (Tensor): (h, w) of every level, has shape (nl, 2).

    Returns:
        Tensor: Normalised (x, y), has shape (bs, nq, nh, nl, np, 2).
    """
    bs, num_queries, _ = query.shape
    nh, nl, npts = attn.num_heads, attn.num_levels, attn.num_points
    # (bs, nq, nh*nl*np*2) -> (bs, nq, nh, nl*np*2)
    offsets = linear(query, attn.sampling_offsets).view(bs, num_queries, nh, nl * npts * 2)
    r = expanded_references.shape[-1] // (nl * npts)
    if r == 2:
        # offsets are in pixels of each level: divide by its (w, h)
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)  # (nl, 2)
        normalizer = normalizer[:, None, :].expand(nl, npts, 2).reshape(-1)  # (nl*np*2,)
        locations = expanded_references + offsets / normalizer
    elif r == 4:
        # offsets are relative to the reference box: scale by half its (w, h)
        refs = expanded_references.view(bs, num_queries, 1, nl * npts, 4)
        offsets = offsets.view(bs, num_queries, nh, nl * npts, 2)
        locations = refs[..., :2] + offsets / npts * refs[..., 2:] * 0.5
    else:
        raise ValueError(
            'reference points must have 2 or 4 values per level, got '
            f'{expanded_references.shape[-1]} values for {nl} levels x {npts} points'
        )
    return locations.view(bs, num_queries, nh, nl, npts, 2)


def _attention_weights(attn: MultiScaleDeformableAttention, query: Tensor) -> Tensor:
    """Softmax over every level and point of a head: (bs, nq, c) ->
    (bs, nq, nh, nl, np)."""
    bs, num_queries, _ = query.shape
    nh, nl, npts = attn.num_heads, attn.num_levels, attn.num_points
    weights = linear(query, attn.attention_weights).view(bs, num_queries, nh, nl * npts)
    return weights.softmax(-1).view(bs, num_queries, nh, nl, npts)


def deformable_attention(
    attn: MultiScaleDeformableAttention,
    query: Tensor,
    value: Tensor,
    query_pos: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    expanded_references: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
) -> Tensor:
    """``attn(query, value=value, query_pos=query_pos,
    key_padding_mask=key_padding_mask, reference_points=...,
    spatial_shapes=..., level_start_index=...)`` for a batch-first module,
    with pre-expanded reference points.

    Args:
        attn (MultiScaleDeformableAttention): A batch-first module.
        query (Tensor): has shape (bs, num_queries, c).
        value (Tensor): has shape (bs, num_keys, c).
        query_pos (Tensor, optional): has shape (bs, num_queries, c).
        key_padding_mask (Tensor, optional): True at padded keys, has shape
            (bs, num_keys).
        expanded_references (Tensor): :func:`expand_reference_points` of the
            reference points, has shape (bs, num_queries, 1, nl * np * r).
        spatial_shapes (Tensor): has shape (num_levels, 2).
        level_start_index (Tensor): has shape (num_levels,).

    Returns:
        Tensor: has shape (bs, num_queries, c).
    """
    identity = query
    if query_pos is not None:
        query = query + query_pos
    bs, num_keys, _ = value.shape
    value = linear(value, attn.value_proj)
    if key_padding_mask is not None:
        value = value.masked_fill(key_padding_mask[..., None], 0.0)
    value = value.view(bs, num_keys, attn.num_heads, -1)
    locations = _sampling_locations(attn, query, expanded_references, spatial_shapes)
    weights = _attention_weights(attn, query)
    output = ms_deform_attn(
        value,
        spatial_shapes,
        level_start_index,
        locations.to(value.dtype),
        weights.to(value.dtype),
    )
    return attn.dropout(linear(output, attn.output_proj)) + identity


def memory_with_validity(memory: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """The memory with padded positions zeroed and a last channel that is 1
    at valid positions and 0 at padded ones.

    Args:
        memory (Tensor): has shape (bs, num_keys, c).
        key_padding_mask (Tensor, optional): True at padded positions, has
            shape (bs, num_keys).

    Returns:
        Tensor: has shape (bs, num_keys, c + 1).
    """
    if key_padding_mask is None:
        return torch.cat([memory, memory.new_ones(memory.shape[:-1] + (1,))], -1)
    valid = (~key_padding_mask)[..., None].to(memory.dtype)  # (bs, n, 1)
    return torch.cat([memory * valid, valid], -1)


def sample_then_project_attention(
    attn: MultiScaleDeformableAttention,
    query: Tensor,
    memory_ext: Tensor,
    query_pos: Optional[Tensor],
    expanded_references: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
) -> Tensor:
    """``attn(query, value=memory, query_pos=..., key_padding_mask=...,
    reference_points=..., ...)`` computed by sampling the memory first (see
    the module docstring).

    Args:
        attn (MultiScaleDeformableAttention): A batch-first module.
        query (Tensor): has shape (bs, num_queries, c).
        memory_ext (Tensor): :func:`memory_with_validity` of the memory, has
            shape (bs, num_keys, c + 1).
        query_pos (Tensor, optional): has shape (bs, num_queries, c).
        expanded_references (Tensor): :func:`expand_reference_points` of the
            reference points, has shape (bs, num_queries, 1, nl * np * r).
        spatial_shapes (Tensor): has shape (num_levels, 2).
        level_start_index (Tensor): has shape (num_levels,).

    Returns:
        Tensor: has shape (bs, num_queries, c).
    """
    identity = query
    if query_pos is not None:
        query = query + query_pos
    bs, num_queries, _ = query.shape
    nh, nl, npts = attn.num_heads, attn.num_levels, attn.num_points
    channels = memory_ext.shape[-1] - 1
    locations = _sampling_locations(attn, query, expanded_references, spatial_shapes)
    weights = _attention_weights(attn, query)
    # every (query, head) pair samples all channels as one head:
    # (bs, nq, nh, nl, np, 2) -> (bs, nq*nh, 1, nl, np, 2)
    sampled = ms_deform_attn(
        memory_ext[:, :, None, :],
        spatial_shapes,
        level_start_index,
        locations.to(memory_ext.dtype).view(bs, num_queries * nh, 1, nl, npts, 2),
        weights.to(memory_ext.dtype).view(bs, num_queries * nh, 1, nl, npts),
    )
    # (bs, nq*nh, c+1) -> (bs, nq, nh, c+1)
    sampled = sampled.view(bs, num_queries, nh, channels + 1)
    head_weight = attn.value_proj.weight.view(nh, -1, channels)  # (nh, d, c)
    head_bias = attn.value_proj.bias.view(nh, -1)  # (nh, d)
    # per head: (bs, nq, c) @ (c, d) + validity * bias -> (bs, nq, nh, d)
    values = torch.einsum('bqhc,hdc->bqhd', sampled[..., :channels], head_weight)
    values = values + sampled[..., channels:] * head_bias
    output = linear(values.reshape(bs, num_queries, -1), attn.output_proj)
    return attn.dropout(output) + identity
