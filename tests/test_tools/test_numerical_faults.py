"""Numerical faults on the real shapes config (tiny): NaN batches are skipped
and logged with their image ids, a streak stops the run with a clear error and
leaves the last good checkpoint intact; ``--amp`` (bf16 autocast on the CPU)
trains without NaN."""

import argparse
import logging
import os.path as osp

import pytest
import torch
from mmengine.config import DictAction
from mmengine.hooks import Hook

from mmdet_deform.engine import NonFiniteLossError, find_latest_checkpoint
from mmdet_deform.utils import build_runner, enable_amp, load_config

from ..conftest import REPO_ROOT
from .conftest import CONFIG, train_only_options

pytestmark = pytest.mark.slow


def _runner(work_dir: str, name: str, options, amp: bool = False):
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg_options = parser.parse_args(['--cfg-options', *options]).cfg_options
    cfg = load_config(osp.join(REPO_ROOT, CONFIG), cfg_options, work_dir)
    if amp:
        enable_amp(cfg)
    cfg.experiment_name = name
    return build_runner(cfg)


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


class PoisonBatches(Hook):
    """Turns the preprocessed images of chosen iterations into NaN (a corrupt
    batch) and records, per iteration, the batch's image ids and whether the
    weights changed."""

    priority = 'HIGHEST'  # after_train_iter before NonFiniteCheckHook raises

    def __init__(self, iters) -> None:
        self.iters = set(iters)
        self.now = False
        self.image_ids, self.changed, self.weights = {}, {}, {}

    def before_train(self, runner) -> None:
        runner.model.data_preprocessor.register_forward_hook(self._poison)

    def _poison(self, module, args, out):
        if self.now:
            out['inputs'] = out['inputs'] * float('nan')
        return out

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        it = runner.iter + 1
        self.now = it in self.iters
        self.image_ids[it] = [s.img_id for s in data_batch['data_samples']]
        self._before = _flat_params(runner.model)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        it = runner.iter + 1
        self.weights[it] = _flat_params(runner.model)
        self.changed[it] = not torch.equal(self.weights[it], self._before)


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def test_nan_batches_are_skipped_then_a_streak_stops_the_run(tmp_path, shapes_root):
    work_dir = str(tmp_path / 'work')
    options = train_only_options(shapes_root, max_epochs=2) + ['custom_hooks.0.max_consecutive=3']
    runner = _runner(work_dir, 'nan_batches', options)
    poison = PoisonBatches(iters={2, 6, 7, 8, 9})
    runner.register_hook(poison)
    warnings = Warnings()
    runner.logger.addHandler(warnings)
    try:
        with pytest.raises(NonFiniteLossError) as info:
            runner.train()
    finally:
        runner.logger.removeHandler(warnings)

    # iteration 2 is skipped and training goes on; 6, 7, 8 in a row stop it
    assert poison.changed == {1: True, 2: False, 3: True, 4: True, 5: True, 6: False, 7: False,
                              8: False}  # fmt: skip
    message = str(info.value)
    assert '3 consecutive training steps' in message and 'iteration 8' in message
    assert osp.join(work_dir, 'epoch_1.pth') in message  # where to go back to
    skipped = [m for m in warnings.messages if 'Non-finite training step' in m]
    assert len(skipped) == 4
    for text, it in zip(skipped, (2, 6, 7, 8)):
        assert f'at iteration {it} ' in text and 'loss is nan' in text
        assert f'Images: {poison.image_ids[it]}' in text  # the batch's image ids
        assert 'loss_cls=nan' in text  # the loss terms

    # the last good checkpoint is intact, loadable, and holds the weights of iteration 4
    assert find_latest_checkpoint(work_dir) == osp.join(work_dir, 'epoch_1.pth')
    assert not osp.exists(osp.join(work_dir, 'epoch_2.pth'))
    ckpt = torch.load(osp.join(work_dir, 'epoch_1.pth'), map_location='cpu')
    state = ckpt['state_dict']
    saved = torch.cat([state[name].flatten() for name, _ in runner.model.named_parameters()])
    assert torch.equal(saved, poison.weights[4])
    assert torch.isfinite(saved).all() and torch.isfinite(poison.weights[8]).all()
    runner.model.load_state_dict(state)  # loads into the model as is


def test_amp_bf16_autocast_trains_without_nan(tmp_path, shapes_root):
    if torch.cuda.is_available():
        pytest.skip('with CUDA --amp is fp16 with loss scaling (AmpOptimWrapper)')
    # 2 iterations: bf16 convolutions are slow on a CPU
    options = train_only_options(shapes_root, max_epochs=1) + ['train_dataloader.dataset.indices=8']
    runner = _runner(str(tmp_path / 'work'), 'amp_bf16', options, amp=True)
    dtypes = []
    model = runner.model
    model.bbox_head.cls_branches[0].register_forward_hook(
        lambda module, args, out: dtypes.append(out.dtype)
    )
    before = _flat_params(model)
    runner.train()
    assert type(runner.optim_wrapper).__name__ == 'AutocastOptimWrapper'
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the forward ran in bf16
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert runner.message_hub.get_info('nonfinite_skipped_steps', 0) == 0
    after = _flat_params(model)
    assert after.dtype == torch.float32 and torch.isfinite(after).all()
    assert not torch.equal(after, before)
