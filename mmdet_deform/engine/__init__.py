"""Training-loop support: checkpoint loading on torch >= 2.6, hooks."""

from . import hooks  # noqa: F401  (registers hooks)
from .checkpoint import allow_mmengine_checkpoint_globals

__all__ = ['allow_mmengine_checkpoint_globals']
