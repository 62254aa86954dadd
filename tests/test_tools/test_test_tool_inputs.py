"""tools/test.py checks every loaded test image (CheckImage after the loader):
a grayscale loader's 2-D images become 3-channel, a broken image is named."""

import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from mmcv.transforms import Compose
from mmengine.registry import init_default_scope

from ..conftest import REPO_ROOT
from .conftest import CONFIG, load_tool


@pytest.fixture
def test_pipeline(tmp_path, monkeypatch):
    """The test pipeline tools/test.py runs, for a config whose loader reads grayscale."""
    test_tool = load_tool('tools/test.py')
    captured = {}

    class _Runner:
        test_evaluator = None

        def test(self):
            return {}

    def build_runner(cfg):
        captured['cfg'] = cfg
        return _Runner()

    monkeypatch.setattr(test_tool, 'build_runner', build_runner)
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': {}}, ckpt)
    test_tool.main([
        osp.join(REPO_ROOT, CONFIG), str(ckpt), '--work-dir', str(tmp_path / 'work'),
        '--cfg-options', 'test_dataloader.dataset.pipeline.0.color_type=grayscale',
    ])  # fmt: skip
    init_default_scope('mmdet_deform')
    return captured['cfg'].test_dataloader.dataset.pipeline


def test_test_tool_puts_the_image_check_after_the_loader(test_pipeline, tmp_path):
    assert [t['type'] for t in test_pipeline[:2]] == [
        'LoadImageFromFile',
        'mmdet_deform.CheckImage',
    ]
    path = str(tmp_path / 'img.png')
    cv2.imwrite(path, np.full((30, 40, 3), 100, np.uint8))
    out = Compose(test_pipeline)(dict(img_path=path, img_id=0, instances=[]))
    assert tuple(out['inputs'].shape[:1]) == (3,)  # mmdet: 1 channel, IndexError later


def test_check_image_names_the_file_of_an_empty_image():
    from mmdet_deform.datasets import CheckImage

    with pytest.raises(ValueError, match=r"image '/data/a\.png' is empty"):
        CheckImage()(dict(img=np.zeros((0, 5, 3), np.uint8), img_path='/data/a.png'))
    with pytest.raises(ValueError, match=r"image '/data/b\.tif' has 1 non-finite"):
        img = np.zeros((4, 4, 3), np.float32)
        img[0, 0, 0] = np.inf
        CheckImage()(dict(img=img, img_path='/data/b.tif'))
