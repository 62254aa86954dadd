"""Every malformed input of the MSDA op raises a Python exception that names
the argument; none crashes or reads out of bounds.

All cases of one device run in a single subprocess (so that a crash fails
the tests instead of killing pytest, without paying one interpreter start
per case); the subprocess prints one JSON line per finished case, and each
case is then checked by its own test.
"""

import json
import os
import subprocess
import sys
import textwrap
from typing import Dict, Tuple

import pytest

from .msda_inputs import DEVICES

# name: (code run before the call, the call, expected exception, expected text)
# The code sees value (2, 30, 2, 4) float32, shapes [[4, 6], [2, 3]], starts [0, 24],
# loc (2, 5, 2, 2, 3, 2), weights (2, 5, 2, 2, 3), grad_out (2, 5, 8), all on `device`.
FORWARD = 'out = ms_deform_attn(value, shapes, starts, loc, weights)'
BACKWARD = 'out = backward(grad_out, value, shapes, starts, loc, weights)'
CASES: Dict[str, Tuple[str, str, str, str]] = {
    # ranks
    'value_3d': ('value = value[0]', FORWARD, 'ValueError', 'value must be 4-D'),
    'locations_5d': ('loc = loc[..., 0]', FORWARD, 'ValueError', 'sampling_locations must be 6-D'),
    'weights_4d': ('weights = weights[0]', FORWARD, 'ValueError', 'attention_weights must be 5-D'),
    'shapes_1d': (
        'shapes = shapes.flatten()', FORWARD, 'ValueError',
        'spatial_shapes must have shape (num_levels, 2)',
    ),
    'shapes_3_columns': (
        'shapes = torch.cat([shapes, shapes[:, :1]], 1)', FORWARD, 'ValueError',
        'spatial_shapes must have shape (num_levels, 2)',
    ),
    'starts_2d': (
        'starts = starts[None]', FORWARD, 'ValueError',
        'level_start_index must have shape (num_levels,)',
    ),
    # dtypes
    'value_int': (
        'value = value.long()', FORWARD, 'TypeError', 'value must be a floating point tensor'
    ),
    'value_complex': (
        'value = value.to(torch.complex64)', FORWARD, 'TypeError',
        'value must be a floating point tensor',
    ),
    'shapes_int32': ('shapes = shapes.int()', FORWARD, 'TypeError', 'spatial_shapes must be int64'),
    'shapes_float': (
        'shapes = shapes.float()', FORWARD, 'TypeError', 'spatial_shapes must be int64'
    ),
    'starts_int32': (
        'starts = starts.int()', FORWARD, 'TypeError', 'level_start_index must be int64'
    ),
    'locations_float64': (
        'loc = loc.double()', FORWARD, 'TypeError',
        'sampling_locations must have the dtype of value',
    ),
    'weights_bfloat16': (
        'weights = weights.bfloat16()', FORWARD, 'TypeError',
        'attention_weights must have the dtype of value',
    ),
    'value_none': ('value = None', FORWARD, 'ValueError', 'value must be 4-D'),
    'locations_none': ('loc = None', FORWARD, 'ValueError', 'sampling_locations must be 6-D'),
    'shapes_none': ('shapes = None', FORWARD, 'ValueError', 'spatial_shapes must have shape'),
    # sizes that do not match between arguments
    'batch_mismatch': (
        'loc = loc[:1]', FORWARD, 'ValueError',
        'sampling_locations has batch size 1 but value has 2',
    ),
    'heads_mismatch': (
        'loc = torch.cat([loc, loc[:, :, :1]], 2)', FORWARD, 'ValueError',
        'sampling_locations has 3 heads but value has 2',
    ),
    'locations_last_dim_3': (
        'loc = torch.cat([loc, loc[..., :1]], -1)', FORWARD, 'ValueError',
        'the last dimension of sampling_locations must be 2',
    ),
    'weights_points_mismatch': (
        'weights = weights[..., :2]', FORWARD, 'ValueError', 'attention_weights must have shape'
    ),
    'weights_batch_mismatch': (
        'weights = weights[:1]', FORWARD, 'ValueError', 'attention_weights must have shape'
    ),
    'weights_queries_mismatch': (
        'weights = weights[:, :3]', FORWARD, 'ValueError', 'attention_weights must have shape'
    ),
    'shapes_levels_mismatch': (
        'shapes = torch.cat([shapes, shapes[:1]])', FORWARD, 'ValueError',
        'spatial_shapes has 3 levels but sampling_locations has 2',
    ),
    'starts_levels_mismatch': (
        'starts = starts[:1]', FORWARD, 'ValueError',
        'level_start_index has 1 levels but sampling_locations has 2',
    ),
    # level metadata that does not describe value
    'negative_height': (
        'shapes = torch.tensor([[-4, 6], [2, 3]], device=device)', FORWARD, 'ValueError',
        'spatial_shapes[0] must be non-negative',
    ),
    'negative_width': (
        'shapes = torch.tensor([[4, 6], [2, -3]], device=device)', FORWARD, 'ValueError',
        'spatial_shapes[1] must be non-negative',
    ),
    'too_few_keys': (
        'value = value[:, :-1]', FORWARD, 'ValueError',
        'spatial_shapes describe sum(h*w) = 30 keys but value has num_keys = 29',
    ),
    'too_many_keys': (
        'shapes = torch.tensor([[4, 6], [3, 3]], device=device)', FORWARD, 'ValueError',
        'sum(h*w) = 33 keys but value has num_keys = 30',
    ),
    'starts_not_cumsum': (
        'starts = torch.tensor([0, 23], device=device)', FORWARD, 'ValueError',
        'level_start_index[1] must be 24',
    ),
    'starts_first_nonzero': (
        'starts = torch.tensor([1, 25], device=device)', FORWARD, 'ValueError',
        'level_start_index[0] must be 0',
    ),
    'shapes_overflow': (
        'shapes = torch.tensor([[2**62, 4], [2, 3]], device=device)', FORWARD, 'ValueError',
        'spatial_shapes overflows int64',
    ),
    # the backward op
    'grad_output_shape': (
        'grad_out = grad_out[:, :4]', BACKWARD, 'ValueError', 'grad_output must have shape'
    ),
    'grad_output_dtype': (
        'grad_out = grad_out.double()', BACKWARD, 'TypeError',
        'grad_output must have the dtype of value',
    ),
    'backward_bad_levels': (
        'starts = torch.tensor([0, 23], device=device)', BACKWARD, 'ValueError',
        'level_start_index[1] must be 24',
    ),
    # not errors: must run and give finite results
    'non_finite_locations': (
        "loc[0, 0, 0, 0, 0] = float('nan'); loc[0, 1, 0, 0, 0] = float('inf'); "
        "loc[1, 2, 1, 1, 2] = -float('inf'); loc[1, 3, 0, 1, 1] = 3e38",
        FORWARD + '; assert torch.isfinite(out).all(); '
        + BACKWARD + '; assert all(torch.isfinite(g).all() for g in out)',
        'ok', '',
    ),
    'far_outside_locations': (
        'loc = loc * 1e6',
        FORWARD + '; assert (out == 0).all(); '
        + BACKWARD + '; assert all((g == 0).all() for g in out)',
        'ok', '',
    ),
}  # fmt: skip

