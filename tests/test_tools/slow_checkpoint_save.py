"""Test-only: makes one checkpoint save hang half-written, so a test can kill it.

Imported into a training subprocess before ``tools/train.py`` runs.
The real :func:`mmdet_deform.engine.fileio.atomic_write_bytes` runs; only the
file object it writes the temp file with is wrapped: when the temp file of
``$SLOW_SAVE_TARGET`` (e.g. ``epoch_2.pth``) is written, half of the bytes go
to disk, ``$SLOW_SAVE_MARK`` is created, and the write blocks (until the test
sends SIGKILL).
"""

import os
import os.path as osp
import time

import mmdet_deform.engine.fileio as fileio

TARGET = os.environ['SLOW_SAVE_TARGET']
MARK = os.environ['SLOW_SAVE_MARK']


class _HangingFile:
    """A binary file whose first ``write`` writes half of the data, then hangs."""

    def __init__(self, file) -> None:
        self._file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, data: bytes) -> int:
        half = len(data) // 2
        self._file.write(data[:half])
        self._file.flush()
        os.fsync(self._file.fileno())
        with open(MARK, 'w') as f:
            f.write(f'{half} of {len(data)} bytes written\n')
        time.sleep(600)
        raise RuntimeError('slow_checkpoint_save: the test should have killed this process')

    def __getattr__(self, name):
        return getattr(self._file, name)


class _OsProxy:
    """``os`` for the fileio module, with an ``fdopen`` that hangs on the target."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fdopen(fd, *args, **kwargs):
        file = os.fdopen(fd, *args, **kwargs)
        path = os.readlink(f'/proc/self/fd/{fd}')
        if osp.basename(path).startswith(f'.{TARGET}.'):
            return _HangingFile(file)
        return file


fileio.os = _OsProxy()
