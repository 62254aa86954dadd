"""DINO's switches on the small model: denoising off gives no denoising
losses and the same matching losses and predictions (the mask keeps the
matching queries blind to the denoising ones), look forward twice changes
gradients only, unsupported combinations raise, empty ground truth."""

import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdet_deform.models import DINO
from mmdet_deform.registry import MODELS

from .parity_utils import REPO_ROOT, SMALL, make_batch

CONFIG = osp.join(REPO_ROOT, 'configs', 'dino', 'dino_4scale_r50.py')
DINO_SMALL = {**SMALL, 'model.num_queries': 30, 'model.dn_cfg.group_cfg.num_dn_queries': 12}


@pytest.fixture(autouse=True)
def default_scope():
    init_default_scope('mmdet_deform')


def small_cfg(**options) -> Config:
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict({**DINO_SMALL, **options})
    return cfg.model


def build(seed: int = 0, **options) -> DINO:
    torch.manual_seed(seed)
    model = MODELS.build(small_cfg(**options))
    model.init_weights()
    return model


def test_denoising_off_keeps_matching_losses_and_predictions():
    """The same weights without dn_cfg: no denoising losses, and the
    matching and encoder losses equal those with denoising (the denoising
    queries are invisible to the matching ones); predictions are equal."""
    with_dn = build()
    without_dn = build(**{'model.dn_cfg': None})
    assert not hasattr(without_dn, 'dn_query_generator')
    state = with_dn.state_dict()
    assert set(state) - set(without_dn.state_dict()) == {
        'dn_query_generator.label_embedding.weight'
    }
    without_dn.load_state_dict(state, strict=False)
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    with_dn.train()
    without_dn.train()
    losses = with_dn.loss(inputs, [s.clone() for s in samples])
    plain = without_dn.loss(inputs, [s.clone() for s in samples])
    assert not any('dn_' in name for name in plain)
    dn_names = [name for name in losses if 'dn_' in name]
    assert len(dn_names) == 6  # cls, bbox, iou of the last layer and of d0
    assert set(losses) - set(dn_names) == set(plain)
    for name, value in plain.items():
        assert torch.allclose(losses[name], value, atol=1e-5), name
    for name in dn_names:
        assert torch.isfinite(losses[name]) and losses[name].item() > 0, name
    with_dn.eval()
    without_dn.eval()
    with torch.no_grad():
        result = with_dn.predict(inputs, [s.clone() for s in samples])
        expected = without_dn.predict(inputs, [s.clone() for s in samples])
    for a, b in zip(result, expected):
        assert torch.equal(a.pred_instances.scores, b.pred_instances.scores)
        assert torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)


def test_look_forward_twice_changes_gradients_not_losses():
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    grads, all_losses = [], []
    for flag in (True, False):
        model = build(**{'model.look_forward_twice': flag, 'model.dn_cfg': None})
        assert model.decoder.look_forward_twice is flag
        model.train()
        losses = model.loss(inputs, [s.clone() for s in samples])
        all_losses.append(losses)
        # the last layer's box losses reach layer 0's branch only by looking forward
        (losses['loss_bbox'] + losses['loss_iou']).backward()
        grad = model.bbox_head.reg_branches[0][-1].weight.grad
        grads.append(None if grad is None else grad.clone())
    for name, value in all_losses[0].items():
        assert torch.allclose(value, all_losses[1][name], atol=1e-6), name
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None or grads[1].abs().sum() == 0


def test_without_box_refinement_the_branches_are_shared():
    model = build(**{'model.with_box_refine': False, 'model.look_forward_twice': False})
    head = model.bbox_head
    assert head.reg_branches[0] is head.reg_branches[-1]
    model.train()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    losses = model.loss(inputs, samples)
    assert all(torch.isfinite(value) for value in losses.values())
    assert 'dn_loss_bbox' in losses


def test_empty_ground_truth():
    """No objects: no denoising queries, classification still trained,
    every box loss exactly zero, finite gradients."""
    model = build()
    model.train()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32, num_gts=(0, 0))
    losses = model.loss(inputs, samples)
    for name, value in losses.items():
        if name.endswith('loss_cls') and 'dn_' not in name:
            assert value.item() > 0, name
        elif not name.endswith('loss_cls'):
            assert value.item() == 0, name
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize(
    'options, names',
    [
        (
            {'model.with_box_refine': False, 'model.look_forward_twice': True},
            ('look_forward_twice', 'with_box_refine'),
        ),
        ({'model.as_two_stage': False}, ('as_two_stage',)),
        ({'model.dn_cfg.num_classes': 3}, ('dn_cfg.num_classes',)),
        ({'model.decoder.look_forward_twice': False}, ('decoder.look_forward_twice',)),
        ({'model.dn_cfg.group_cfg.num_dn_queries': 0}, ('dn_cfg.group_cfg.num_dn_queries',)),
    ],
)
def test_unsupported_combination_raises_naming_the_keys(options, names):
    with pytest.raises(ValueError) as error:
        MODELS.build(small_cfg(**options))
    for name in names:
        assert name in str(error.value), (name, str(error.value))


def test_switches_from_cfg_options():
    """The switches are plain config keys, as --cfg-options sets them."""
    from mmdet.apis import init_detector

    options = {**DINO_SMALL, 'model.dn_cfg': None, 'model.look_forward_twice': False}
    model = init_detector(CONFIG, None, device='cpu', cfg_options=options)
    assert type(model) is DINO
    assert not model.with_denoising and not model.decoder.look_forward_twice
