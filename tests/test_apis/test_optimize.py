"""optimize_for_inference: an explicit copy with BatchNorms folded, which
behaves as a PyTorch model (hooks, .to(), state dicts, train())."""

import copy

import pytest
import torch
from mmcv.cnn import ConvWS2d
from mmengine.registry import init_default_scope
from torch import nn

from mmdet_deform.apis import FoldedConv2d, optimize_for_inference
from mmdet_deform.apis.optimize import conv_bn_pairs

from ..test_models.parity_utils import make_batch
from ..test_models.test_deformable_detr import build_small


@pytest.fixture(autouse=True)
def default_scope():
    init_default_scope('mmdet_deform')


@pytest.fixture(scope='module')
def model():
    init_default_scope('mmdet_deform')
    model = build_small('two_stage')
    with torch.no_grad():  # BatchNorms with non-trivial statistics and affine maps
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _predict(model, inputs, samples):
    with torch.no_grad():
        return model.predict(inputs, [s.clone() for s in samples])


def _num_batchnorms(module):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def test_same_predictions_and_the_original_untouched(model):
    before = copy.deepcopy(model.state_dict())
    optimized = optimize_for_inference(model)
    assert optimized is not model
    assert _num_batchnorms(model.backbone) > 0  # the original keeps its BatchNorms
    assert _num_batchnorms(optimized.backbone) == 0
    assert any(isinstance(m, FoldedConv2d) for m in optimized.backbone.modules())
    assert not any(p.requires_grad for p in optimized.parameters())
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], before[k]) for k in before)
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    expected = _predict(model, inputs, samples)
    results = _predict(optimized, inputs, samples)
    for a, b in zip(results, expected):
        assert torch.allclose(a.pred_instances.scores, b.pred_instances.scores, atol=1e-4)
        assert torch.allclose(a.pred_instances.bboxes, b.pred_instances.bboxes, atol=1e-2)
        assert torch.equal(a.pred_instances.labels, b.pred_instances.labels)


def test_hooks_fire_on_the_optimized_model(model):
    optimized = optimize_for_inference(model)
    seen = []
    optimized.backbone.register_forward_hook(lambda m, a, out: seen.append('backbone'))
    optimized.encoder.layers[0].self_attn.register_forward_hook(
        lambda m, a, out: seen.append('attention')
    )
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    _predict(optimized, inputs, samples)
    assert seen == ['backbone', 'attention']


def test_to_moves_and_converts_everything(model):
    optimized = optimize_for_inference(model).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in optimized.parameters())
    folded = [m for m in optimized.modules() if isinstance(m, FoldedConv2d)]
    assert folded and all(m.weight.dtype == torch.float64 for m in folded)
    inputs, samples = make_batch(num_classes=10, dtype=torch.float64)
    results = _predict(optimized, inputs, samples)
    assert results[0].pred_instances.bboxes.dtype == torch.float64


def test_state_dicts_and_train(model):
    optimized = optimize_for_inference(model)
    assert not any('bn' in k or '.norm' in k for k in optimized.backbone.state_dict())
    other = optimize_for_inference(build_small('two_stage', seed=1))
    other.load_state_dict(optimized.state_dict(), strict=True)
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    a = _predict(other, inputs, samples)[0].pred_instances.scores
    b = _predict(optimized, inputs, samples)[0].pred_instances.scores
    assert torch.equal(a, b)
    # a training checkpoint has BatchNorm entries: load it into the original
    with pytest.raises(RuntimeError, match='Unexpected key'):
        optimized.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match='optimize_for_inference'):
        optimized.train()
    optimized.eval()  # still fine


def test_only_plain_convolutions_with_eval_batchnorms_fold():
    ws = nn.Sequential(ConvWS2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert list(conv_bn_pairs(ws)) == []
    training = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert list(conv_bn_pairs(training)) == []
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert [(c, b) for _, c, b in conv_bn_pairs(plain)] == [('0', '1')]
    with torch.no_grad():
        plain[1].running_mean.uniform_(-1, 1)
        plain[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folded = optimize_for_inference(plain)
    assert isinstance(folded[0], FoldedConv2d) and isinstance(folded[1], nn.Identity)
    assert torch.allclose(folded(x), plain(x), atol=1e-5)
    folded_ws = optimize_for_inference(ws)
    assert type(folded_ws[0]) is ConvWS2d and isinstance(folded_ws[1], nn.BatchNorm2d)


def test_channels_last_layout_is_kept(model):
    optimized = optimize_for_inference(model)
    conv = optimized.backbone.conv1
    assert isinstance(conv, FoldedConv2d)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
