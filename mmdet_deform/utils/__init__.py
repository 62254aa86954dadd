"""Helpers of the command line tools (``tools/train.py``, ``tools/test.py``...)."""

from .launch import (
    build_runner,
    enable_amp,
    enable_auto_scale_lr,
    init_cpu_distributed,
    load_config,
    set_resume,
)

__all__ = [
    'build_runner',
    'enable_amp',
    'enable_auto_scale_lr',
    'init_cpu_distributed',
    'load_config',
    'set_resume',
]
