"""Save the random number generators' state in checkpoints, restore it on resume."""

import random
from typing import Optional

import numpy as np
import torch
from mmengine.dist import get_world_size
from mmengine.hooks import Hook

from mmdet_deform.registry import HOOKS

RNG_STATE_KEY = 'rng_state'


def get_rng_state() -> dict:
    """The state of Python's, numpy's and torch's global generators.

    Returns:
        dict: ``python`` (``random.getstate()``), ``numpy`` (the legacy
        ``np.random`` state as a dict), ``torch`` (CPU generator, uint8
        tensor) and, where CUDA is initialised, ``cuda`` (one tensor per
        device). Only types that ``torch.load(weights_only=True)`` accepts.
    """
    # the legacy global generator is what mmcv's transforms draw from
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002
    state = dict(
        python=random.getstate(),
        numpy=dict(
            kind=kind,
            keys=torch.from_numpy(keys.astype(np.int64)),
            pos=int(pos),
            has_gauss=int(has_gauss),
            cached_gaussian=float(cached_gaussian),
        ),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a state returned by :func:`get_rng_state`."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state['numpy']
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state['kind'],
            numpy_state['keys'].numpy().astype(np.uint32),
            numpy_state['pos'],
            numpy_state['has_gauss'],
            numpy_state['cached_gaussian'],
        )
    )
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Resume the random streams where the checkpoint left them.

    mmengine's checkpoints hold the seed but not the generators' state, so a
    resumed run reseeds and replays the random stream of the start of
    training (dropout masks, and with ``num_workers=0`` the data
    augmentation). This hook stores the state of Python's, numpy's and
    torch's global generators in every checkpoint (``checkpoint['rng_state']``)
    and, when the run resumes from it (``--resume``, not ``load_from``),
    restores it right before the first training iteration, after mmengine has
    reseeded. With ``num_workers=0`` a resumed run then reproduces the
    uninterrupted one.

    Not restored: the generators inside dataloader worker processes (mmengine
    seeds them from the config's seed when they start), and the states of
    other ranks in a distributed run (a checkpoint holds rank 0's only, so a
    distributed resume reseeds as mmengine does and logs so).
    """

    priority = 'LOWEST'  # before_train: after every other hook

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[RNG_STATE_KEY] = dict(world_size=get_world_size(), **get_rng_state())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from (fine-tuning): the new run keeps its own seed
        state = checkpoint.get(RNG_STATE_KEY)
        if state is None:
            runner.logger.warning(
                'The checkpoint holds no random generator state (not written with '
                'RNGStateHook): resuming with generators reseeded from the seed.'
            )
        elif state.get('world_size', 1) != 1 or get_world_size() != 1:
            runner.logger.info(
                'Distributed run: the random generators are reseeded from the seed, not '
                "restored (a checkpoint holds rank 0's generator state only)."
            )
        else:
            self._pending = state

    def before_train(self, runner) -> None:
        if self._pending is None:
            return
        set_rng_state(self._pending)
        self._pending = None
        runner.logger.info(
            'Restored the random generator state (python, numpy, torch) of the checkpoint'
        )
