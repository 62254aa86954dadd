"""analyze_logs.py draws curves from a real run's logs; benchmark.py measures
inference speed."""

import json
import os.path as osp

import cv2
import pytest

from ..conftest import REPO_ROOT
from .conftest import CONFIG, load_tool, run_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def analyze_logs():
    return load_tool('tools/analysis_tools/analyze_logs.py')


def test_load_run_reads_train_and_val_records(dist_run, analyze_logs):
    assert dist_run.proc.returncode == 0, 'the training run failed'
    run = analyze_logs.load_run(dist_run.work_dir)
    assert [r['step'] for r in run.train] == [1, 2]  # 2 iterations per rank
    assert all('loss' in r and r['epoch'] == 1 for r in run.train)
    assert [r['step'] for r in run.val] == [1]
    assert 'coco/bbox_mAP' in run.val[0]
    minutes = run.train_minutes()
    assert minutes[0] > 0 and minutes[1] > minutes[0]


def test_plot_curve_writes_a_png_of_several_runs(dist_run, tmp_path):
    assert dist_run.proc.returncode == 0, 'the training run failed'
    out = str(tmp_path / 'curves.png')
    proc = run_tool(
        [
            'tools/analysis_tools/analyze_logs.py',
            'plot_curve',
            dist_run.work_dir,
            dist_run.work_dir,
            '--legend',
            'run_a',
            'run_b',
            '--keys',
            'loss',
            'loss_cls',
            'coco/bbox_mAP',
            '--out',
            out,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    img = cv2.imread(out)
    assert img is not None
    assert img.shape[1] > 2.5 * img.shape[0]  # three panels side by side
    assert img.std() > 5  # not a blank canvas
    out_time = str(tmp_path / 'curves_time.png')
    proc = run_tool(
        [
            'tools/analysis_tools/analyze_logs.py',
            'plot_curve',
            dist_run.work_dir,
            '--x-axis',
            'time',
            '--out',
            out_time,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cv2.imread(out_time) is not None


def test_resumed_runs_merge_and_later_records_win(analyze_logs, tmp_path):
    for stamp, rows in (
        ('20260101_000000', [(1, 5.0), (2, 4.0)]),
        ('20260101_010000', [(2, 3.5), (3, 3.0)]),  # resumed: step 2 again
    ):
        vis = tmp_path / stamp / 'vis_data'
        vis.mkdir(parents=True)
        lines = [json.dumps(dict(loss=loss, iter=s, epoch=1, step=s, time=0.5)) for s, loss in rows]
        (vis / 'scalars.json').write_text('\n'.join(lines) + '\n')
    run = analyze_logs.load_run(str(tmp_path), 'resumed')
    assert [(r['step'], r['loss']) for r in run.train] == [(1, 5.0), (2, 3.5), (3, 3.0)]
    assert run.train_minutes()[-1] == pytest.approx(3 * 0.5 / 60)


def test_bad_inputs_are_named(analyze_logs, tmp_path):
    with pytest.raises(FileNotFoundError, match='scalars.json'):
        analyze_logs.load_run(str(tmp_path))
    vis = tmp_path / 'r' / 'vis_data'
    vis.mkdir(parents=True)
    (vis / 'scalars.json').write_text(json.dumps(dict(loss=1.0, iter=1, step=1)) + '\n')
    run = analyze_logs.load_run(str(tmp_path / 'r'))
    with pytest.raises(KeyError, match='available'):
        analyze_logs.plot_curves([run], str(tmp_path / 'x.png'), keys=['coco/bbox_mAP'])
    with pytest.raises(SystemExit):
        analyze_logs.parse_args(['plot_curve', 'a', 'b', '--legend', 'only_one'])


def test_val_table_prints_the_metrics_of_each_run(analyze_logs, tmp_path):
    for name, maps in (('a', [0.1, 0.3]), ('b', [0.2])):
        vis = tmp_path / name / 'vis_data'
        vis.mkdir(parents=True)
        lines = [json.dumps(dict(loss=1.0, iter=1, epoch=1, step=1, time=0.5))]
        lines += [
            json.dumps({'coco/bbox_mAP': m, 'coco/bbox_mAP_50': 2 * m, 'step': e})
            for e, m in enumerate(maps, 1)
        ]
        (vis / 'scalars.json').write_text('\n'.join(lines) + '\n')
    runs = [analyze_logs.load_run(str(tmp_path / n)) for n in ('a', 'b')]
    table = analyze_logs.val_table(runs, ['coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_s'])
    assert table.splitlines() == [
        '| run | epoch | bbox_mAP | bbox_mAP_50 | bbox_mAP_s |',
        '| --- | --- | --- | --- | --- |',
        '| a | 2 | 0.300 | 0.600 | - |',
        '| b | 1 | 0.200 | 0.400 | - |',
    ]
    every = analyze_logs.val_table(runs[:1], ['coco/bbox_mAP'], all_epochs=True)
    assert every.splitlines()[2:] == ['| a | 1 | 0.100 |', '| a | 2 | 0.300 |']
    proc = run_tool(
        ['tools/analysis_tools/analyze_logs.py', 'val_table', str(tmp_path / 'a')]
        + ['--legend', 'first']
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '| first | 2 | 0.300 | 0.600 | - | - |' in proc.stdout


def test_cal_train_time(dist_run):
    assert dist_run.proc.returncode == 0, 'the training run failed'
    proc = run_tool(['tools/analysis_tools/analyze_logs.py', 'cal_train_time', dist_run.work_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'average iter time' in proc.stdout


def test_benchmark_reports_images_per_second():
    benchmark = load_tool('tools/analysis_tools/benchmark.py')
    fps = benchmark.main(
        [
            osp.join(REPO_ROOT, CONFIG),
            '--synthetic',
            '--img-size',
            '96',
            '--max-iter',
            '2',
            '--warmup',
            '1',
            '--log-interval',
            '1',
        ]
    )
    assert fps > 0
    fps = benchmark.main(
        [osp.join(REPO_ROOT, CONFIG), '--synthetic', '--img-size', '96', '--max-iter', '1']
        + ['--warmup', '0', '--optimize-for-inference']
    )
    assert fps > 0
    with pytest.raises(SystemExit):
        benchmark.parse_args([CONFIG, '--max-iter', '0'])
