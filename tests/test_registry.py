"""Our scope sits beside mmdet's without disturbing it."""

import os.path as osp

import pytest
from mmengine.registry import MODELS as ROOT_MODELS

import mmdet_deform  # noqa: F401
from mmdet_deform.ops import MultiScaleDeformableAttention
from mmdet_deform.registry import DATASETS, HOOKS, MODELS, TRANSFORMS


def test_child_registries_of_mmdet():
    from mmdet.registry import DATASETS as MMDET_DATASETS
    from mmdet.registry import MODELS as MMDET_MODELS

    assert MODELS.scope == 'mmdet_deform'
    assert MODELS.parent is MMDET_MODELS
    assert DATASETS.parent is MMDET_DATASETS
    assert MMDET_MODELS.children['mmdet_deform'] is MODELS
    for registry in (HOOKS, TRANSFORMS):
        assert registry.scope == 'mmdet_deform'


def test_our_names_do_not_replace_mmdet_or_mmcv():
    from mmcv.ops import MultiScaleDeformableAttention as MmcvMSDA
    from mmdet.registry import MODELS as MMDET_MODELS

    assert MODELS.get('MultiScaleDeformableAttention') is MultiScaleDeformableAttention
    # scope-qualified from mmdet's registry (DetInferencer's default scope)
    assert MMDET_MODELS.get('mmdet_deform.MultiScaleDeformableAttention') is (
        MultiScaleDeformableAttention
    )
    # mmcv's entry in mmengine's root registry is untouched
    assert ROOT_MODELS.get('MultiScaleDeformableAttention') is MmcvMSDA


def test_mmdet_components_resolve_from_our_scope():
    from mmdet.models.backbones import ResNet
    from mmdet.models.necks import ChannelMapper

    assert MODELS.get('ResNet') is ResNet
    assert MODELS.get('ChannelMapper') is ChannelMapper
    assert TRANSFORMS.get('PackDetInputs').__module__.startswith('mmdet.')
    assert DATASETS.get('CocoDataset').__module__.startswith('mmdet.')


@pytest.mark.parametrize(
    'name',
    [
        'deformable-detr_r50_16xb2-50e_coco.py',
        'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
    ],
)
def test_mmdet_deformable_detr_still_builds(mmdet_config_dir, name):
    """After ``import mmdet_deform``, mmdet's own config builds mmdet's class
    with mmcv's attention."""
    from mmcv.ops import MultiScaleDeformableAttention as MmcvMSDA
    from mmdet.apis import init_detector
    from mmdet.models.detectors import DeformableDETR as MmdetDeformableDETR
    from mmengine.config import Config

    cfg = Config.fromfile(osp.join(mmdet_config_dir, 'deformable_detr', name))
    cfg.model.backbone.init_cfg = None
    model = init_detector(cfg, None, device='cpu')
    assert type(model) is MmdetDeformableDETR
    attn = model.encoder.layers[0].self_attn
    assert type(attn) is MmcvMSDA


def test_runner_builds_from_our_config_in_a_fresh_process(repo_root, tmp_path):
    """mmdet fills its registries lazily; our children must trigger that, so a
    Runner builds from our config without ``register_all_modules``."""
    import subprocess
    import sys

    script = f"""
from mmengine.config import Config
from mmengine.runner import Runner
cfg = Config.fromfile('configs/deformable_detr/two_stage_shapes.py')
cfg.work_dir = {str(tmp_path)!r}
runner = Runner.from_cfg(cfg)
assert type(runner.visualizer).__name__ == 'DetLocalVisualizer'
assert type(runner.model).__module__.startswith('mmdet_deform.'), type(runner.model)
print('OK')
"""
    proc = subprocess.run(
        [sys.executable, '-c', script], cwd=repo_root, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'OK' in proc.stdout
