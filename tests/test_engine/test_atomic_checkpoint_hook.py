"""AtomicCheckpointHook: a save that dies leaves the previous checkpoint in
place (mmengine's CheckpointHook deletes it first), the pointer stays valid,
and max_keep_ckpts still prunes."""

import os
import os.path as osp

import pytest
import torch
from mmengine.model import BaseModel
from torch.utils.data import DataLoader, Dataset

import mmdet_deform  # noqa: F401  (registers the hooks and the atomic_local backend)
from mmdet_deform.engine import SafeRunner, find_latest_checkpoint


class ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, mode='tensor'):
        return {'loss': self.linear(torch.stack(inputs)).pow(2).mean()}


class ToyDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        return {'inputs': torch.full((2,), float(index))}


def _runner(work_dir, hook_type, max_epochs, max_keep, resume=False, load_from=None) -> SafeRunner:
    return SafeRunner(  # the runner of the tools: loads checkpoints as data
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=DataLoader(
            ToyDataset(), batch_size=2, collate_fn=lambda b: {'inputs': [s['inputs'] for s in b]}
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(
            checkpoint=dict(
                type=hook_type,
                interval=1,
                max_keep_ckpts=max_keep,
                backend_args=dict(backend='atomic_local'),
            )
        ),
        resume=resume,
        load_from=load_from,
        default_scope='mmdet_deform',
        experiment_name=f'ckpt_{osp.basename(work_dir)}_{max_epochs}_{resume}',
    )


class SaveDied(Exception):
    pass


_real_replace = os.replace


@pytest.fixture
def dying_save_of_epoch_2(monkeypatch):
    """The rename that publishes epoch_2.pth fails, as if the process died there."""

    def failing_replace(src, dst, *args, **kwargs):
        if osp.basename(dst) == 'epoch_2.pth':
            raise SaveDied(dst)
        return _real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, 'replace', failing_replace)


@pytest.mark.parametrize(
    'hook_type,survives',
    [('mmdet_deform.AtomicCheckpointHook', True), ('CheckpointHook', False)],
)
def test_interrupted_save_keeps_the_previous_checkpoint(
    tmp_path, dying_save_of_epoch_2, hook_type, survives
):
    runner = _runner(tmp_path, hook_type, max_epochs=2, max_keep=1)
    with pytest.raises(SaveDied):
        runner.train()
    assert not osp.exists(tmp_path / 'epoch_2.pth')
    # mmengine's hook removed epoch_1.pth before saving epoch_2.pth: nothing to resume from
    assert osp.isfile(tmp_path / 'epoch_1.pth') is survives
    if survives:
        with open(tmp_path / 'last_checkpoint') as f:
            assert f.read() == str(tmp_path / 'epoch_1.pth')
        assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_1.pth')
    else:
        assert find_latest_checkpoint(str(tmp_path)) is None


def test_resume_after_an_interrupted_save_and_pruning(tmp_path, dying_save_of_epoch_2, monkeypatch):
    with pytest.raises(SaveDied):
        _runner(tmp_path, 'mmdet_deform.AtomicCheckpointHook', 3, max_keep=2).train()
    monkeypatch.undo()  # the next run's saves succeed

    latest = find_latest_checkpoint(str(tmp_path))  # what tools/train.py --resume does
    assert latest == str(tmp_path / 'epoch_1.pth')
    hook = 'mmdet_deform.AtomicCheckpointHook'
    runner = _runner(tmp_path, hook, 3, max_keep=2, resume=True, load_from=latest)
    runner.train()
    assert runner.iter == 6 and runner.epoch == 3
    # pruned to the newest two, after each save; no temp files left
    assert sorted(n for n in os.listdir(tmp_path) if 'pth' in n) == ['epoch_2.pth', 'epoch_3.pth']
    with open(tmp_path / 'last_checkpoint') as f:
        assert f.read() == str(tmp_path / 'epoch_3.pth')


HOOK = 'mmdet_deform.AtomicCheckpointHook'


def test_resume_from_another_folder_removes_nothing_it_did_not_write(tmp_path, monkeypatch):
    """``--work-dir A --resume B/epoch_2.pth``: B's list of checkpoints to keep
    comes back with the message hub; pruning by it would delete A's files."""
    b, a = tmp_path / 'b', tmp_path / 'a'
    _runner(b, HOOK, max_epochs=2, max_keep=2).train()
    b_files = {n: (b / n).read_bytes() for n in ('epoch_1.pth', 'epoch_2.pth')}
    a.mkdir()
    (a / 'epoch_1.pth').write_bytes(b'a file of another run')
    warnings = []
    runner = _runner(a, HOOK, 4, max_keep=2, resume=True, load_from=str(b / 'epoch_2.pth'))
    monkeypatch.setattr(runner.logger, 'warning', warnings.append)
    runner.train()
    assert (a / 'epoch_1.pth').read_bytes() == b'a file of another run'
    assert {n: (b / n).read_bytes() for n in b_files} == b_files  # B as it was
    # its own checkpoints are pruned as usual (the newest two), epoch_1.pth is not its own
    assert sorted(n for n in os.listdir(a) if n.endswith('.pth')) == [
        'epoch_1.pth',
        'epoch_3.pth',
        'epoch_4.pth',
    ]
    assert any(f'Resumed from {b / "epoch_2.pth"}' in w for w in warnings)


def test_stale_temp_cleanup_takes_only_its_own_regular_files(tmp_path):
    ours = '.epoch_2.pth.mmdet-deform-tmp-0123456789abcdef.tmp'  # as a kill mid-save leaves it
    (tmp_path / ours).write_bytes(b'half a checkpoint')
    (tmp_path / '.notes.pth.backup.tmp').write_text('a user file')  # the old pattern matched it
    (tmp_path / '.x.pth.mmdet-deform-tmp-0123456789abcdef.tmp').mkdir()  # a folder, our name
    (tmp_path / '.z.pth.abc.tmp').mkdir()  # a folder the old pattern matched
    (tmp_path / 'mine.txt').write_text('x')
    os.symlink(tmp_path / 'mine.txt', tmp_path / '.y.mmdet-deform-tmp-0123456789abcdef.tmp')
    _runner(tmp_path, HOOK, 1, max_keep=1).train()  # no IsADirectoryError
    names = os.listdir(tmp_path)
    assert ours not in names
    assert (tmp_path / '.notes.pth.backup.tmp').read_text() == 'a user file'
    assert osp.isdir(tmp_path / '.x.pth.mmdet-deform-tmp-0123456789abcdef.tmp')
    assert osp.isdir(tmp_path / '.z.pth.abc.tmp')
    assert osp.islink(tmp_path / '.y.mmdet-deform-tmp-0123456789abcdef.tmp')
    assert (tmp_path / 'mine.txt').read_text() == 'x'


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _runner(tmp_path, HOOK, 1, max_keep=1).train()
    finally:
        os.umask(old)
    for name in ('epoch_1.pth', 'last_checkpoint'):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name
