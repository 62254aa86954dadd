"""mmdet_deform.apis: inference with checked inputs and checkpoints loaded as
data (grayscale arrays work, empty / non-finite / float images are named,
the config inside a checkpoint is never executed)."""

import os.path as osp
import warnings

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer

from mmdet_deform.apis import (
    SafeDetInferencer,
    check_inference_image,
    inference_detector,
    init_detector,
)
from mmdet_deform.datasets import SHAPE_CLASSES, add_image_check, check_image_array
from mmdet_deform.engine import CheckpointError

from ..conftest import CONFIG_DIR

CONFIG = osp.join(CONFIG_DIR, 'deformable_detr', 'two_stage_shapes.py')


# ------------------------------------------------------------- image checks
@pytest.mark.parametrize(
    'img,shape',
    [
        (np.zeros((5, 7), np.uint8), (5, 7, 3)),
        (np.zeros((5, 7, 1), np.uint8), (5, 7, 3)),
        (np.zeros((5, 7, 3), np.uint8), (5, 7, 3)),
        (np.zeros((5, 7, 4), np.uint8), (5, 7, 3)),
    ],
    ids=['2d', 'hw1', 'bgr', 'bgra'],
)
def test_image_arrays_become_three_channel(img, shape):
    img = img.copy()
    img[1, 2] = 200
    out = check_image_array(img)
    assert out.shape == shape and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (out[1, 2] == 200).all() and out.sum() == 3 * 200


@pytest.mark.parametrize(
    'img,error,match',
    [
        (np.zeros((0, 0, 3), np.uint8), ValueError, r'img is empty: shape \(0, 0, 3\)'),
        (np.zeros((0, 0), np.uint8), ValueError, r'img is empty'),
        (np.full((4, 4, 3), np.nan, np.float32), ValueError, '48 non-finite values'),
        (np.full((4, 4, 3), np.inf), ValueError, 'non-finite values'),
        (np.full((4, 4, 3), 0.5, np.float32), ValueError, r'float32.*\* 255'),
        (np.zeros((4, 4, 3), np.uint16), ValueError, 'dtype uint16'),
        (np.zeros((4, 4, 2), np.uint8), ValueError, r'got shape \(4, 4, 2\)'),
        (np.zeros((2, 4, 4, 3), np.uint8), ValueError, r'got shape \(2, 4, 4, 3\)'),
        ([[0, 1]], TypeError, 'got list'),
    ],
    ids=['0x0', '0x0-2d', 'nan', 'inf', 'float01', 'uint16', '2-channels', '4d', 'list'],
)
def test_bad_image_arrays_are_named(img, error, match):
    with pytest.raises(error, match=match):
        check_image_array(img)


def test_float_images_are_read_as_0_255_only_where_allowed():
    img = np.full((4, 4), 128.0, np.float32)
    assert check_image_array(img, allow_float=True).shape == (4, 4, 3)
    nan = img.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="image 'a.png' has 1 non-finite"):
        check_image_array(nan, name="image 'a.png'", allow_float=True)


def test_image_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.png'):
        check_inference_image(str(tmp_path / 'missing.png'))
    empty = tmp_path / 'empty.png'
    empty.touch()
    with pytest.raises(ValueError, match=r'empty\.png.*is empty'):
        check_inference_image(empty)
    good = tmp_path / 'good.png'
    cv2.imwrite(str(good), np.zeros((4, 4), np.uint8))
    assert check_inference_image(good) == str(good)


def test_add_image_check_goes_right_after_the_loader():
    pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(8, 8))]
    checked = add_image_check(pipeline)
    assert [t['type'] for t in checked] == [
        'LoadImageFromFile',
        'mmdet_deform.CheckImage',
        'Resize',
    ]
    assert add_image_check(checked) == checked  # once
    assert add_image_check([dict(type='Resize')]) == [dict(type='Resize')]


# ---------------------------------------------------------------- the model
@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> str:
    """Initialised weights of the shapes config in an mmdet 3.3 style
    checkpoint: numpy HistoryBuffer in the message hub, the shapes classes."""
    torch.manual_seed(0)
    model = init_detector(CONFIG)
    model.init_weights()
    loss = HistoryBuffer()
    loss.update(1.0)
    path = str(tmp_path_factory.mktemp('weights') / 'shapes.pth')
    torch.save(
        {
            'meta': {'dataset_meta': {'classes': SHAPE_CLASSES}, 'epoch': 1, 'iter': 1},
            'state_dict': model.state_dict(),
            'message_hub': {'log_scalars': {'train/loss': loss}, 'runtime_info': {}},
        },
        path,
    )
    return path


@pytest.fixture(scope='module')
def model(weights):
    return init_detector(CONFIG, weights)


def _boxes(sample) -> torch.Tensor:
    return sample.pred_instances.bboxes


