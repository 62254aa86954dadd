"""Atomic checkpoint writes and resuming after an interrupted save."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmdet_deform.engine import atomic_write_bytes, find_latest_checkpoint
from mmdet_deform.engine.fileio import AtomicLocalBackend


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / 'sub' / 'ckpt.pth'
    atomic_write_bytes(b'first', target)
    atomic_write_bytes(b'second version', target)
    assert target.read_bytes() == b'second version'
    assert sorted(os.listdir(target.parent)) == ['ckpt.pth']  # no temp file left


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / 'ckpt.pth'
    target.write_bytes(b'old')

    def broken_replace(src, dst):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'replace', broken_replace)
    with pytest.raises(OSError, match='disk full'):
        atomic_write_bytes(b'new', target)
    assert target.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['ckpt.pth']


def test_backend_put_and_put_text(tmp_path):
    backend = AtomicLocalBackend()
    backend.put(b'abc', tmp_path / 'a.bin')
    backend.put_text('hello', tmp_path / 'a.txt')
    assert (tmp_path / 'a.bin').read_bytes() == b'abc'
    assert (tmp_path / 'a.txt').read_text() == 'hello'


def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path):
    """A process killed while writing never leaves a partial file under the
    final name; the previous complete checkpoint is found for resuming."""
    torch.save({'epoch': 1}, tmp_path / 'epoch_1.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    script = f"""
import os, time, torch, io
import mmdet_deform.engine.fileio as fileio
real_fsync = os.fsync
def slow_fsync(fd):
    time.sleep(60)   # the kill arrives while the data is being flushed
fileio.os.fsync = slow_fsync
buf = io.BytesIO(); torch.save({{'epoch': 2, 'w': torch.zeros(1000)}}, buf)
fileio.atomic_write_bytes(buf.getvalue(), {str(tmp_path / 'epoch_2.pth')!r})
"""
    proc = subprocess.Popen([sys.executable, '-c', script])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if any(name.endswith('.tmp') for name in os.listdir(tmp_path)):
                break
            time.sleep(0.05)
        else:
            pytest.fail('the writer never started its temporary file')
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (tmp_path / 'epoch_2.pth').exists()
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_1.pth')


def test_find_latest_skips_truncated_checkpoint(tmp_path):
    """Even a truncated file under a final name (written by plain mmengine)
    and a pointer to it are skipped in favour of the newest complete one."""
    torch.save({'epoch': 1}, tmp_path / 'epoch_1.pth')
    torch.save({'epoch': 2}, tmp_path / 'epoch_2.pth')
    whole = (tmp_path / 'epoch_2.pth').read_bytes()
    (tmp_path / 'epoch_3.pth').write_bytes(whole[: len(whole) // 2])
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_3.pth'))
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_2.pth')
    (tmp_path / 'last_checkpoint').write_text('')  # killed while writing the pointer
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_2.pth')


def test_find_latest_none_when_empty(tmp_path):
    assert find_latest_checkpoint(str(tmp_path)) is None
    assert find_latest_checkpoint(str(tmp_path / 'missing')) is None


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(b'x', tmp_path / 'a.pth')
        os.umask(0o077)
        atomic_write_bytes(b'x', tmp_path / 'b.pth')
    finally:
        os.umask(old)
    assert os.stat(tmp_path / 'a.pth').st_mode & 0o777 == 0o644  # mkstemp gave 0600
    assert os.stat(tmp_path / 'b.pth').st_mode & 0o777 == 0o600


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    (tmp_path / 'users_file').write_text('keep me')
    os.symlink(tmp_path / 'users_file', tmp_path / 'epoch_1.pth')
    atomic_write_bytes(b'checkpoint', tmp_path / 'epoch_1.pth')
    assert (tmp_path / 'users_file').read_text() == 'keep me'
    assert not os.path.islink(tmp_path / 'epoch_1.pth')
    assert (tmp_path / 'epoch_1.pth').read_bytes() == b'checkpoint'
