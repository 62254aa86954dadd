"""mmengine checkpoints save and resume on torch >= 2.6 (weights_only)."""

import copy

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import DataLoader, Dataset

import mmdet_deform  # noqa: F401  (allow-lists the checkpoint types)


class ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, targets=None, mode='tensor'):
        inputs = torch.stack(inputs)
        out = self.linear(inputs)
        if mode == 'loss':
            return {'loss': ((out - torch.stack(targets)) ** 2).mean()}
        return out


class ToyDataset(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        x = torch.rand(2, generator=g)
        return {'inputs': x, 'targets': x.sum(0, keepdim=True)}


def _runner(work_dir, max_epochs, resume=False, load_from=None) -> Runner:
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=DataLoader(
            ToyDataset(),
            batch_size=4,
            collate_fn=lambda b: {
                'inputs': [s['inputs'] for s in b],
                'targets': [s['targets'] for s in b],
            },
        ),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1], by_epoch=True, begin=0, end=10),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        # as in configs/_base_/default_runtime.py: atomic checkpoint writes
        default_hooks=dict(
            checkpoint=dict(
                type='CheckpointHook', interval=1, backend_args=dict(backend='atomic_local')
            )
        ),
        resume=resume,
        load_from=load_from,
        default_scope='mmdet_deform',
        experiment_name=f'toy_{max_epochs}_{resume}',
    )


def test_torch_load_defaults_to_weights_only():
    # the situation this package handles: torch >= 2.6 loads weights_only
    major, minor = (int(v) for v in torch.__version__.split('.')[:2])
    assert (major, minor) >= (2, 6)


def test_save_and_resume_mmengine_checkpoint(tmp_path):
    runner = _runner(tmp_path, max_epochs=1)
    runner.train()
    ckpt = tmp_path / 'epoch_1.pth'
    assert ckpt.exists()
    trained = copy.deepcopy(runner.model.state_dict())

    # loads with the default weights_only=True, as mmengine calls it
    checkpoint = torch.load(ckpt, map_location='cpu')
    assert checkpoint['meta']['epoch'] == 1
    assert 'message_hub' in checkpoint

    resumed = _runner(tmp_path, max_epochs=2, resume=True)
    resumed.train()
    assert resumed.epoch == 2
    assert resumed.iter == 4
    # the scheduler state came back: lr dropped at the epoch-1 milestone
    lr = resumed.optim_wrapper.get_lr()['lr'][0]
    assert lr == pytest.approx(0.001)
    # and training continued from the trained weights, not from scratch
    assert not torch.equal(resumed.model.linear.weight, trained['linear.weight'])


def test_load_from_mmengine_checkpoint(tmp_path):
    runner = _runner(tmp_path / 'a', max_epochs=1)
    runner.train()
    loaded = _runner(tmp_path / 'b', max_epochs=1, load_from=str(tmp_path / 'a' / 'epoch_1.pth'))
    loaded.load_or_resume()
    for key, tensor in runner.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor)


def test_unknown_globals_are_still_refused(tmp_path):
    """The allow-list is narrow: arbitrary objects are still rejected."""
    path = tmp_path / 'evil.pth'
    torch.save({'obj': ToyDataset()}, path)
    with pytest.raises(Exception, match='weights_only|Unsupported global'):
        torch.load(path)


def test_getattr_is_restricted_to_history_buffer_methods(tmp_path):
    """mmengine pickles HistoryBuffer's statistics methods through getattr;
    any other getattr in a file is refused."""

    class Reducer:
        def __reduce__(self):
            return getattr, (torch.nn.Module, '__init__')

    path = tmp_path / 'getattr.pth'
    torch.save({'x': Reducer()}, path)
    with pytest.raises(Exception, match='not allowed|Unsupported global'):
        torch.load(path)