def test_init_detector_loads_an_mmdet_checkpoint_as_data(model):
    assert tuple(model.dataset_meta['classes']) == SHAPE_CLASSES
    assert 'palette' in model.dataset_meta
    types = [t['type'] for t in model.cfg.test_dataloader.dataset.pipeline]
    assert types[1] == 'mmdet_deform.CheckImage'


def test_inference_takes_grayscale_arrays(model):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (64, 80), dtype=np.uint8)
    cv2.circle(gray, (30, 30), 12, 255, -1)
    twin = inference_detector(model, np.repeat(gray[:, :, None], 3, axis=2))
    for img in (gray, gray[:, :, None]):
        sample = inference_detector(model, img)
        assert torch.isfinite(_boxes(sample)).all() and len(_boxes(sample)) > 0
        torch.testing.assert_close(_boxes(sample), _boxes(twin))
    samples = inference_detector(model, [gray, gray])
    assert len(samples) == 2


@pytest.mark.parametrize(
    'img,match',
    [
        (np.zeros((0, 0, 3), np.uint8), 'imgs is empty'),
        (np.full((32, 32, 3), np.nan, np.float32), 'non-finite'),
        (np.full((32, 32, 3), 0.5), 'float64'),
    ],
    ids=['0x0', 'nan', 'float01'],
)
def test_inference_refuses_bad_images_naming_the_problem(model, img, match):
    with pytest.raises(ValueError, match=match):
        inference_detector(model, img)
    with pytest.raises(ValueError, match=r'imgs\[1\]'):
        inference_detector(model, [np.zeros((8, 8, 3), np.uint8), img])


def test_init_detector_names_a_broken_checkpoint(tmp_path):
    empty = tmp_path / 'empty.pth'
    empty.touch()
    with pytest.raises(CheckpointError, match=rf"'{empty}' is empty"):
        init_detector(CONFIG, str(empty))


# --------------------------------------------------------------- inferencer
def _evil_checkpoint(weights: str, tmp_path) -> tuple:
    """``weights`` with Python in both places DetInferencer(model=None) reads
    the config from; it would create ``pwned``."""
    ckpt = torch.load(weights, weights_only=False)  # our own fixture file
    pwned = str(tmp_path / 'pwned')
    payload = f"x = open({pwned!r}, 'w').close()\n"
    ckpt['meta']['cfg'] = payload
    ckpt['message_hub']['runtime_info']['cfg'] = payload
    path = str(tmp_path / 'evil.pth')
    torch.save(ckpt, path)
    return path, pwned


def test_inferencer_needs_a_config_and_never_runs_the_checkpoints(weights, tmp_path):
    evil, pwned = _evil_checkpoint(weights, tmp_path)
    with pytest.raises(ValueError, match='model: give the config'):
        SafeDetInferencer(model=None, weights=evil, device='cpu')
    inferencer = SafeDetInferencer(model=CONFIG, weights=evil, device='cpu', show_progress=False)
    assert tuple(inferencer.model.dataset_meta['classes']) == SHAPE_CLASSES
    assert not osp.exists(pwned)


def test_inferencer_checks_arrays_and_warns_of_no_vis_backend(weights, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        inferencer = SafeDetInferencer(
            model=CONFIG, weights=weights, device='cpu', show_progress=False
        )
    assert not [w for w in caught if 'Failed to add' in str(w.message)]
    gray = np.full((48, 64), 90, np.uint8)
    pred = inferencer(gray, pred_score_thr=0.0)['predictions'][0]
    assert len(pred['bboxes']) > 0 and np.isfinite(pred['bboxes']).all()
    with pytest.raises(ValueError, match=r'inputs\[0\] is empty'):
        inferencer(np.zeros((0, 0), np.uint8))
    with pytest.raises(ValueError, match=r'inputs\[1\] has dtype float32'):
        inferencer([gray, np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(FileNotFoundError, match='missing.png'):
        inferencer(str(tmp_path / 'missing.png'))


def test_inferencer_checks_what_a_grayscale_loader_makes(weights, tmp_path):
    """A config whose loader reads grayscale hands 2-D images on: the
    pipeline's CheckImage makes them 3-channel (mmdet: IndexError)."""
    cfg = Config.fromfile(CONFIG)
    cfg.test_dataloader.dataset.pipeline[0]['color_type'] = 'grayscale'
    path = str(tmp_path / 'color.png')
    cv2.imwrite(path, np.full((40, 40, 3), 120, np.uint8))
    inferencer = SafeDetInferencer(model=cfg, weights=weights, device='cpu', show_progress=False)
    pred = inferencer(path, pred_score_thr=0.0)['predictions'][0]
    assert len(pred['bboxes']) > 0 and np.isfinite(pred['bboxes']).all()
