"""tools/train.py killed with SIGKILL (mid-epoch, and in the middle of a
checkpoint save), then ``--resume``: training continues from the last complete
checkpoint exactly where the killed run was (same losses, learning rates,
smoothed log values), and finishes."""

import glob
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List

import pytest
import torch

from mmdet_deform.engine import find_latest_checkpoint

from ..conftest import REPO_ROOT
from .conftest import CONFIG, tool_env, train_only_options

pytestmark = pytest.mark.slow

HERE = osp.dirname(osp.abspath(__file__))


def _start(
    work_dir: str, options: List[str], log: str, *extra: str, preload: str = '', **env
) -> subprocess.Popen:
    """Start ``tools/train.py`` writing its output to ``log``, after importing
    the module ``preload`` if given."""
    args = ['tools/train.py', CONFIG, '--work-dir', work_dir, *extra, '--cfg-options', *options]
    run = f'import {preload}, runpy, sys; sys.argv = {args!r}; '
    run += "runpy.run_path('tools/train.py', run_name='__main__')"
    with open(log, 'w') as out:
        return subprocess.Popen(
            [sys.executable, '-c', run] if preload else [sys.executable, *args],
            cwd=REPO_ROOT,
            env=dict(tool_env(), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _wait_until(proc: subprocess.Popen, log: str, done: Callable[[], bool], timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            pytest.fail(f'training exited ({proc.returncode}) too early:\n{_read(log)[-4000:]}')
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'timed out waiting for the training run:\n{_read(log)[-4000:]}')
        time.sleep(0.1)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _run_dirs(work_dir: str) -> List[str]:
    """The timestamped log folders of the runs in ``work_dir``, oldest first."""
    return sorted(glob.glob(osp.join(work_dir, '2*', 'vis_data', 'scalars.json')))


def _train_scalars(scalars_json: str) -> Dict[int, dict]:
    """The logged training values of one run by iteration."""
    rows = [json.loads(line) for line in _read(scalars_json).splitlines() if line.strip()]
    return {row['iter']: row for row in rows if 'loss' in row}


def _logged_iters(work_dir: str) -> int:
    runs = _run_dirs(work_dir)
    return max(_train_scalars(runs[-1]), default=0) if runs else 0


def _assert_same_training(killed: Dict[int, dict], resumed: Dict[int, dict], iters) -> None:
    """The resumed run reproduces the killed run's logged values (loss terms
    smoothed over the message hub's window, lr, grad norm)."""
    for it in iters:
        for key in ('loss', 'loss_cls', 'enc_loss_bbox', 'grad_norm', 'lr'):
            assert resumed[it][key] == pytest.approx(killed[it][key], rel=1e-5), (it, key)


def test_sigkill_mid_epoch_then_resume_continues_the_run(tmp_path, shapes_root):
    work_dir = str(tmp_path / 'work')
    # the config's warm-up + cosine schedule changes the lr every iteration, so
    # the lr comparison below checks that the scheduler resumes
    options = train_only_options(shapes_root, max_epochs=2)
    log1 = str(tmp_path / 'killed.log')
    proc = _start(work_dir, options, log1)
    # the first checkpoint (epoch 1 = iterations 1-4) is written, epoch 2 is under way
    _wait_until(proc, log1, lambda: _logged_iters(work_dir) >= 6)
    _kill(proc)
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    assert not osp.exists(osp.join(work_dir, 'epoch_2.pth'))
    (killed_scalars,) = _run_dirs(work_dir)
    killed = _train_scalars(killed_scalars)
    killed_log_bytes = _read(killed_scalars)

    log2 = str(tmp_path / 'resumed.log')
    proc = _start(work_dir, options, log2, '--resume')
    assert proc.wait(timeout=300) == 0, _read(log2)[-4000:]
    out = _read(log2)
    assert f'--resume: resuming from {osp.join(work_dir, "epoch_1.pth")}' in out
    assert 'resumed epoch: 1, iter: 4' in out
    assert 'Restored the random generator state' in out

    runs = _run_dirs(work_dir)
    assert len(runs) == 2 and runs[0] == killed_scalars
    assert _read(killed_scalars) == killed_log_bytes  # the killed run's log is kept as is
    resumed = _train_scalars(runs[1])
    assert sorted(resumed) == [5, 6, 7, 8]  # continues at iteration 5, ends after epoch 2
    # same weights, optimizer moments, message hub, data order and dropout
    # masks as the killed run: the same numbers, not a restart
    _assert_same_training(killed, resumed, [it for it in (5, 6, 7) if it in killed])
    assert resumed[8]['epoch'] == 2
    # the warm-up goes on from where the killed run was, it does not restart
    assert resumed[5]['lr'] > killed[4]['lr'] > killed[1]['lr']

    final = torch.load(osp.join(work_dir, 'epoch_2.pth'), map_location='cpu')
    assert (final['meta']['epoch'], final['meta']['iter']) == (2, 8)
    weights = [v for v in final['state_dict'].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)
    assert sorted(n for n in os.listdir(work_dir) if n.endswith('.pth')) == [
        'epoch_1.pth',
        'epoch_2.pth',
    ]


def test_sigkill_during_a_checkpoint_save_keeps_the_last_complete_one(tmp_path, shapes_root):
    work_dir = str(tmp_path / 'work')
    mark = str(tmp_path / 'saving')
    options = train_only_options(shapes_root, max_epochs=2) + [
        # one checkpoint kept: mmengine's CheckpointHook would delete epoch_1.pth
        # before writing epoch_2.pth, leaving nothing after this kill
        'default_hooks.checkpoint.max_keep_ckpts=1',
    ]
    log1 = str(tmp_path / 'killed.log')
    proc = _start(
        work_dir,
        options,
        log1,
        preload='slow_checkpoint_save',
        PYTHONPATH=os.pathsep.join([HERE, tool_env()['PYTHONPATH']]),
        SLOW_SAVE_TARGET='epoch_2.pth',
        SLOW_SAVE_MARK=mark,
    )
    _wait_until(proc, log1, lambda: osp.exists(mark))  # half of epoch_2.pth is on disk
    _kill(proc)

    names = os.listdir(work_dir)
    partial = [n for n in names if n.startswith('.epoch_2.pth.') and n.endswith('.tmp')]
    assert len(partial) == 1 and os.path.getsize(osp.join(work_dir, partial[0])) > 0
    assert 'epoch_2.pth' not in names  # nothing truncated under a final name
    assert _read(osp.join(work_dir, 'last_checkpoint')) == osp.join(work_dir, 'epoch_1.pth')
    assert find_latest_checkpoint(work_dir) == osp.join(work_dir, 'epoch_1.pth')
    ckpt = torch.load(osp.join(work_dir, 'epoch_1.pth'), map_location='cpu')
    assert ckpt['meta']['epoch'] == 1 and 'rng_state' in ckpt and 'optimizer' in ckpt
    (killed_scalars,) = _run_dirs(work_dir)
    killed = _train_scalars(killed_scalars)
    assert sorted(killed) == list(range(1, 9))  # all of epoch 2 ran before the save

    log2 = str(tmp_path / 'resumed.log')
    proc = _start(work_dir, options, log2, '--resume')
    assert proc.wait(timeout=300) == 0, _read(log2)[-4000:]
    out = _read(log2)
    assert 'resumed epoch: 1, iter: 4' in out
    assert f'Removed 1 temp file(s) of interrupted checkpoint saves in {work_dir}' in out
    resumed = _train_scalars(_run_dirs(work_dir)[1])
    assert sorted(resumed) == [5, 6, 7, 8]
    _assert_same_training(killed, resumed, [5, 6, 7, 8])
    assert sorted(os.listdir(work_dir)) == sorted(
        ['epoch_2.pth', 'last_checkpoint', 'two_stage_shapes.py']
        + [osp.basename(osp.dirname(osp.dirname(p))) for p in _run_dirs(work_dir)]
    )
    final = torch.load(osp.join(work_dir, 'epoch_2.pth'), map_location='cpu')
    assert (final['meta']['epoch'], final['meta']['iter']) == (2, 8)
