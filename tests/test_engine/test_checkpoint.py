"""Checkpoints load as data: no code runs, no arbitrary object is built, the
process' torch allow-list is left alone, broken files get clear errors, and
mmengine 0.10 checkpoints (numpy, HistoryBuffer) still load."""

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

import mmdet_deform  # noqa: F401  (what a user's process does)
from mmdet_deform.engine import (
    CheckpointError,
    check_checkpoint_file,
    find_latest_checkpoint,
    load_checkpoint_file,
)

from ..conftest import REPO_ROOT


class _FloatDTypeClaimingObjects:
    """Pickles as ``dtype('f8')`` whose state sets the 'holds objects' flags."""

    def __reduce__(self):
        return np.dtype, ('f8', False, True), (3, '<', None, None, None, -1, -1, 63)


class _ArrayFromBytes:
    """Pickles as a numpy array of ``dtype`` filled from raw bytes: with an
    object dtype numpy would follow those bytes as pointers."""

    def __init__(self, dtype) -> None:
        self.dtype = dtype

    def __reduce__(self):
        reconstruct, args, _ = np.zeros(1).__reduce__()
        return reconstruct, args, (1, (4,), self.dtype, False, b'\x01' * 32)


class _Getattr:
    """Pickles as ``getattr(owner, name)`` (the form mmengine's HistoryBuffer
    methods take): with an allowed owner, a way to reach other attributes."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


class _NotData:
    pass


def _mmengine_style_checkpoint() -> dict:
    """What mmengine 0.10 / mmdet 3.3 write: HistoryBuffers, numpy scalars."""
    loss = HistoryBuffer()
    for value in (2.0, 1.5, 1.0):
        loss.update(value)
    return {
        'meta': {'epoch': 1, 'iter': 3, 'dataset_meta': {'classes': ('a', 'b')}},
        'state_dict': {'w': torch.arange(4.0)},
        'message_hub': {
            'log_scalars': {'train/loss': loss},
            'runtime_info': {'best_score': np.float64(0.25), 'shape': np.arange(6).reshape(2, 3)},
            'resumed_keys': {'train/loss': True},
        },
    }


def test_importing_the_package_leaves_torchs_allow_list_alone(tmp_path):
    names = {getattr(g, '__qualname__', str(g)) for g in torch.serialization.get_safe_globals()}
    assert not names & {'HistoryBuffer', '_reconstruct', 'ndarray', 'dtype', 'scalar'}
    path = tmp_path / 'arr.pth'
    torch.save({'a': np.zeros(3)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # as without the import: numpy is not allow-listed
    assert load_checkpoint_file(str(path))['a'].tolist() == [0.0, 0.0, 0.0]  # ours loads it
    # and the process' list is the same after our load as before
    assert names == {
        getattr(g, '__qualname__', str(g)) for g in torch.serialization.get_safe_globals()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    'dtype,reason',
    [
        (np.dtype(object), "numpy dtype 'O8' is not a plain numeric dtype"),
        (_FloatDTypeClaimingObjects(), "numpy dtype 'f8' has an unexpected state"),
    ],
    ids=['object-dtype', 'float-dtype-with-object-flags'],
)
def test_crafted_object_array_is_refused_and_crashes_nothing(tmp_path, dtype, reason):
    """After ``import mmdet_deform`` torch still refuses such a file (with
    the old process-wide allow-list numpy built it: an internal error or a
    crash), and our loader refuses its dtype. In a subprocess, so a crash
    shows as a failure instead of taking pytest down."""
    path = str(tmp_path / 'objects.pth')
    torch.save({'x': _ArrayFromBytes(dtype)}, path)
    code = f"""
import pickle, torch
import mmdet_deform
from mmdet_deform.engine import CheckpointError, load_checkpoint_file
try:
    torch.load({path!r})
except pickle.UnpicklingError:
    print('torch refused')
try:
    load_checkpoint_file({path!r})
except CheckpointError as e:
    print('ours refused:', e)
"""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert 'torch refused' in proc.stdout
    assert 'ours refused' in proc.stdout and path in proc.stdout
    assert reason in proc.stdout


def test_history_buffer_state_cannot_rewire_other_buffers(tmp_path):
    """A HistoryBuffer's pickled state carries 'statistics methods', which
    mmengine's ``__setstate__`` merges into a dict shared by every buffer."""
    path = str(tmp_path / 'buffer.pth')
    methods = HistoryBuffer._statistics_methods
    saved = dict(methods)
    try:  # the crafted state: 'mean' is HistoryBuffer.max
        methods['mean'] = HistoryBuffer.max
        torch.save({'x': HistoryBuffer([1.0, 3.0], [1, 1], max_length=10)}, path)
    finally:
        methods.clear()
        methods.update(saved)
    loaded = load_checkpoint_file(path)['x']
    assert isinstance(loaded, HistoryBuffer)
    assert loaded.mean() == 2.0  # its data came back, its 'methods' were not used
    assert HistoryBuffer([1.0, 3.0], [1, 1]).mean() == 2.0  # not max (3.0)
    assert HistoryBuffer._statistics_methods['mean'] is HistoryBuffer.mean


