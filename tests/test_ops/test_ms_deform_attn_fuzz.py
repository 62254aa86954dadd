"""Fuzz test of the compiled MSDA op (``torch.ops.mmdet_deform.ms_deform_attn``).

Hypothesis draws about 500 cases: random shapes (empty batches, queries and
levels included), dtypes (float32, float64, bfloat16), non-finite or huge
values, locations and weights, non-contiguous inputs, and inconsistent
metadata (level start indices, key counts, shapes, dtypes, ranks). Every case
either matches the reference :func:`ms_deform_attn_pytorch` (forward; and the
backward for finite float64 inputs) or raises a ``ValueError`` /
``TypeError`` / ``RuntimeError`` whose message names the op. The cases run
in a subprocess, so a crash of the kernel (segfault, abort) fails the test
instead of killing pytest.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor

from ..conftest import REPO_ROOT

#: Examples per property (about 500 in all).
MAX_EXAMPLES = dict(forward=270, faults=9, backward=50)  # faults: each of the 20
SUMMARY = 'FUZZ-SUMMARY '

#: Inconsistent inputs and the exception each must raise.
FAULTS = {
    'start_index_off_by_one': ValueError,
    'value_keys_mismatch': ValueError,
    'negative_level_size': ValueError,
    'levels_mismatch': ValueError,
    'level_start_index_rank': ValueError,
    'spatial_shapes_width_3': ValueError,
    'spatial_shapes_overflow': ValueError,
    'value_rank_3': ValueError,
    'locations_last_dim_3': ValueError,
    'weights_shape_mismatch': ValueError,
    'heads_mismatch': ValueError,
    'batch_mismatch': ValueError,
    'spatial_shapes_int32': TypeError,
    'spatial_shapes_float': TypeError,
    'level_start_index_int32': TypeError,
    'locations_dtype_mismatch': TypeError,
    'weights_dtype_mismatch': TypeError,
    'integer_value': TypeError,
    'float16_on_cpu': TypeError,  # float16 is for CUDA only
    'spatial_shapes_not_a_tensor': RuntimeError,
}
DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'bfloat16': torch.bfloat16}
TOLERANCE = {  # (rtol, atol) against the float64 reference
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 5e-2),
}
NON_FINITE = [float('nan'), float('inf'), -float('inf')]
#: Huge finite entries (beyond any map, or near the float32 / bfloat16 limit)
HUGE = dict(
    sampling_locations=[1e10, -1e10, 1e30, -1e30, 3e38, -3e38],
    attention_weights=[1e10, -1e10, 1e30, -1e30],  # the output stays in range
    value=[],  # huge values overflow the sums of either implementation
)


def make_case(
    seed: int,
    bs: int,
    num_queries: int,
    num_heads: int,
    head_dim: int,
    levels: List[Tuple[int, int]],
    num_points: int,
) -> Dict[str, Tensor]:
    """Consistent float64 inputs of the op, random from ``seed``.

    Returns:
        dict: ``value`` (bs, num_keys, num_heads, head_dim), ``spatial_shapes``
        (num_levels, 2), ``level_start_index`` (num_levels,),
        ``sampling_locations`` (bs, num_queries, num_heads, num_levels,
        num_points, 2) in [-0.2, 1.2) (some outside the maps), and
        ``attention_weights`` (bs, num_queries, num_heads, num_levels,
        num_points).
    """
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(levels, dtype=torch.long).view(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_keys = int(sizes.sum())
    num_levels = len(levels)
    shape = (bs, num_queries, num_heads, num_levels, num_points)
    return dict(
        value=torch.randn(bs, num_keys, num_heads, head_dim, generator=g, dtype=torch.float64),
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        sampling_locations=torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2,
        attention_weights=torch.rand(*shape, generator=g, dtype=torch.float64),
    )


def _cast(case: Dict[str, Tensor], dtype: torch.dtype) -> Dict[str, Tensor]:
    out = dict(case)
    for key in ('value', 'sampling_locations', 'attention_weights'):
        out[key] = case[key].to(dtype)
    return out


def reference(case: Dict[str, Tensor]) -> Tensor:
    """The reference in float64, levels of zero area left out (they hold no
    key, so they add nothing; the reference cannot gather from them)."""
    from mmdet_deform.ops import ms_deform_attn_pytorch

    keep = (case['spatial_shapes'].prod(1) > 0).nonzero().flatten()
    value = case['value'].double()
    bs, _, num_heads, head_dim = value.shape
    num_queries = case['sampling_locations'].shape[1]
    if len(keep) == 0:
        return value.new_zeros(bs, num_queries, num_heads * head_dim)
    return ms_deform_attn_pytorch(
        value,
        case['spatial_shapes'][keep],
        case['level_start_index'][keep],
        case['sampling_locations'].double()[:, :, :, keep],
        case['attention_weights'].double()[:, :, :, keep],
    )


def check_matches_reference(case: Dict[str, Tensor], out: Tensor) -> None:
    """``out`` of the op equals the reference.

    With non-finite values or weights, the reference (explicit gathers) turns
    ``0 * nan`` of corners outside the map into NaN where the kernel, like
    ``grid_sample``, reads nothing; so: every entry the reference has finite
    must match, the op may not be non-finite where the reference is finite,
    and every entry the op has finite must match the reference run on the
    inputs with their non-finite values and weights set to 0.
    """
    dtype = case['value'].dtype
    expected = reference(case)
    assert out.dtype == dtype and out.shape == expected.shape, (out.dtype, out.shape)
    rtol, atol = TOLERANCE[dtype]
    out = out.double()
    finite_ref = torch.isfinite(expected.to(dtype))  # what the output dtype can hold
    finite_out = torch.isfinite(out)
    assert not (finite_ref & ~finite_out).any(), 'non-finite output where the reference is finite'
    torch.testing.assert_close(out[finite_ref], expected[finite_ref], rtol=rtol, atol=atol)
    sanitized = dict(case)
    for key in ('value', 'attention_weights'):
        t = case[key].double()
        sanitized[key] = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
    clean = reference(sanitized)
    torch.testing.assert_close(out[finite_out], clean[finite_out], rtol=rtol, atol=atol)


def apply_fault(case: Dict[str, Tensor], fault: str, index: int) -> Dict[str, object]:
    """``case`` made inconsistent in the way ``fault`` names."""
    c: Dict[str, object] = dict(case)
    num_levels = case['spatial_shapes'].shape[0]
    level = index % num_levels
    if fault == 'start_index_off_by_one':
        starts = case['level_start_index'].clone()
        starts[level] += 1 if index % 2 else -1
        c['level_start_index'] = starts
    elif fault == 'value_keys_mismatch':
        bs, num_keys, num_heads, head_dim = case['value'].shape
        num_keys += 1 if index % 2 or num_keys == 0 else -1
        c['value'] = torch.randn(bs, num_keys, num_heads, head_dim, dtype=torch.float64)
    elif fault == 'negative_level_size':
        shapes = case['spatial_shapes'].clone()
        shapes[level, index % 2] = -1 - index % 3
        c['spatial_shapes'] = shapes
    elif fault == 'levels_mismatch':
        shapes = case['spatial_shapes']
        c['spatial_shapes'] = torch.cat([shapes, shapes.new_zeros(1, 2)])
        c['level_start_index'] = torch.cat(
            [case['level_start_index'], shapes.prod(1).sum().view(1)]
        )
    elif fault == 'level_start_index_rank':
        c['level_start_index'] = case['level_start_index'][None]
    elif fault == 'spatial_shapes_width_3':
        c['spatial_shapes'] = torch.cat([case['spatial_shapes'], case['spatial_shapes'][:, :1]], 1)
    elif fault == 'spatial_shapes_overflow':
        shapes = case['spatial_shapes'].clone()
        shapes[level] = torch.tensor([2**40 + index, 2**40])
        c['spatial_shapes'] = shapes
    elif fault == 'value_rank_3':
        c['value'] = case['value'].flatten(2)
    elif fault == 'locations_last_dim_3':
        loc = case['sampling_locations']
        c['sampling_locations'] = torch.cat([loc, loc[..., :1]], -1)
    elif fault == 'weights_shape_mismatch':
        weights = case['attention_weights']
        c['attention_weights'] = torch.cat([weights, weights[..., :1]], -1)
    elif fault == 'heads_mismatch':
        c['value'] = torch.cat([case['value'], case['value'][:, :, :1]], 2)
    elif fault == 'batch_mismatch':
        bs, *rest = case['value'].shape
        c['value'] = torch.randn(bs + 1, *rest, dtype=torch.float64)
    elif fault == 'spatial_shapes_int32':
        c['spatial_shapes'] = case['spatial_shapes'].int()
    elif fault == 'spatial_shapes_float':
        c['spatial_shapes'] = case['spatial_shapes'].float()
    elif fault == 'level_start_index_int32':
        c['level_start_index'] = case['level_start_index'].int()
    elif fault == 'locations_dtype_mismatch':
        c['sampling_locations'] = case['sampling_locations'].float()
    elif fault == 'weights_dtype_mismatch':
        c['attention_weights'] = case['attention_weights'].to(torch.bfloat16)
    elif fault == 'integer_value':
        c['value'] = case['value'].long()
        c['sampling_locations'] = case['sampling_locations'].long()
        c['attention_weights'] = case['attention_weights'].long()
    elif fault == 'float16_on_cpu':
        c.update(_cast(case, torch.float16))
    elif fault == 'spatial_shapes_not_a_tensor':
        c['spatial_shapes'] = case['spatial_shapes'].tolist()
    else:  # pragma: no cover
        raise AssertionError(fault)
    return c


def _call(case: Dict[str, object]) -> Tensor:
    from mmdet_deform.ops import ms_deform_attn

    return ms_deform_attn(
        case['value'],
        case['spatial_shapes'],
        case['level_start_index'],
        case['sampling_locations'],
        case['attention_weights'],
    )


def run_fuzz(max_examples: Optional[Dict[str, int]] = None) -> Dict[str, Dict[str, int]]:
    """Run the three properties; raise on the first failing case.

    Returns:
        dict: How many cases of each kind ran.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mmdet_deform.ops import require_extension

    require_extension()  # the fallback is the reference itself: nothing to compare
    torch.set_num_threads(1)
    counts: Dict[str, Counter] = {'forward': Counter(), 'faults': Counter(), 'backward': Counter()}
    max_examples = dict(MAX_EXAMPLES, **(max_examples or {}))

    def config(name: str):
        return settings(
            max_examples=max_examples[name],
            deadline=None,
            database=None,
            derandomize=True,  # the same cases on every run
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )

    level = st.tuples(st.integers(0, 6), st.integers(0, 6))
    structure = st.fixed_dictionaries(
        dict(
            seed=st.integers(0, 2**31 - 1),
            bs=st.integers(0, 2),
            num_queries=st.integers(0, 5),
            num_heads=st.integers(1, 3),
            head_dim=st.integers(1, 5),
            levels=st.lists(level, min_size=1, max_size=4),
            num_points=st.integers(1, 3),
        )
    )
    injection = st.one_of(
        *(
            st.tuples(st.just(key), st.sampled_from(NON_FINITE + huge), st.integers(0, 2**31 - 1))
            for key, huge in HUGE.items()
        )
    )

    @config('forward')
    @given(
        structure,
        st.sampled_from(sorted(DTYPES)),
        st.lists(injection, max_size=4),
        st.booleans(),
    )
    def forward_matches(structure, dtype_name, injections, non_contiguous):
        case = make_case(**structure)
        for key, bad, where in injections:
            t = case[key].clone()
            if t.numel():
                t.view(-1)[where % t.numel()] = bad
            case[key] = t
        case = _cast(case, DTYPES[dtype_name])
        if non_contiguous:
            for key in ('value', 'sampling_locations', 'attention_weights'):
                t = case[key]
                case[key] = torch.stack([t, t], -1)[..., 0]  # same values, strided
        out = _call(case)
        check_matches_reference(case, out)
        kind = 'non_finite_or_huge' if injections else 'finite'
        counts['forward'][kind] += 1
        counts['forward'][dtype_name] += 1
        if non_contiguous:
            counts['forward']['non_contiguous'] += 1
        if not structure['bs'] * structure['num_queries']:
            counts['forward']['empty_output'] += 1
        if any(h * w == 0 for h, w in structure['levels']):
            counts['forward']['empty_level'] += 1

    def faults_raise_clearly(fault: str):
        @config('faults')
        @given(structure, st.integers(0, 100))
        def check(structure, index):
            case = apply_fault(make_case(**structure), fault, index)
            try:
                _call(case)
            except (ValueError, TypeError, RuntimeError) as e:
                assert isinstance(e, FAULTS[fault]), f'{fault}: {type(e).__name__}: {e}'
                text = str(e)
                assert 'ms_deform_attn' in text, f'{fault}: message does not name the op: {text}'
                counts['faults'][fault] += 1
                return
            raise AssertionError(f'{fault}: no error for inconsistent input')

        check()

    @config('backward')
    @given(structure)
    def backward_matches(structure):
        from mmdet_deform.ops import ms_deform_attn_pytorch

        structure = dict(structure, levels=[(max(h, 1), max(w, 1)) for h, w in structure['levels']])
        case = make_case(**structure)
        grads = []
        for fn in (_call, None):
            inputs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in case.items()}
            if fn is None:
                out = ms_deform_attn_pytorch(*(inputs[k] for k in case))
            else:
                out = fn(inputs)
            g = torch.Generator().manual_seed(structure['seed'])
            out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
            grads.append([inputs[k].grad for k in case if inputs[k].is_floating_point()])
        for ours, theirs in zip(*grads):
            torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
        counts['backward']['float64'] += 1

    forward_matches()
    for fault in FAULTS:
        faults_raise_clearly(fault)
    backward_matches()
    return {name: dict(c) for name, c in counts.items()}


