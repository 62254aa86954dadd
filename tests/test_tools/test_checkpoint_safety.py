"""The tools load checkpoints as data: ``tools/train.py --resume`` never runs
the config text inside a checkpoint, and ``tools/test.py`` /
``demo/image_demo.py`` stop on a broken checkpoint with a message naming it."""

import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch

from mmdet_deform.engine import load_checkpoint_file

from ..conftest import REPO_ROOT
from ..test_engine.toy import toy_config
from .conftest import CONFIG, load_tool


@pytest.fixture(scope='module')
def train_tool():
    return load_tool('tools/train.py')


def test_train_resume_does_not_run_the_config_inside_the_checkpoint(train_tool, tmp_path):
    config = toy_config(str(tmp_path), max_epochs=1)
    train_tool.main([config, '--work-dir', str(tmp_path / 'a')])
    ckpt = load_checkpoint_file(str(tmp_path / 'a' / 'epoch_1.pth'))
    pwned = tmp_path / 'pwned'
    ckpt['meta']['config'] = f"x = open({str(pwned)!r}, 'w').close()\n"
    evil = str(tmp_path / 'evil.pth')
    torch.save(ckpt, evil)

    longer = toy_config(str(tmp_path), max_epochs=2)
    train_tool.main([longer, '--work-dir', str(tmp_path / 'b'), '--resume', evil])
    assert not pwned.exists()
    assert osp.isfile(tmp_path / 'b' / 'epoch_2.pth')
    assert not osp.exists(tmp_path / 'b' / 'epoch_1.pth')  # resumed after epoch 1
    assert [n for n in os.listdir(tmp_path / 'a') if n.endswith('.pth')] == ['epoch_1.pth']


def _broken(tmp_path, kind: str) -> str:
    path = tmp_path / f'{kind}.pth'
    if kind == 'empty':
        path.touch()
    elif kind == 'text':
        path.write_text('not a checkpoint\n')
    else:  # truncated
        torch.save({'w': torch.zeros(100)}, path)
        os.truncate(path, os.path.getsize(path) // 2)
    return str(path)


@pytest.mark.parametrize(
    'kind,problem',
    [
        ('empty', 'is empty'),
        ('text', 'is not a torch checkpoint'),
        ('truncated', 'is truncated or corrupt'),
    ],
)
def test_test_tool_and_demo_name_a_broken_checkpoint(tmp_path, capsys, kind, problem):
    path = _broken(tmp_path, kind)
    test_tool = load_tool('tools/test.py')
    with pytest.raises(SystemExit) as info:
        test_tool.parse_args([osp.join(REPO_ROOT, CONFIG), path])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f'checkpoint {path!r} {problem}' in err

    image = tmp_path / 'img.png'
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    demo = load_tool('demo/image_demo.py')
    with pytest.raises(SystemExit) as info:
        demo.parse_args([str(image), osp.join(REPO_ROOT, CONFIG), '--weights', path])
    assert info.value.code == 2
    assert f'--weights: checkpoint {path!r} {problem}' in capsys.readouterr().err
