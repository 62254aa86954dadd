"""Every shipped config parses with mmengine's Config."""

import glob
import os.path as osp

import pytest
from mmengine.config import Config

from .conftest import CONFIG_DIR

CONFIGS = sorted(
    p
    for p in glob.glob(osp.join(CONFIG_DIR, '**', '*.py'), recursive=True)
    if '_base_' not in p.split(osp.sep)
)


def test_configs_exist():
    assert CONFIGS, f'no configs found under {CONFIG_DIR}'


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: osp.relpath(p, CONFIG_DIR))
def test_config_parses(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmdet_deform'
    assert 'mmdet_deform' in cfg.custom_imports['imports']
    assert 'model' in cfg
