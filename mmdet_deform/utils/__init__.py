"""Helpers of the command line tools (``tools/train.py``, ``tools/test.py``...)."""

from .launch import (
    WORK_DIR_LOCK,
    WorkDirBusyError,
    WorkDirLock,
    build_runner,
    check_work_dir,
    enable_amp,
    enable_auto_scale_lr,
    init_cpu_distributed,
    load_config,
    lock_work_dir,
    set_resume,
)

__all__ = [
    'WORK_DIR_LOCK',
    'WorkDirBusyError',
    'WorkDirLock',
    'build_runner',
    'check_work_dir',
    'enable_amp',
    'enable_auto_scale_lr',
    'init_cpu_distributed',
    'load_config',
    'lock_work_dir',
    'set_resume',
]