def main() -> None:
    counts = run_fuzz()
    print(SUMMARY + json.dumps(counts), flush=True)


@pytest.mark.slow
def test_fuzz_ms_deform_attn_in_a_subprocess():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO_ROOT, env.get('PYTHONPATH')) if p)
    proc = subprocess.run(
        [sys.executable, '-c', 'from tests.test_ops.test_ms_deform_attn_fuzz import main; main()'],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    # a negative code is a signal (a crash in the kernel), positive a failing case
    assert proc.returncode == 0, f'fuzz run exited with {proc.returncode}:\n{output[-6000:]}'
    lines = [line for line in proc.stdout.splitlines() if line.startswith(SUMMARY)]
    assert len(lines) == 1, output[-3000:]
    counts = json.loads(lines[0][len(SUMMARY) :])
    forward, faults, backward = counts['forward'], counts['faults'], counts['backward']
    total = sum(forward[d] for d in DTYPES) + sum(faults.values()) + backward['float64']
    assert 400 <= total <= 520
    assert all(forward.get(d, 0) > 20 for d in DTYPES)
    for kind in ('finite', 'non_finite_or_huge', 'non_contiguous', 'empty_output', 'empty_level'):
        assert forward.get(kind, 0) > 5, (kind, forward)
    assert faults == dict.fromkeys(FAULTS, MAX_EXAMPLES['faults'])  # each raised every time
    assert backward['float64'] == MAX_EXAMPLES['backward']
