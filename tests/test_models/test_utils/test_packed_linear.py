"""``linear``: a prepacked oneDNN weight in CPU float32 inference, the
module's own call everywhere else, and a cache that follows the weight."""

import pytest
import torch
from torch import nn

from mmdet_deform.models.utils import linear, packed_linear

needs_onednn = pytest.mark.skipif(
    not packed_linear._available, reason='this torch build has no oneDNN linear'
)


def make_linear(in_features=64, out_features=96, bias=True):
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


@needs_onednn
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('shape', [(300, 64), (2, 50, 64), (1, 64), (0, 64)])
def test_inference_matches_the_module(shape, bias):
    module = make_linear(bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        out = linear(x, module)
        expected = module(x)
    assert module in packed_linear._packed  # the packed path ran
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_training_float64_and_hooks_call_the_module():
    module = make_linear()
    x = torch.randn(10, 64, requires_grad=True)
    out = linear(x, module)  # gradients enabled
    assert torch.equal(out, module(x))
    out.sum().backward()
    assert module.weight.grad is not None and x.grad is not None
    assert module not in packed_linear._packed
    double = make_linear().double()
    with torch.no_grad():
        assert torch.equal(linear(x.detach().double(), double), double(x.detach().double()))
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        linear(x.detach(), module)
    assert calls == [1]
    assert module not in packed_linear._packed


@needs_onednn
def test_packed_weight_follows_the_weight():
    module = make_linear()
    x = torch.randn(20, 64)
    with torch.no_grad():
        linear(x, module)
        module.weight.mul_(3)  # versioned
        torch.testing.assert_close(linear(x, module), module(x), rtol=1e-5, atol=1e-5)
        module.weight.data.add_(1)  # unversioned (.data)
        torch.testing.assert_close(linear(x, module), module(x), rtol=1e-5, atol=1e-5)
        module.weight = nn.Parameter(torch.randn(96, 64))  # replaced
        torch.testing.assert_close(linear(x, module), module(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_detector_inference_uses_it_and_agrees():
    """A float32 detector predicts the same with the packed path (no_grad)
    as with gradients enabled (every Linear through nn.Linear)."""
    from mmengine.registry import init_default_scope

    from ..parity_utils import make_batch
    from ..test_deformable_detr import build_small

    init_default_scope('mmdet_deform')
    model = build_small('two_stage')
    model.eval()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    ref = model.predict(inputs, [s.clone() for s in samples])
    with torch.no_grad():
        ours = model.predict(inputs, [s.clone() for s in samples])
    assert model.encoder.layers[0].ffn.layers[1] in packed_linear._packed
    assert model.encoder.layers[0].self_attn.value_proj in packed_linear._packed
    for a, b in zip(ours, ref):
        torch.testing.assert_close(
            a.pred_instances.scores, b.pred_instances.scores, atol=1e-5, rtol=1e-4
        )
