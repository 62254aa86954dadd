"""tools/train.py and an existing work dir: ``--resume`` finds the latest
complete checkpoint, and a new run never overwrites an earlier run's
checkpoints or logs (it refuses, naming the work dir and the options)."""

import hashlib
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mmdet_deform.utils import check_work_dir, set_resume

from ..conftest import REPO_ROOT
from .conftest import CONFIG, load_tool

CONFIG_PATH = osp.join(REPO_ROOT, CONFIG)


@pytest.fixture(scope='module')
def train_tool():
    return load_tool('tools/train.py')


def _checkpoint(path, epoch: int) -> str:
    torch.save({'meta': {'epoch': epoch}}, str(path))
    return str(path)


def _cfg(work_dir, **kwargs) -> Config:
    return Config(dict(dict(work_dir=str(work_dir), resume=False, load_from=None), **kwargs))


def _snapshot(folder) -> dict:
    """Every file under ``folder`` with its content hash."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(osp.join(root, name), 'rb') as f:
                found[osp.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


def test_resume_flag_parsing(train_tool):
    assert train_tool.parse_args([CONFIG_PATH]).resume is None
    assert train_tool.parse_args([CONFIG_PATH, '--resume']).resume == 'auto'
    assert train_tool.parse_args([CONFIG_PATH, '--resume', 'x.pth']).resume == 'x.pth'


def test_resume_skips_a_stale_pointer_and_a_truncated_checkpoint(tmp_path):
    epoch_1 = _checkpoint(tmp_path / 'epoch_1.pth', 1)
    epoch_2 = _checkpoint(tmp_path / 'epoch_2.pth', 2)
    with open(epoch_2, 'rb') as f:
        data = f.read()
    with open(epoch_2, 'wb') as f:  # truncated, as mmengine's plain save leaves it when killed
        f.write(data[: len(data) // 2])
    (tmp_path / 'last_checkpoint').write_text(epoch_2)
    cfg = _cfg(tmp_path)
    assert set_resume(cfg, 'auto') == epoch_1
    assert cfg.resume is True and cfg.load_from == epoch_1


def test_resume_without_a_checkpoint_starts_as_configured(tmp_path):
    cfg = _cfg(tmp_path, load_from='pretrained.pth')
    assert set_resume(cfg, 'auto') is None
    # not resume=True with load_from=None: mmengine would trust any pointer it finds
    assert cfg.resume is False and cfg.load_from == 'pretrained.pth'


def test_resume_from_a_path_and_from_the_config(tmp_path):
    ckpt = _checkpoint(tmp_path / 'epoch_3.pth', 3)
    cfg = _cfg(tmp_path / 'other')
    assert set_resume(cfg, ckpt) == ckpt and cfg.resume and cfg.load_from == ckpt
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        set_resume(_cfg(tmp_path), str(tmp_path / 'nope.pth'))
    cfg = _cfg(tmp_path, resume=True)  # `resume = True` in a config: same robust search
    assert set_resume(cfg, None) == ckpt and cfg.load_from == ckpt
    cfg = _cfg(tmp_path)
    assert set_resume(cfg, None) is None and cfg.resume is False


def test_new_run_refuses_a_work_dir_with_checkpoints(train_tool, tmp_path):
    work_dir = tmp_path / 'work'
    (work_dir / '20260101_000000' / 'vis_data').mkdir(parents=True)
    (work_dir / '20260101_000000' / 'vis_data' / 'scalars.json').write_text('{"loss": 1.0}\n')
    _checkpoint(work_dir / 'epoch_1.pth', 1)
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'epoch_1.pth'))
    before = _snapshot(work_dir)
    with pytest.raises(FileExistsError) as info:
        train_tool.main([CONFIG_PATH, '--work-dir', str(work_dir)])
    message = str(info.value)
    assert str(work_dir) in message and 'epoch_1.pth' in message
    assert '--resume' in message and '--work-dir' in message
    assert _snapshot(work_dir) == before  # nothing written, nothing removed

    # also after `load_from` (fine-tuning) and for a best checkpoint alone
    (work_dir / 'epoch_1.pth').unlink()
    (work_dir / 'last_checkpoint').unlink()
    _checkpoint(work_dir / 'best_coco_bbox_mAP_epoch_7.pth', 7)
    with pytest.raises(FileExistsError, match='best_coco_bbox_mAP_epoch_7.pth'):
        check_work_dir(_cfg(work_dir, load_from='pretrained.pth'))


def test_resuming_or_a_work_dir_without_checkpoints_is_allowed(tmp_path):
    work_dir = tmp_path / 'work'
    check_work_dir(_cfg(work_dir))  # missing
    work_dir.mkdir()
    (work_dir / 'two_stage_shapes.py').write_text('# config dump of a run that died early\n')
    (work_dir / '20260101_000000').mkdir()  # its logs: mmengine writes a new folder per run
    check_work_dir(_cfg(work_dir))
    _checkpoint(work_dir / 'iter_500.pth', 1)
    check_work_dir(_cfg(work_dir), resume='auto')
    check_work_dir(_cfg(work_dir), resume=str(work_dir / 'iter_500.pth'))
    check_work_dir(_cfg(work_dir, resume=True))
    with pytest.raises(FileExistsError, match='iter_500.pth'):
        check_work_dir(_cfg(work_dir))