@pytest.mark.parametrize(
    'payload,match',
    [
        (
            _Getattr(HistoryBuffer, '__init__'),
            r"getattr\(HistoryBuffer, '__init__'\) is not allowed",
        ),
        (
            _Getattr(collections.OrderedDict, 'fromkeys'),
            r"getattr\(OrderedDict, 'fromkeys'\) is not allowed",
        ),
        (_NotData(), 'holds objects that mmdet_deform does not load'),
    ],
)
def test_other_objects_are_refused(tmp_path, payload, match):
    path = str(tmp_path / 'evil.pth')
    torch.save({'x': payload}, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint_file(path)
    assert path in str(info.value)


def test_mmengine_checkpoint_with_numpy_and_history_buffers_loads(tmp_path):
    path = str(tmp_path / 'mmengine.pth')
    torch.save(_mmengine_style_checkpoint(), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # needs numpy and mmengine names: refused by bare torch
    ckpt = load_checkpoint_file(path)
    loss = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(loss, HistoryBuffer)
    assert loss.data[0].tolist() == [2.0, 1.5, 1.0] and loss.mean() == 1.5
    info = ckpt['message_hub']['runtime_info']
    assert isinstance(info['best_score'], np.float64) and info['best_score'] == 0.25
    assert info['shape'].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(ckpt['state_dict']['w'], torch.arange(4.0))
    check_checkpoint_file(path)


def _save_tensors(path) -> str:
    torch.save({'meta': {'epoch': 1, 'iter': 1}, 'w': torch.zeros(4), 'v': torch.ones(2)}, path)
    return str(path)


def _drop_record(path: str, suffix: str = '/data/0') -> None:
    """Rewrite the archive at ``path`` without its record ``*<suffix>``."""
    with zipfile.ZipFile(path) as archive:
        records = [(i, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
        for info, data in records:
            if not info.filename.endswith(suffix):
                archive.writestr(info, data)


def _empty(path: str) -> None:
    with open(path, 'wb'):
        pass


def _text(path: str) -> None:
    with open(path, 'w') as f:
        f.write('epoch: 1\n')


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    'damage,match',
    [
        (_empty, r'is empty \(0 bytes\)'),
        (_text, "is not a torch checkpoint.*b'epoch: 1"),
        (_truncate, 'is truncated or corrupt'),
        (_drop_record, r'is incomplete: the record .*data/0 is missing'),
    ],
    ids=['empty', 'text', 'truncated', 'missing-record'],
)
def test_broken_checkpoints_get_clear_errors_naming_the_file(tmp_path, damage, match):
    path = _save_tensors(tmp_path / 'ckpt.pth')
    damage(path)
    for load in (load_checkpoint_file, check_checkpoint_file):
        with pytest.raises(CheckpointError, match=match) as info:
            load(path)
        assert repr(path) in str(info.value)


def test_latest_checkpoint_falls_back_when_the_newest_lacks_a_record(tmp_path, monkeypatch):
    logged = _logged(monkeypatch)
    epoch_1 = _save_tensors(tmp_path / 'epoch_1.pth')
    epoch_2 = _save_tensors(tmp_path / 'epoch_2.pth')
    _drop_record(epoch_2)  # has data.pkl: an archive check alone passes it
    (tmp_path / 'last_checkpoint').write_text(epoch_2)
    assert find_latest_checkpoint(str(tmp_path)) == epoch_1
    assert any(f'skipping {epoch_2}' in m and 'is missing' in m for m in logged)


def _logged(monkeypatch) -> list:
    """The messages ``mmdet_deform.engine.checkpoint`` logs from now on."""
    import mmdet_deform.engine.checkpoint as checkpoint

    messages = []
    monkeypatch.setattr(checkpoint, 'print_log', lambda msg, *a, **k: messages.append(msg))
    return messages


def test_latest_checkpoint_does_not_follow_a_pointer_out_of_the_work_dir(tmp_path, monkeypatch):
    logged = _logged(monkeypatch)
    elsewhere = tmp_path / 'other_run'
    elsewhere.mkdir()
    foreign = _save_tensors(elsewhere / 'epoch_9.pth')
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'last_checkpoint').write_text(foreign)
    assert find_latest_checkpoint(str(work)) is None
    assert any(f'points to {foreign}, outside the work dir' in m for m in logged)
    own = _save_tensors(work / 'epoch_1.pth')
    assert find_latest_checkpoint(str(work)) == own
