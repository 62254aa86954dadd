"""tools/analysis_tools/benchmark_mmdet_plugin.py times mmdet's DINO with
mmcv's deformable attention and with ours, side by side."""

import pytest

from .conftest import load_tool

SMALL = [
    'model.backbone.depth=18',
    'model.backbone.base_channels=16',
    'model.neck.in_channels=[32,64,128]',
    'model.encoder.num_layers=1',
    'model.decoder.num_layers=1',
    'model.num_queries=20',
    'model.dn_cfg.group_cfg.num_dn_queries=10',
]


@pytest.fixture
def reverted_after():
    yield
    from mmdet_deform.plugins import mmcv_msda

    mmcv_msda.revert()


@pytest.mark.slow
def test_benchmark_times_both_modules(capsys, reverted_after):
    tool = load_tool('tools/analysis_tools/benchmark_mmdet_plugin.py')
    rows = tool.main(
        ['--shape', '96', '128', '--iters', '1', '--warmup', '0', '--cfg-options', *SMALL]
    )
    assert [what for what, *_ in rows] == ['forward + backward', 'clip + AdamW step', 'train step']
    for what, mmcv, ours in rows:
        assert all(t > 0 for t in (*mmcv, *ours)), what
    out = capsys.readouterr().out
    # the baseline really runs mmcv's module, the other ours
    assert 'mmcv: MultiScaleDeformableAttention from mmcv.ops.multi_scale_deform_attn' in out
    assert 'ours: MultiScaleDeformableAttention from mmdet_deform.ops.ms_deform_attn' in out
    assert '| train step (batch 2) |' in out and 'speed-up' in out


def test_benchmark_rejects_bad_arguments():
    tool = load_tool('tools/analysis_tools/benchmark_mmdet_plugin.py')
    with pytest.raises(SystemExit):
        tool.parse_args(['--iters', '0'])
    with pytest.raises(SystemExit):
        tool.parse_args(['--warmup', '-1'])
    with pytest.raises(FileNotFoundError, match='no/such.py'):
        tool.config_path('no/such.py')
