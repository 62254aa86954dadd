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


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: osp.relpath(p, CONFIG_DIR))
def test_duplicate_suppression_only_in_the_shapes_configs(path):
    """test_cfg.nms is off in the COCO configs (mmdet's outputs) and on in
    the shapes configs of our detectors (docs/convergence.md)."""
    cfg = Config.fromfile(path)
    nms = cfg.model.get('test_cfg', {}).get('nms')
    if path.endswith('_shapes.py') and osp.basename(path) != 'detr_shapes.py':  # mmdet's DETR
        assert nms == dict(iou_threshold=0.6)
    else:
        assert nms is None


def assert_same_training_recipe(cfg: Config, base: Config) -> None:
    """Same data, optimizer, lr schedule and training loop as ``base``."""
    for key in ('train_dataloader', 'val_dataloader', 'optim_wrapper', 'param_scheduler'):
        assert cfg[key] == base[key], key
    assert cfg.train_cfg == base.train_cfg


def test_detr_baseline_mirrors_the_deformable_shapes_recipe():
    """configs/detr/detr_shapes.py builds mmdet's DETR with what applies of the
    deformable shapes recipe, and it trains (finite losses, gradients flow)."""
    import torch
    from mmdet.models import DETR
    from mmengine.registry import init_default_scope

    from mmdet_deform.registry import MODELS

    from .test_models.parity_utils import make_batch

    init_default_scope('mmdet_deform')
    detr = Config.fromfile(osp.join(CONFIG_DIR, 'detr', 'detr_shapes.py'))
    ours = Config.fromfile(osp.join(CONFIG_DIR, 'deformable_detr', 'two_stage_shapes.py'))
    assert_same_training_recipe(detr, ours)
    assert detr.model.num_queries == ours.model.num_queries
    assert detr.model.encoder.num_layers == ours.model.encoder.num_layers
    assert detr.model.decoder.num_layers == ours.model.decoder.num_layers
    for key in ('depth', 'base_channels', 'norm_cfg', 'init_cfg'):
        assert detr.model.backbone[key] == ours.model.backbone[key], key

    torch.manual_seed(0)
    model = MODELS.build(detr.model)
    assert type(model) is DETR
    model.init_weights()
    inputs, samples = make_batch(detr.model.bbox_head.num_classes, dtype=torch.float32)
    losses = model.loss(inputs, samples)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_dino_shapes_is_the_shapes_recipe_with_the_three_switches():
    """configs/dino/dino_shapes.py changes only the detector of the shapes
    recipe: DINO with mixed query selection, look forward twice and
    denoising, which train (denoising losses, finite, gradients flow)."""
    import torch
    from mmengine.registry import init_default_scope

    from mmdet_deform.models import DINO
    from mmdet_deform.registry import MODELS

    from .test_models.parity_utils import make_batch

    init_default_scope('mmdet_deform')
    dino = Config.fromfile(osp.join(CONFIG_DIR, 'dino', 'dino_shapes.py'))
    base = Config.fromfile(osp.join(CONFIG_DIR, 'deformable_detr', 'two_stage_shapes.py'))
    assert_same_training_recipe(dino, base)
    for key in ('backbone', 'neck', 'encoder', 'num_queries', 'positional_encoding'):
        assert dino.model[key] == base.model[key], key

    torch.manual_seed(0)
    model = MODELS.build(dino.model)
    assert type(model) is DINO
    assert model.as_two_stage and model.with_box_refine
    assert model.decoder.look_forward_twice
    model.init_weights()
    inputs, samples = make_batch(dino.model.bbox_head.num_classes, dtype=torch.float32)
    losses = model.loss(inputs, samples)
    for key in ('loss_cls', 'enc_loss_cls', 'dn_loss_cls', 'dn_loss_bbox', 'd0.dn_loss_iou'):
        assert key in losses, sorted(losses)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    assert model.query_embedding.weight.grad.abs().sum() > 0
    assert model.dn_query_generator.label_embedding.weight.grad.abs().sum() > 0
