"""RNGStateHook: a resumed run draws the same random numbers as an
uninterrupted one (mmengine alone reseeds and replays the start)."""

import random

import numpy as np
import pytest
import torch
from mmengine.model import BaseModel
from torch.utils.data import Dataset

import mmdet_deform  # noqa: F401  (registers the hooks)
from mmdet_deform.engine import SafeRunner
from mmdet_deform.engine.hooks import get_rng_state, set_rng_state


class DropoutModel(BaseModel):
    """Records the random numbers each training step draws in the main process."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        self.draws = []

    def forward(self, inputs, augment=None, mode='tensor'):
        mask = torch.rand(len(inputs)) > 0.1  # like dropout
        self.draws.append((mask.tolist(), augment))
        out = self.linear(torch.stack(inputs)).squeeze(1) * mask
        return {'loss': (out**2).mean()}


class AugmentingDataset(Dataset):
    """Draws from numpy's and Python's global generators like mmcv's transforms."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index):
        augment = (float(np.random.rand()), random.random())  # noqa: NPY002
        return {'inputs': torch.full((2,), float(index)), 'augment': augment}


def _collate(batch):
    return {'inputs': [s['inputs'] for s in batch], 'augment': [s['augment'] for s in batch]}


def _runner(work_dir, max_epochs: int, rng_hook: bool, resume=False, load_from=None) -> SafeRunner:
    torch.manual_seed(0)  # the same initial weights in every runner
    return SafeRunner(  # the runner of the tools: loads checkpoints as data
        model=DropoutModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=AugmentingDataset(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=4,
            num_workers=0,
            collate_fn=_collate,
        ),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='mmdet_deform.AtomicCheckpointHook', interval=1)),
        custom_hooks=[dict(type='mmdet_deform.RNGStateHook')] if rng_hook else [],
        randomness=dict(seed=0),
        resume=resume,
        load_from=load_from,
        default_scope='mmdet_deform',
        experiment_name=f'rng_{work_dir.name}_{max_epochs}_{resume}_{rng_hook}',
    )


@pytest.mark.parametrize('rng_hook', [True, False])
def test_resume_continues_the_random_streams(tmp_path, rng_hook):
    whole = _runner(tmp_path / f'whole{rng_hook}', max_epochs=2, rng_hook=rng_hook)
    whole.train()
    _runner(tmp_path / f'cut{rng_hook}', max_epochs=1, rng_hook=rng_hook).train()
    resumed = _runner(tmp_path / f'cut{rng_hook}', max_epochs=2, rng_hook=rng_hook, resume=True)
    resumed.train()
    second_epoch = whole.model.draws[2:]
    assert len(resumed.model.draws) == len(second_epoch) == 2
    if rng_hook:
        assert resumed.model.draws == second_epoch
        assert torch.equal(resumed.model.linear.weight, whole.model.linear.weight)
    else:
        # mmengine alone: the seed is reset, so the resumed epoch replays the
        # random numbers of the first epoch instead of drawing new ones
        assert resumed.model.draws != second_epoch
        assert resumed.model.draws == whole.model.draws[:2]


def test_load_from_keeps_the_new_runs_seed(tmp_path):
    """Fine-tuning from a checkpoint (load_from, no resume) must not adopt its RNG state."""
    _runner(tmp_path / 'a', max_epochs=1, rng_hook=True).train()
    fresh = _runner(tmp_path / 'b', max_epochs=1, rng_hook=True)
    fresh.train()
    tuned = _runner(tmp_path / 'c', 1, rng_hook=True, load_from=str(tmp_path / 'a' / 'epoch_1.pth'))
    tuned.train()
    assert [d[1] for d in tuned.model.draws] == [d[1] for d in fresh.model.draws]


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002
    random.seed(1)
    state = get_rng_state()
    path = tmp_path / 'rng.pth'
    torch.save({'rng_state': state}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    torch.manual_seed(2)
    np.random.seed(2)  # noqa: NPY002
    random.seed(2)
    set_rng_state(torch.load(path)['rng_state'])  # weights_only=True, the default
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(again[0], expected[0])
    assert np.array_equal(again[1], expected[1]) and again[2] == expected[2]
