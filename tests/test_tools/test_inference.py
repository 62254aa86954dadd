"""mmdet's inference API with our configs: DetInferencer, init_detector /
inference_detector and demo/image_demo.py write drawings and predictions."""

import json
import os.path as osp

import cv2
import numpy as np
import pytest
import torch  # noqa: F401  (first: mmdet_deform._C needs libtorch loaded)

from mmdet_deform.datasets import SHAPE_CLASSES
from mmdet_deform.models import DeformableDETR

from ..conftest import REPO_ROOT
from .conftest import CONFIG, run_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def image(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cv2.circle(img, (40, 50), 20, (0, 0, 255), -1)
    path = str(tmp_path_factory.mktemp('img') / 'demo.jpg')
    cv2.imwrite(path, img)
    return path


def _check_outputs(out_dir: str, stem: str, num_classes: int) -> dict:
    vis = cv2.imread(osp.join(out_dir, 'vis', f'{stem}.jpg'))
    assert vis is not None and vis.shape == (96, 128, 3)
    with open(osp.join(out_dir, 'preds', f'{stem}.json')) as f:
        preds = json.load(f)
    n = len(preds['labels'])
    assert n > 0 and len(preds['scores']) == n and len(preds['bboxes']) == n
    assert all(0 <= label < num_classes for label in preds['labels'])
    assert all(len(b) == 4 for b in preds['bboxes'])
    return preds


def test_det_inferencer_builds_our_model_from_the_r50_config(image, tmp_path):
    from mmdet.apis import DetInferencer

    # no scope given: the config's scope-qualified types pick our classes
    inferencer = DetInferencer(
        model=osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_r50.py'),
        device='cpu',
        show_progress=False,
    )
    assert isinstance(inferencer.model, DeformableDETR)
    assert inferencer.model.as_two_stage and inferencer.model.with_box_refine
    # COCO's 1333x800 resize makes a ResNet-50 forward slow on 2 cores: keep the image size
    resize = [t for t in inferencer.pipeline.transforms if type(t).__name__ == 'Resize']
    assert len(resize) == 1 and tuple(resize[0].scale) == (1333, 800)
    resize[0].scale = (256, 192)  # >= 300 tokens for the 300 two-stage proposals
    out_dir = str(tmp_path / 'out')
    result = inferencer(image, out_dir=out_dir, no_save_pred=False, pred_score_thr=0.0)
    assert len(result['predictions']) == 1
    _check_outputs(out_dir, 'demo', num_classes=80)


def test_det_inferencer_with_a_trained_shapes_checkpoint(dist_run, image, tmp_path):
    from mmdet.apis import DetInferencer, inference_detector, init_detector

    assert dist_run.proc.returncode == 0, 'the training run failed'
    config = osp.join(REPO_ROOT, CONFIG)
    inferencer = DetInferencer(model=config, weights=dist_run.checkpoint, show_progress=False)
    assert tuple(inferencer.model.dataset_meta['classes']) == SHAPE_CLASSES
    out_dir = str(tmp_path / 'out')
    inferencer(image, out_dir=out_dir, no_save_pred=False, pred_score_thr=0.0)
    _check_outputs(out_dir, 'demo', num_classes=len(SHAPE_CLASSES))

    model = init_detector(config, dist_run.checkpoint, device='cpu')
    assert isinstance(model, DeformableDETR)
    sample = inference_detector(model, image)
    assert sample.pred_instances.bboxes.shape[1] == 4
    assert sample.pred_instances.labels.max() < len(SHAPE_CLASSES)


def test_image_demo_writes_drawing_and_predictions(dist_run, image, tmp_path):
    assert dist_run.proc.returncode == 0, 'the training run failed'
    out_dir = str(tmp_path / 'demo_out')
    proc = run_tool(
        [
            'demo/image_demo.py',
            image,
            CONFIG,
            '--weights',
            dist_run.checkpoint,
            '--out-dir',
            out_dir,
            '--score-thr',
            '0.0',
            '--device',
            'cpu',
        ]
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f'results have been saved at {out_dir}' in proc.stdout
    _check_outputs(out_dir, 'demo', num_classes=len(SHAPE_CLASSES))


def test_image_demo_names_a_missing_input(tmp_path):
    proc = run_tool(['demo/image_demo.py', str(tmp_path / 'none.jpg'), CONFIG])
    assert proc.returncode == 2
    assert 'input not found' in proc.stderr and 'none.jpg' in proc.stderr
