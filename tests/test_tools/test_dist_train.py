"""tools/dist_train.sh on CPU (2 processes, gloo), then tools/test.py and
tools/dist_test.sh on its checkpoint."""

import os.path as osp
import pickle
import re

import pytest
import torch

from mmdet_deform.datasets import SHAPE_CLASSES

from .conftest import CONFIG, free_port, run_tool, smoke_options

pytestmark = pytest.mark.slow


def test_dist_train_runs_two_processes_and_writes_a_checkpoint(dist_run):
    assert dist_run.proc.returncode == 0, dist_run.log[-4000:]
    log = dist_run.log
    assert 'Distributed training: True' in log
    assert "'backend': 'gloo'" in log
    # world size 2: the 16 training images in batches of 4 are split over the
    # two ranks, 2 iterations each (a single process would run 4)
    assert re.search(r'Epoch\(train\) \[1\]\[2/2\]', log), log[-3000:]
    assert not re.search(r'Epoch\(train\) \[1\]\[\d+/4\]', log)
    assert osp.isfile(dist_run.checkpoint)
    ckpt = torch.load(dist_run.checkpoint, map_location='cpu')  # weights_only, allow-listed
    assert ckpt['meta']['epoch'] == 1
    assert tuple(ckpt['meta']['dataset_meta']['classes']) == SHAPE_CLASSES
    assert any(k.startswith('bbox_head.') for k in ckpt['state_dict'])
    assert 'coco/bbox_mAP' in log  # validation ran on the 8 val images


def test_test_py_on_the_checkpoint_prints_coco_map(dist_run, tmp_path):
    assert dist_run.proc.returncode == 0, 'the training run failed'
    out = tmp_path / 'preds.pkl'
    proc = run_tool(
        [
            'tools/test.py',
            CONFIG,
            dist_run.checkpoint,
            '--work-dir',
            str(tmp_path / 'test'),
            '--out',
            str(out),
            '--show-dir',
            'drawn',
            '--cfg-options',
            *smoke_options(dist_run.data_root),
        ]
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    drawn = list((tmp_path / 'test').glob('*/drawn/*.jpg'))
    assert len(drawn) == 8  # --show-dir: every test image with its detections
    match = re.search(r'coco/bbox_mAP: (-?[\d.]+)', log)
    assert match, log[-3000:]
    assert -1.0 <= float(match.group(1)) <= 1.0
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 8  # one entry per test image
    assert {'bboxes', 'scores', 'labels'} <= set(preds[0]['pred_instances'])


def test_dist_test_sh_evaluates_with_two_processes(dist_run, tmp_path):
    assert dist_run.proc.returncode == 0, 'the training run failed'
    proc = run_tool(
        [
            'bash',
            'tools/dist_test.sh',
            CONFIG,
            dist_run.checkpoint,
            '2',
            '--work-dir',
            str(tmp_path / 'dist_test'),
            '--cfg-options',
            *smoke_options(dist_run.data_root),
        ],
        PORT=str(free_port()),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'Distributed training: True' in log
    assert re.search(r'Epoch\(test\) \[1/1\].*coco/bbox_mAP', log), log[-3000:]  # 8 imgs / (2 x 4)


def test_dist_scripts_print_usage_without_arguments():
    for script in ('tools/dist_train.sh', 'tools/dist_test.sh', 'tools/slurm_train.sh'):
        proc = run_tool(['bash', script])
        assert proc.returncode == 2
        assert 'usage:' in proc.stderr


def test_test_py_optimize_for_inference_predicts_the_same(dist_run, tmp_path):
    """``--optimize-for-inference`` tests the BatchNorm-folded copy: the
    same detections as the plain model, up to float rounding."""
    assert dist_run.proc.returncode == 0, 'the training run failed'
    preds = {}
    for name, extra in (('plain', []), ('optimized', ['--optimize-for-inference'])):
        out = tmp_path / f'{name}.pkl'
        proc = run_tool(
            [
                'tools/test.py',
                CONFIG,
                dist_run.checkpoint,
                '--work-dir',
                str(tmp_path / name),
                '--out',
                str(out),
                *extra,
                '--cfg-options',
                *smoke_options(dist_run.data_root),
            ]
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        with open(out, 'rb') as f:
            preds[name] = pickle.load(f)
    assert len(preds['plain']) == len(preds['optimized']) == 8
    for a, b in zip(preds['plain'], preds['optimized']):
        a, b = a['pred_instances'], b['pred_instances']
        assert torch.allclose(a['scores'], b['scores'], atol=1e-4)
        keep = a['scores'] > 0.05
        assert torch.equal(a['labels'][keep], b['labels'][keep])
        assert torch.allclose(a['bboxes'][keep], b['bboxes'][keep], atol=0.05)
