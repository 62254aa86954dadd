"""Hooks of mmdet_deform, registered in the ``mmdet_deform`` scope."""

from .atomic_checkpoint_hook import AtomicCheckpointHook
from .nonfinite_check_hook import NonFiniteCheckHook, NonFiniteLossError
from .plain_checkpoint_hook import PlainCheckpointHook, history_buffer_to_plain, to_plain
from .rng_state_hook import RNGStateHook, get_rng_state, set_rng_state

__all__ = [
    'AtomicCheckpointHook',
    'NonFiniteCheckHook',
    'NonFiniteLossError',
    'PlainCheckpointHook',
    'RNGStateHook',
    'get_rng_state',
    'history_buffer_to_plain',
    'set_rng_state',
    'to_plain',
]