CUDA_CASES: Dict[str, Tuple[str, str, str, str]] = {
    'locations_on_cpu': (
        'loc = loc.cpu()', FORWARD, 'RuntimeError',
        'sampling_locations must be on the device of value',
    ),
    'weights_on_cpu': (
        'weights = weights.cpu()', FORWARD, 'RuntimeError',
        'attention_weights must be on the device of value',
    ),
    'value_on_cpu': (
        'value = value.cpu()', FORWARD, 'RuntimeError', 'must be on the device of value'
    ),
    'shapes_on_cpu': (
        'shapes = shapes.cpu()', FORWARD, 'RuntimeError',
        'spatial_shapes must be on the device of value',
    ),
    'starts_on_cpu': (
        'starts = starts.cpu()', FORWARD, 'RuntimeError',
        'level_start_index must be on the device of value',
    ),
}  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from mmdet_deform.ops import ms_deform_attn
    from tests.test_ops.msda_inputs import make_inputs

    device = sys.argv[1]
    backward = torch.ops.mmdet_deform._ms_deform_attn_backward
    for name, (setup, call, _, _) in json.loads(sys.stdin.read()).items():
        value, shapes, starts, loc, weights = make_inputs(
            2, 5, 2, 4, 2, 3, dtype=torch.float32, device=device)
        grad_out = torch.randn(2, 5, 8, device=device)
        scope = dict(torch=torch, ms_deform_attn=ms_deform_attn, backward=backward, device=device,
                     value=value, shapes=shapes, starts=starts, loc=loc, weights=weights,
                     grad_out=grad_out)
        try:
            exec(setup, scope)
            exec(call, scope)
            result = ['ok', '']
        except Exception as e:
            result = [type(e).__name__, str(e)]
        print(json.dumps({name: result}), flush=True)
    """
)


def cases_for(device: str) -> Dict[str, Tuple[str, str, str, str]]:
    return {**CASES, **CUDA_CASES} if device == 'cuda' else dict(CASES)


_results: Dict[str, dict] = {}


def run_cases(device: str, repo_root: str) -> dict:
    """Run every case of ``device`` in one subprocess (once per session)."""
    if device not in _results:
        env = dict(os.environ, PYTHONPATH=repo_root)
        proc = subprocess.run(
            [sys.executable, '-c', SCRIPT, device],
            input=json.dumps(cases_for(device)),
            cwd=repo_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        results = {}
        for line in proc.stdout.splitlines():
            if line.startswith('{'):
                results.update(json.loads(line))
        _results[device] = dict(results=results, returncode=proc.returncode, stderr=proc.stderr)
    return _results[device]


def pytest_generate_tests(metafunc):
    if 'case' in metafunc.fixturenames:
        params = []
        for device in DEVICES:
            name = device if isinstance(device, str) else device.values[0]
            marks = () if isinstance(device, str) else device.marks
            for case in cases_for(name):
                params.append(pytest.param(name, case, marks=marks, id=f'{case}-{name}'))
        metafunc.parametrize('device,case', params)


def test_bad_input(device, case, repo_root):
    run = run_cases(device, repo_root)
    _, _, expected_type, expected_text = cases_for(device)[case]
    assert case in run['results'], (
        f'the subprocess died before finishing {case!r} (exit code {run["returncode"]}):\n'
        + run['stderr'][-3000:]
    )
    got_type, message = run['results'][case]
    assert got_type == expected_type, f'{case}: expected {expected_type}, got {got_type}: {message}'
    assert expected_text in message, f'{case}: {expected_text!r} not in the message {message!r}'


def test_subprocess_exits_cleanly(repo_root):
    run = run_cases('cpu', repo_root)
    assert run['returncode'] == 0, run['stderr'][-3000:]
    assert set(run['results']) == set(CASES)


def test_messages_name_the_operator(repo_root):
    """Errors raised by the checks start with the operator's name."""
    run = run_cases('cpu', repo_root)
    for case, (got_type, message) in run['results'].items():
        if got_type in ('ValueError', 'TypeError'):
            assert 'ms_deform_attn' in message, f'{case}: {message}'
