"""Training-loop support: safe checkpoint loading and saving, hooks, the runner, bf16 autocast."""

from . import hooks  # noqa: F401  (registers hooks)
from .checkpoint import (
    CheckpointError,
    check_checkpoint_file,
    checkpoint_header_problem,
    find_latest_checkpoint,
    load_checkpoint_file,
)
from .fileio import AtomicLocalBackend, atomic_write_bytes
from .hooks import (
    AtomicCheckpointHook,
    NonFiniteCheckHook,
    NonFiniteLossError,
    PlainCheckpointHook,
    RNGStateHook,
)
from .optim_wrappers import AutocastOptimWrapper
from .runner import SafeRunner

__all__ = [
    'AtomicCheckpointHook',
    'AtomicLocalBackend',
    'AutocastOptimWrapper',
    'CheckpointError',
    'NonFiniteCheckHook',
    'NonFiniteLossError',
    'PlainCheckpointHook',
    'RNGStateHook',
    'SafeRunner',
    'atomic_write_bytes',
    'check_checkpoint_file',
    'checkpoint_header_problem',
    'find_latest_checkpoint',
    'load_checkpoint_file',
]
