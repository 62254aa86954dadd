"""SafeRunner (what the tools build): resuming never executes the config text
in a checkpoint, its checkpoints hold plain data, and mmengine 0.10
checkpoints with numpy objects still resume."""

import itertools
import os.path as osp
import pickle

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner

from mmdet_deform.engine import CheckpointError, SafeRunner, load_checkpoint_file
from mmdet_deform.engine.hooks import to_plain
from mmdet_deform.utils import build_runner

from .toy import toy_cfg_dict

_names = itertools.count()


def _cfg(work_dir, max_epochs=1, **kwargs) -> Config:
    cfg = dict(toy_cfg_dict(max_epochs), work_dir=str(work_dir), **kwargs)
    cfg['experiment_name'] = f'safe_runner_{next(_names)}'  # one message hub per runner
    return Config(cfg)


def _train(work_dir, max_epochs=1, runner_type=SafeRunner, **kwargs):
    runner = runner_type.from_cfg(_cfg(work_dir, max_epochs, **kwargs))
    runner.train()
    return runner


def _with_config_payload(src: str, dst: str, pwned: str, plain: bool) -> str:
    """``src`` with ``meta['config']`` set to Python that creates ``pwned``
    (what mmengine's ``Runner.resume`` hands to ``Config.fromstring``)."""
    ckpt = load_checkpoint_file(src)
    ckpt['meta']['config'] = f"x = open({pwned!r}, 'w').close()\ngpu_ids = [0]\n"
    if plain:  # loadable by mmengine's own loader too
        ckpt['message_hub'] = to_plain(ckpt['message_hub'])
    torch.save(ckpt, dst)
    return dst


def test_the_payload_runs_under_mmengines_runner(tmp_path):
    """The attack is real: mmengine 0.10's Runner.resume executes meta['config']."""
    _train(tmp_path / 'a')
    pwned = str(tmp_path / 'pwned')
    evil = _with_config_payload(str(tmp_path / 'a' / 'epoch_1.pth'), str(tmp_path / 'evil.pth'),
                                pwned, plain=True)  # fmt: skip
    runner = Runner.from_cfg(_cfg(tmp_path / 'b', 2, resume=True, load_from=evil))
    runner.load_or_resume()
    assert osp.exists(pwned)


@pytest.mark.parametrize('plain', [True, False], ids=['plain-hub', 'numpy-hub'])
def test_resume_never_executes_the_config_in_a_checkpoint(tmp_path, plain):
    _train(tmp_path / 'a')
    pwned = str(tmp_path / 'pwned')
    evil = _with_config_payload(
        str(tmp_path / 'a' / 'epoch_1.pth'), str(tmp_path / 'evil.pth'), pwned, plain
    )
    runner = build_runner(_cfg(tmp_path / 'b', 2, resume=True, load_from=evil))
    assert isinstance(runner, SafeRunner)
    runner.train()
    assert not osp.exists(pwned)
    assert (runner.epoch, runner.iter) == (2, 4)  # resumed at epoch 1, trained epoch 2


def test_checkpoints_hold_plain_data_and_resume_the_message_hub(tmp_path):
    runner = _train(tmp_path / 'a', 1)
    saved_loss = runner.message_hub.log_scalars['train/loss'].data[0].copy()
    path = str(tmp_path / 'a' / 'epoch_1.pth')
    bare = torch.load(path)  # weights_only, no allow-list: plain data only
    plain = bare['message_hub']['log_scalars']['train/loss']
    assert isinstance(plain, dict) and torch.equal(
        plain['log_history'], torch.from_numpy(saved_loss)
    )

    resumed = build_runner(_cfg(tmp_path / 'a', 2, resume=True, load_from=path))
    resumed.load_or_resume()
    buffer = resumed.message_hub.log_scalars['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    np.testing.assert_array_equal(buffer.data[0], saved_loss)
    resumed.train()
    assert resumed.iter == 4


def test_resume_from_an_mmengine_checkpoint_with_numpy_objects(tmp_path):
    # mmengine's own Runner writes HistoryBuffers (numpy inside): no PlainCheckpointHook
    runner = _train(tmp_path / 'a', 1, runner_type=Runner)
    saved_loss = runner.message_hub.log_scalars['train/loss'].data[0].copy()
    path = str(tmp_path / 'a' / 'epoch_1.pth')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    resumed = build_runner(_cfg(tmp_path / 'a', 2, resume=True, load_from=path))
    resumed.train()
    assert (resumed.epoch, resumed.iter) == (2, 4)
    loss = resumed.message_hub.log_scalars['train/loss'].data[0]
    np.testing.assert_array_equal(loss[: len(saved_loss)], saved_loss)


def test_resume_from_a_weights_file_says_so(tmp_path):
    runner = _train(tmp_path / 'a', 1)
    weights = str(tmp_path / 'weights.pth')
    torch.save({'state_dict': runner.model.state_dict()}, weights)
    resumed = build_runner(_cfg(tmp_path / 'b', 2, resume=True, load_from=weights))
    with pytest.raises(CheckpointError, match='holds no training state.*load_from'):
        resumed.load_or_resume()
    fine_tuned = build_runner(_cfg(tmp_path / 'c', 1, load_from=weights))
    fine_tuned.load_or_resume()  # as load_from it is fine
    assert torch.equal(fine_tuned.model.linear.weight, runner.model.linear.weight)


def test_load_from_an_empty_file_names_it(tmp_path):
    empty = tmp_path / 'empty.pth'
    empty.touch()
    runner = build_runner(_cfg(tmp_path / 'b', 1, load_from=str(empty)))
    with pytest.raises(CheckpointError, match=rf"'{empty}' is empty"):
        runner.load_or_resume()


def test_resume_true_without_load_from_takes_the_latest_complete_checkpoint(tmp_path):
    _train(tmp_path / 'a', 2)
    # a truncated newer checkpoint and a pointer to it, as a kill could leave
    whole = (tmp_path / 'a' / 'epoch_2.pth').read_bytes()
    (tmp_path / 'a' / 'epoch_3.pth').write_bytes(whole[: len(whole) // 2])
    (tmp_path / 'a' / 'last_checkpoint').write_text(str(tmp_path / 'a' / 'epoch_3.pth'))
    resumed = build_runner(_cfg(tmp_path / 'a', 3, resume=True))
    resumed.load_or_resume()
    assert resumed.iter == 4  # from epoch_2.pth
