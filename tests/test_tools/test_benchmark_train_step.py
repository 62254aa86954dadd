"""tools/analysis_tools/benchmark_train_step.py runs both models side by side
and reports every step."""

import importlib.util
import os.path as osp

import pytest

from ..conftest import REPO_ROOT


def load_tool():
    path = osp.join(REPO_ROOT, 'tools', 'analysis_tools', 'benchmark_train_step.py')
    spec = importlib.util.spec_from_file_location('benchmark_train_step', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_times_both_models(capsys):
    tool = load_tool()
    # a small model of the same structure, on both sides
    options = [
        'model.backbone.depth=18',
        'model.neck.in_channels=[128,256,512]',
        'model.encoder.num_layers=1',
        'model.decoder.num_layers=1',
        'model.num_queries=50',
    ]
    results = tool.main(
        ['--shape', '128', '160', '--iters', '1', '--warmup', '0', '--devices', 'cpu']
        + ['--cfg-options', *options]
    )
    rows = {what: (mmdet, ours) for what, mmdet, ours in results['cpu']}
    assert set(rows) == {
        'forward + backward (batch 2)',
        'clip + AdamW step (batch 2)',
        'train step (batch 2)',
        'inference (1 image)',
    }
    for what, (mmdet, ours) in rows.items():
        for wall, cpu in (mmdet, ours):
            assert wall > 0 and cpu > 0, what
    out = capsys.readouterr().out
    assert '| cpu | train step (batch 2) |' in out and 'speed-up' in out
    assert 'minor page faults' in out  # each iteration's kernel share


def test_benchmark_rejects_bad_arguments():
    tool = load_tool()
    with pytest.raises(SystemExit):
        tool.parse_args(['--iters', '0'])
