"""tools/train.py and an existing work dir: ``--resume`` finds the latest
complete checkpoint, and a new run never overwrites an earlier run's
checkpoints or logs (it refuses, naming the work dir and the options)."""

import hashlib
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from mmdet_deform.utils import (
    WORK_DIR_LOCK,
    WorkDirBusyError,
    WorkDirLock,
    check_work_dir,
    set_resume,
)

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


# ------------------------------------------- runs from elsewhere, concurrency
def _toy_train(train_tool, tmp_path, work_dir, *extra, max_epochs=1):
    from ..test_engine.toy import toy_config

    config = toy_config(str(tmp_path), max_epochs=max_epochs)
    train_tool.main([config, '--work-dir', str(work_dir), *extra])


def test_resume_from_elsewhere_refuses_a_work_dir_with_another_runs_checkpoints(tmp_path):
    (tmp_path / 'other_run').mkdir()
    other = _checkpoint(tmp_path / 'other_run' / 'epoch_2.pth', 2)
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    _checkpoint(work_dir / 'epoch_1.pth', 1)
    before = _snapshot(work_dir)
    with pytest.raises(
        FileExistsError, match=r'holds the checkpoints of another run.*epoch_1\.pth'
    ):
        check_work_dir(_cfg(work_dir), resume=other)
    cfg = _cfg(work_dir, resume=True, load_from=other)  # `resume = True` + load_from: the same
    with pytest.raises(FileExistsError, match='another run'):
        check_work_dir(cfg)
    assert _snapshot(work_dir) == before
    check_work_dir(_cfg(tmp_path / 'fresh'), resume=other)  # an empty work dir is fine


def test_resume_says_where_it_resumes_from(tmp_path, monkeypatch):
    import mmdet_deform.utils.launch as launch

    logged = []
    monkeypatch.setattr(launch, 'print_log', lambda msg, *a, **k: logged.append(msg))
    (tmp_path / 'other_run').mkdir()
    other = _checkpoint(tmp_path / 'other_run' / 'epoch_2.pth', 2)
    set_resume(_cfg(tmp_path / 'work'), other)
    assert f'resuming from {other}, which is outside the work dir' in logged[-1]
    # automatic resume does not follow a pointer out of the work dir
    (tmp_path / 'work').mkdir()
    (tmp_path / 'work' / 'last_checkpoint').write_text(other)
    cfg = _cfg(tmp_path / 'work')
    assert set_resume(cfg, 'auto') is None and cfg.resume is False


def test_a_second_run_in_a_locked_work_dir_is_refused(train_tool, tmp_path):
    """Two runs started at once in an empty work dir both pass the checkpoint
    check; the lock stops the second."""
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    holder = subprocess.Popen(  # holds the lock as a running tools/train.py would
        [
            sys.executable,
            '-c',
            'import fcntl, os, sys, time; '
            f'fd = os.open({str(work_dir / WORK_DIR_LOCK)!r}, os.O_RDWR | os.O_CREAT); '
            'fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f"{os.getpid()}\\n".encode()); '
            'print("locked", flush=True); time.sleep(120)',
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(WorkDirBusyError) as info:
            _toy_train(train_tool, tmp_path, work_dir)
        message = str(info.value)
        assert str(work_dir) in message and f'pid {holder.pid}' in message
        assert '--work-dir' in message
        assert sorted(os.listdir(work_dir)) == [WORK_DIR_LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # the kernel released the killed holder's lock: the run goes ahead, and removes the file
    _toy_train(train_tool, tmp_path, work_dir)
    assert osp.isfile(work_dir / 'epoch_1.pth')
    assert WORK_DIR_LOCK not in os.listdir(work_dir)


def test_work_dir_lock_in_one_process_and_through_a_symlink(tmp_path):
    first = WorkDirLock(str(tmp_path)).acquire()
    with pytest.raises(WorkDirBusyError, match=f'pid {os.getpid()}'):
        WorkDirLock(str(tmp_path)).acquire()
    first.release()
    with WorkDirLock(str(tmp_path)):
        pass
    assert os.listdir(tmp_path) == []
    target = tmp_path / 'elsewhere'
    os.symlink(target, tmp_path / WORK_DIR_LOCK)
    with pytest.raises(FileExistsError, match='symbolic link'):
        WorkDirLock(str(tmp_path)).acquire()
    assert not target.exists()
