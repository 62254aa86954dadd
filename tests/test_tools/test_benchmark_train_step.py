"""tools/analysis_tools/benchmark_train_step.py runs ours and mmdet's model
side by side and reports every step (default mode), or times several configs
side by side (``--configs``)."""

import os.path as osp

import pytest

from ..conftest import REPO_ROOT
from .conftest import load_tool as load_tool_at
from .conftest import smoke_options

CONFIGS = [
    osp.join('configs', 'deformable_detr', 'two_stage_shapes.py'),
    osp.join('configs', 'detr', 'detr_shapes.py'),
    # an entry with its own overrides: a switch of the first config
    osp.join('configs', 'deformable_detr', 'two_stage_shapes.py')
    + ' model.look_forward_twice=False model.num_queries_one2many=20',
]


def load_tool():
    return load_tool_at('tools/analysis_tools/benchmark_train_step.py')


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
        'inference, optimize_for_inference (1 image)',
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
    with pytest.raises(SystemExit):
        tool.parse_args(['--configs', 'x.py', '--iters', '0'])


def test_mode_defaults():
    tool = load_tool()
    args = tool.parse_args([])
    assert args.configs is None
    assert (args.iters, args.warmup) == (3, 1)
    assert (args.batch_size, list(args.shape)) == (2, [512, 672])
    assert args.mmdet_config == tool.MMDET_CONFIG
    assert not args.skip_train and not args.skip_inference
    args = tool.parse_args(['--configs', 'a.py', 'b.py'])
    assert args.configs == ['a.py', 'b.py']
    assert (args.iters, args.warmup) == (10, 2)


def test_config_entry_overrides_are_parsed():
    tool = load_tool()
    assert tool.parse_config_entry('a.py') == ('a.py', {})
    config, overrides = tool.parse_config_entry(
        'a.py model.look_forward_twice=True model.k_one2many=6 model.neck.in_channels=[1,2]'
    )
    assert config == 'a.py'
    assert overrides == {
        'model.look_forward_twice': True,
        'model.k_one2many': 6,
        'model.neck.in_channels': [1, 2],
    }
    with pytest.raises(ValueError, match=r"'a.py look_forward_twice'.*KEY=VALUE"):
        tool.parse_config_entry('a.py look_forward_twice')


@pytest.mark.parametrize(
    'option',
    [['--skip-train'], ['--batch-size', '4'], ['--mmdet-config', 'x.py'], ['--config', 'y.py']],
)
def test_configs_mode_rejects_options_of_the_comparison(option, capsys):
    tool = load_tool()
    with pytest.raises(SystemExit):
        tool.parse_args(['--configs', 'a.py', *option])
    assert f'{option[0]} only apply without --configs' in capsys.readouterr().err


@pytest.mark.slow
def test_configs_mode_times_each_config(shapes_root, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    tool = load_tool()
    medians = tool.main(
        ['--configs', *CONFIGS, '--iters', '2', '--warmup', '0']
        + ['--cfg-options', *smoke_options(shapes_root)]
    )
    assert list(medians) == CONFIGS and all(m > 0 for m in medians.values())
    out = capsys.readouterr().out
    assert '| config | step (s) | epoch (min) | step / first |' in out
    for config in CONFIGS:
        assert f'| {config} |' in out
    assert f'| {CONFIGS[0]} | {medians[CONFIGS[0]]:.3f} |' in out
    assert out.count(' | 1.00 |') >= 1  # the first config against itself
