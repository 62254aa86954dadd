"""Hooks of mmdet_deform, registered in the ``mmdet_deform`` scope."""

from .atomic_checkpoint_hook import AtomicCheckpointHook
from .nonfinite_check_hook import NonFiniteCheckHook, NonFiniteLossError
from .rng_state_hook import RNGStateHook, get_rng_state, set_rng_state

__all__ = [
    'AtomicCheckpointHook',
    'NonFiniteCheckHook',
    'NonFiniteLossError',
    'RNGStateHook',
    'get_rng_state',
    'set_rng_state',
]
