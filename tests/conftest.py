"""Shared pytest fixtures."""

import os
import os.path as osp

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIR = osp.join(REPO_ROOT, 'configs')


@pytest.fixture(scope='session')
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope='session')
def mmdet_config_dir() -> str:
    """mmdet's packaged configs (``mmdet/.mim/configs``), the parity oracle."""
    import mmdet

    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
    assert osp.isdir(path), f'mmdet packaged configs not found at {path}'
    return path


def pytest_configure(config):
    # Tests are sized for 2 cores; keep torch from oversubscribing them.
    os.environ.setdefault('OMP_NUM_THREADS', '2')
