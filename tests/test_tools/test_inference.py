"""mmdet's inference API with our configs: DetInferencer, init_detector /
inference_detector and demo/image_demo.py write drawings and predictions."""

import json
import os.path as osp
import re
import shutil

import cv2
import numpy as np
import pytest
import torch  # noqa: F401  (first: mmdet_deform._C needs libtorch loaded)

from mmdet_deform.datasets import SHAPE_CLASSES
from mmdet_deform.models import DeformableDETR

from ..conftest import REPO_ROOT
from .conftest import CONFIG, load_tool, run_tool

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
    # no weights: DetInferencer skips init_weights (which would fetch torchvision's ResNet-50),
    # leaving level_embed uninitialised memory; give it the values init_weights would
    torch.manual_seed(0)
    torch.nn.init.normal_(inferencer.model.level_embed)
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


# ---------------------------------------------------------------- odd inputs
def _write(path, img) -> str:
    assert cv2.imwrite(str(path), img)
    return str(path)


@pytest.fixture(scope='module')
def odd_images(tmp_path_factory) -> dict:
    """Images that are not 8-bit 3-channel, or tiny, or very large; each
    with the 3-channel BGR image it must read as (None: no exact twin)."""
    root = tmp_path_factory.mktemp('odd')
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (60, 90), dtype=np.uint8)
    cv2.circle(gray, (30, 30), 15, 255, -1)
    bgra = rng.integers(0, 255, (70, 50, 4), dtype=np.uint8)
    tiny = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    large = np.zeros((3000, 3000, 3), np.uint8)  # smooth: fast to encode
    cv2.rectangle(large, (500, 700), (1400, 2000), (0, 200, 50), -1)
    return {
        'gray': (
            _write(root / 'gray.png', gray),
            _write(root / 'gray3.png', gray[..., None].repeat(3, 2)),
        ),
        'rgba': (_write(root / 'rgba.png', bgra), _write(root / 'rgb.png', bgra[..., :3])),
        'gray16': (_write(root / 'gray16.png', gray.astype(np.uint16) * 257), None),
        'tiny': (_write(root / 'tiny.png', tiny), None),
        'large': (_write(root / 'large.jpg', large), None),
    }


@pytest.fixture(scope='module')
def shapes_inferencer():
    """DetInferencer of the shapes config with random (seeded) weights."""
    from mmdet.apis import DetInferencer

    torch.manual_seed(0)
    inferencer = DetInferencer(model=osp.join(REPO_ROOT, CONFIG), device='cpu', show_progress=False)
    # without weights DetInferencer skips init_weights: level_embed would be uninitialised memory
    inferencer.model.init_weights()
    return inferencer


def test_det_inferencer_reads_grayscale_rgba_tiny_and_large_images(shapes_inferencer, odd_images):
    for name, (path, twin) in odd_images.items():
        h, w = cv2.imread(path, cv2.IMREAD_UNCHANGED).shape[:2]
        pred = shapes_inferencer(path, pred_score_thr=0.0)['predictions'][0]
        boxes, scores = torch.tensor(pred['bboxes']), torch.tensor(pred['scores'])
        assert len(boxes) == len(scores) == len(pred['labels']) > 0, name
        assert torch.isfinite(boxes).all() and ((scores >= 0) & (scores <= 1)).all(), name
        # in the image (up to the float rounding of img_shape / scale_factor)
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w * (1 + 1e-5)).all(), name
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h * (1 + 1e-5)).all(), name
        assert (boxes[:, 2:] >= boxes[:, :2]).all(), name
        if twin is not None:  # read exactly as its 3-channel twin
            expected = shapes_inferencer(twin, pred_score_thr=0.0)['predictions'][0]
            torch.testing.assert_close(boxes, torch.tensor(expected['bboxes']))
            torch.testing.assert_close(scores, torch.tensor(expected['scores']))


def test_det_inferencer_names_a_missing_or_non_image_file(shapes_inferencer, tmp_path):
    missing = str(tmp_path / 'missing.jpg')
    with pytest.raises(FileNotFoundError, match='missing.jpg'):
        shapes_inferencer(missing)
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image')
    with pytest.raises(Exception, match=r'failed to load image: .*notes\.jpg'):  # mmcv's error
        shapes_inferencer(str(text))


@pytest.mark.parametrize(
    'make,problem',
    [
        (lambda root, good: str(root / 'missing.jpg'), 'input not found'),
        (lambda root, good: _text(root / 'notes.txt'), 'is not an image file OpenCV can read'),
        (lambda root, good: _text(root / 'fake.jpg'), 'is not an image file OpenCV can read'),
        (lambda root, good: _text(root / 'empty.png', ''), r'is empty \(0 bytes\)'),
        (lambda root, good: _truncated(root / 'cut.jpg', good), 'is truncated'),
        (lambda root, good: _folder(root, good), r'bad\.jpg.* is not an image file'),
        (lambda root, good: str(root), 'holds no images'),
    ],
)
def test_image_demo_refuses_bad_input_naming_the_file(tmp_path, image, capsys, make, problem):
    demo = load_tool('demo/image_demo.py')
    inputs = make(tmp_path, image)
    with pytest.raises(SystemExit) as info:
        demo.parse_args([inputs, CONFIG])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(problem, err), err


def _text(path, content: str = 'not an image') -> str:
    path.write_text(content)
    return str(path)


def _truncated(path, good: str) -> str:
    with open(good, 'rb') as f:
        data = f.read()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _folder(root, good: str) -> str:
    folder = root / 'images'
    folder.mkdir()
    shutil.copy(good, folder / 'good.jpg')
    (folder / 'bad.jpg').write_text('not an image')
    (folder / 'readme.txt').write_text('ignored: not an image extension')
    return str(folder)


def test_image_demo_runs_on_a_folder_of_odd_images(dist_run, odd_images, tmp_path):
    assert dist_run.proc.returncode == 0, 'the training run failed'
    folder = tmp_path / 'in'
    folder.mkdir()
    for path, _ in odd_images.values():
        shutil.copy(path, folder / osp.basename(path))
    out_dir = str(tmp_path / 'out')
    proc = run_tool(['demo/image_demo.py', str(folder), CONFIG, '--weights', dist_run.checkpoint,
                     '--out-dir', out_dir, '--device', 'cpu', '--score-thr', '0.0'])  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for name, (path, _) in odd_images.items():
        stem = osp.splitext(osp.basename(path))[0]
        h, w = cv2.imread(path, cv2.IMREAD_UNCHANGED).shape[:2]
        vis = cv2.imread(osp.join(out_dir, 'vis', osp.basename(path)))
        assert vis is not None and vis.shape == (h, w, 3), name
        with open(osp.join(out_dir, 'preds', f'{stem}.json')) as f:
            assert len(json.load(f)['labels']) > 0, name
