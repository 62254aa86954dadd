"""Training-loop support: checkpoint loading on torch >= 2.6, hooks, bf16 autocast."""

from . import hooks  # noqa: F401  (registers hooks)
from .checkpoint import allow_mmengine_checkpoint_globals
from .optim_wrappers import AutocastOptimWrapper

__all__ = ['AutocastOptimWrapper', 'allow_mmengine_checkpoint_globals']
