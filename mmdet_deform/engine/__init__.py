"""Training-loop support: checkpoint loading and saving, hooks, bf16 autocast."""

from . import hooks  # noqa: F401  (registers hooks)
from .checkpoint import allow_mmengine_checkpoint_globals, find_latest_checkpoint
from .fileio import AtomicLocalBackend, atomic_write_bytes
from .hooks import NonFiniteCheckHook, NonFiniteLossError
from .optim_wrappers import AutocastOptimWrapper

__all__ = [
    'AtomicLocalBackend',
    'AutocastOptimWrapper',
    'NonFiniteCheckHook',
    'NonFiniteLossError',
    'allow_mmengine_checkpoint_globals',
    'atomic_write_bytes',
    'find_latest_checkpoint',
]
