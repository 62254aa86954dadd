"""A toy model and dataset for runner and checkpoint tests (seconds, no data).

Registered in mmengine's root registries, which the ``mmdet_deform`` scope
reaches through its parents, so configs name them ``SafetyToyModel`` /
``SafetyToyDataset``. :func:`toy_config` writes a config file for
``tools/train.py``.
"""

import os.path as osp
from typing import Optional

import torch
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from torch.utils.data import Dataset


@MODELS.register_module(force=True)
class SafetyToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, targets=None, mode='tensor'):
        out = self.linear(torch.stack(inputs))
        if mode == 'loss':
            return {'loss': ((out - torch.stack(targets)) ** 2).mean()}
        return out


@DATASETS.register_module(force=True)
class SafetyToyDataset(Dataset):
    metainfo = dict(classes=('thing',))

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        x = torch.rand(2, generator=g)
        return {'inputs': x, 'targets': x.sum(0, keepdim=True)}


def toy_cfg_dict(max_epochs: int = 1, max_keep_ckpts: int = -1) -> dict:
    """The settings of a toy run (the work dir and resume come from the caller)."""
    return dict(
        default_scope='mmdet_deform',
        model=dict(type='SafetyToyModel'),
        train_dataloader=dict(
            dataset=dict(type='SafetyToyDataset'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=4,
            num_workers=0,
        ),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(
            checkpoint=dict(
                type='mmdet_deform.AtomicCheckpointHook',
                interval=1,
                max_keep_ckpts=max_keep_ckpts,
                backend_args=dict(backend='atomic_local'),
            ),
            logger=dict(type='LoggerHook', interval=1),
        ),
        log_processor=dict(window_size=2),
    )


def toy_config(folder: str, max_epochs: int = 1, max_keep_ckpts: int = -1,
               name: Optional[str] = None) -> str:  # fmt: skip
    """Write a config file of a toy run into ``folder``; returns its path."""
    path = osp.join(folder, name or f'toy_{max_epochs}.py')
    lines = [
        "custom_imports = dict(imports=['mmdet_deform', 'tests.test_engine.toy'], "
        'allow_failed_imports=False)'
    ]
    lines += [f'{k} = {v!r}' for k, v in toy_cfg_dict(max_epochs, max_keep_ckpts).items()]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path
