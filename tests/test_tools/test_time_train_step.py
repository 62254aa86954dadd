"""tools/analysis_tools/time_train_step.py times several configs side by side."""

import os.path as osp

import pytest

from .conftest import load_tool, smoke_options

CONFIGS = [
    osp.join('configs', 'deformable_detr', 'two_stage_shapes.py'),
    osp.join('configs', 'detr', 'detr_shapes.py'),
]


def test_times_each_config(shapes_root, capsys, monkeypatch):
    from .conftest import REPO_ROOT

    monkeypatch.chdir(REPO_ROOT)
    tool = load_tool('tools/analysis_tools/time_train_step.py')
    medians = tool.main(
        [*CONFIGS, '--iters', '2', '--warmup', '0', '--cfg-options', *smoke_options(shapes_root)]
    )
    assert len(medians) == 2 and all(m > 0 for m in medians)
    out = capsys.readouterr().out
    for config in CONFIGS:
        assert config in out
    assert '| step (s) | epoch (min) | step / first |' in out


def test_rejects_bad_iters():
    tool = load_tool('tools/analysis_tools/time_train_step.py')
    with pytest.raises(SystemExit):
        tool.parse_args(['x.py', '--iters', '0'])
