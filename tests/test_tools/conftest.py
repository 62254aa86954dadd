"""Shared pieces of the tool tests: tiny smoke overrides and one shared
distributed training run (2 CPU processes) whose work dir the other tests use."""

import os
import os.path as osp
import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List

import pytest

from ..conftest import REPO_ROOT

CONFIG = osp.join('configs', 'deformable_detr', 'two_stage_shapes.py')
SIZE = 96  # tiny images (two-stage needs >= 100 tokens over the 4 levels: 12^2+6^2+3^2+2^2)
SPLIT_SIZES = dict(train=16, val=8, test=8)


def smoke_options(data_root: str) -> List[str]:
    """The README's smoke overrides plus a tiny dataset under ``data_root``."""
    opts = [
        'train_dataloader.dataset.indices=16',
        'val_dataloader.dataset.indices=8',
        'test_dataloader.dataset.indices=8',
        'train_cfg.max_epochs=1',
        'default_hooks.logger.interval=1',
    ]
    for split, num in SPLIT_SIZES.items():
        key = f'{split}_dataloader.dataset'
        resize = 2 if split == 'train' else 1  # index of Resize in the pipeline
        opts += [
            f'{key}.data_root={data_root}',
            f'{key}.generate.num_images={num}',
            f'{key}.generate.img_size={SIZE}',
            f'{key}.generate.min_size=6.0',
            f'{key}.generate.max_size=60.0',
            f'{key}.pipeline.{resize}.scale=({SIZE},{SIZE})',
        ]
    return opts


def tool_env() -> Dict[str, str]:
    """Environment of tool subprocesses: this checkout first, one thread each."""
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get('PYTHONPATH')) if p)
    return dict(os.environ, PYTHONPATH=pythonpath, PYTHON=sys.executable, OMP_NUM_THREADS='1')


def run_tool(args: List[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """Run ``args`` from the repo root (``.py`` files with this interpreter)."""
    if args[0].endswith('.py'):
        args = [sys.executable, *args]
    return subprocess.run(
        args,
        cwd=REPO_ROOT,
        env=dict(tool_env(), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def shapes_root(tmp_path_factory) -> str:
    """Where the tiny shapes dataset lives (the first tool run generates it)."""
    return str(tmp_path_factory.mktemp('tools_data') / 'shapes')


@pytest.fixture(scope='session')
def dist_run(tmp_path_factory, shapes_root) -> SimpleNamespace:
    """``tools/dist_train.sh two_stage_shapes.py 2`` with the smoke overrides."""
    work_dir = str(tmp_path_factory.mktemp('dist_train'))
    proc = run_tool(
        [
            'bash',
            'tools/dist_train.sh',
            CONFIG,
            '2',
            '--work-dir',
            work_dir,
            '--cfg-options',
            *smoke_options(shapes_root),
        ],
        PORT=str(free_port()),
    )
    return SimpleNamespace(
        proc=proc,
        work_dir=work_dir,
        data_root=shapes_root,
        log=proc.stdout + proc.stderr,
        checkpoint=osp.join(work_dir, 'epoch_1.pth'),
    )


def load_tool(relpath: str):
    """Import a tool script (e.g. ``tools/train.py``) as a module."""
    import importlib.util

    path = osp.join(REPO_ROOT, relpath)
    name = 'tool_' + osp.splitext(relpath)[0].replace(os.sep, '_').replace('/', '_')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
