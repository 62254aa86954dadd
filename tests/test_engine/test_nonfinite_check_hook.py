"""NonFiniteCheckHook: skips bad steps, logs them, stops after a streak."""

import logging

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.structures import BaseDataElement
from torch.utils.data import DataLoader, Dataset

from mmdet_deform.engine import NonFiniteCheckHook, NonFiniteLossError


class PoisonableModel(BaseModel):
    """Its loss is NaN (or its gradient inf) at chosen iterations."""

    def __init__(self, nan_loss_iters=(), inf_grad_iters=()) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        self.nan_loss_iters = set(nan_loss_iters)
        self.inf_grad_iters = set(inf_grad_iters)
        self.calls = 0
        self.snapshots = []

    def forward(self, inputs, data_samples=None, mode='tensor'):
        self.snapshots.append(self.linear.weight.detach().clone())
        out = self.linear(torch.stack(inputs)).sum()
        it = self.calls
        self.calls += 1
        if it in self.nan_loss_iters:
            out = out * float('nan')
        if it in self.inf_grad_iters:
            # finite loss, infinite gradient
            out.register_hook(lambda grad: grad * float('inf'))
        return {'loss': out}


class ToyDataset(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index):
        sample = BaseDataElement(metainfo=dict(img_id=index))
        return {'inputs': torch.full((2,), float(index)), 'data_samples': sample}


def collate(batch):
    return {
        'inputs': [s['inputs'] for s in batch],
        'data_samples': [s['data_samples'] for s in batch],
    }


def _runner(tmp_path, model, max_consecutive=3) -> Runner:
    return Runner(
        model=model,
        work_dir=str(tmp_path),
        train_dataloader=DataLoader(ToyDataset(), batch_size=2, collate_fn=collate),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        custom_hooks=[
            dict(type='mmdet_deform.NonFiniteCheckHook', max_consecutive=max_consecutive)
        ],
        default_scope='mmdet_deform',
        experiment_name=f'nonfinite_{id(model)}',
    )


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record) -> None:
        if 'Non-finite training step' in record.getMessage():
            self.messages.append(record.getMessage())


def _train_and_capture(runner) -> list:
    handler = ListHandler()
    runner.logger.addHandler(handler)
    try:
        runner.train()
    finally:
        runner.logger.removeHandler(handler)
    return handler.messages


def test_nan_loss_step_is_skipped_and_logged(tmp_path):
    model = PoisonableModel(nan_loss_iters={2})
    messages = _train_and_capture(_runner(tmp_path, model))
    # the weights seen by iteration 3 equal those of iteration 2: step skipped
    assert torch.equal(model.snapshots[3], model.snapshots[2])
    assert not torch.equal(model.snapshots[2], model.snapshots[1])
    assert all(torch.isfinite(w).all() for w in model.snapshots)
    assert len(messages) == 1
    assert 'iteration 3' in messages[0] and 'loss is nan' in messages[0]
    assert '[4, 5]' in messages[0]  # the image ids of the batch
    assert (tmp_path / 'epoch_1.pth').exists()


def test_inf_gradient_step_is_skipped(tmp_path):
    model = PoisonableModel(inf_grad_iters={1})
    messages = _train_and_capture(_runner(tmp_path, model))
    assert torch.equal(model.snapshots[2], model.snapshots[1])
    assert len(messages) == 1 and 'gradient norm is inf' in messages[0]
    assert torch.isfinite(model.linear.weight).all()


def test_streak_stops_the_run_with_a_clear_error(tmp_path):
    model = PoisonableModel(nan_loss_iters={3, 4, 5, 6, 7})
    runner = _runner(tmp_path, model, max_consecutive=3)
    with pytest.raises(NonFiniteLossError, match='3 consecutive training steps'):
        runner.train()
    assert model.calls == 6  # iterations 3, 4, 5 were bad: stopped after the third
    assert torch.isfinite(model.linear.weight).all()


def test_rejects_bad_argument():
    with pytest.raises(ValueError, match='max_consecutive'):
        NonFiniteCheckHook(max_consecutive=0)
