"""The README's main job, end to end on a tiny dataset and one epoch."""

import os.path as osp
import re

import cv2
import pytest

from .conftest import run_tool, smoke_options

pytestmark = pytest.mark.slow


def test_main_job_trains_evaluates_and_draws(tmp_path, shapes_root):
    work_dir = str(tmp_path / 'main_job')
    proc = run_tool(
        [
            'tools/main_job.py',
            '--work-dir',
            work_dir,
            '--num-vis',
            '4',
            '--cfg-options',
            *smoke_options(shapes_root),
        ]
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'multi-scale deformable attention: compiled' in out
    for step in ('1/4 data', '2/4 train', '3/4 evaluate', '4/4 pictures', 'done'):
        assert f'==== {step}' in out
    assert re.search(r'Epoch\(train\) \[1\]\[4/4\].*eta', out)  # progress with ETA
    assert re.search(r'val COCO: mAP=-?[\d.]+ +mAP_50=', out)
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    predictions = cv2.imread(osp.join(work_dir, 'predictions.png'))
    assert predictions is not None and predictions.shape[:2] == (2 * 96, 2 * 96)  # 2x2 tiles
    assert len(list((tmp_path / 'main_job' / 'predictions' / 'preds').iterdir())) == 4
    assert cv2.imread(osp.join(work_dir, 'curves.png')) is not None
    for name in ('checkpoint', 'predictions', 'curves', 'work dir'):
        assert re.search(rf'{name}: \S', out)
    # the inferencer's visualizer is built without a LocalVisBackend that has nowhere to save
    assert 'Failed to add' not in out
    assert not osp.exists(osp.join(work_dir, '.mmdet_deform_run.lock'))  # released
