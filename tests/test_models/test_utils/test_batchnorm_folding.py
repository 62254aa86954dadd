"""Folding the backbone's eval-mode BatchNorms into its convolutions for
inference: same outputs, only safe pairs folded, the original untouched, and
a cache that follows every change of the weights."""

import copy

import pytest
import torch
from mmdet.models.backbones import ResNet, ResNetV1d
from torch import nn

from mmdet_deform.models.utils import FoldedBatchNormCache, conv_bn_pairs, fold_batchnorms


def randomise_batchnorms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def small_resnet(cls=ResNet, depth: int = 18, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = cls(depth=depth, base_channels=8, out_indices=(1, 2, 3), **kwargs)
    randomise_batchnorms(model)
    model.eval()
    return model


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize(
    'cls,depth',
    [(ResNet, 18), (ResNet, 50), (ResNetV1d, 50)],  # basic/bottleneck blocks, deep stem
    ids=['r18', 'r50', 'r50v1d'],
)
def test_folded_resnet_gives_the_same_features(cls, depth):
    model = small_resnet(cls, depth).double()
    state = copy.deepcopy(model.state_dict())
    folded = fold_batchnorms(model)
    assert count_batchnorms(folded) == 0  # every BatchNorm follows a conv
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(model(x), folded(x)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the original is untouched
    assert count_batchnorms(model) > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_float32_channels_last_folding():
    model = small_resnet(depth=50).to(memory_format=torch.channels_last)
    folded = fold_batchnorms(model)
    assert folded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for a, b in zip(model(x), folded(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class MisleadingOrder(nn.Module):
    """A BatchNorm registered right after a conv whose output it does not
    normalise: registration order says nothing about the data flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.bn_b(self.conv_b(self.conv_a(x)))


def test_only_pairs_known_to_be_sequential_are_folded():
    module = MisleadingOrder().eval()
    randomise_batchnorms(module)
    assert list(conv_bn_pairs(module)) == []
    folded = fold_batchnorms(module)
    assert count_batchnorms(folded) == 1
    sequential = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    assert [(c, b) for _, c, b in conv_bn_pairs(sequential)] == [('0', '1')]


def test_training_mode_batchnorm_is_not_folded():
    model = small_resnet(norm_eval=False)
    model.train()  # with norm_eval=True (the default) its BatchNorms stay in eval mode
    assert list(conv_bn_pairs(model)) == []
    model.eval()
    assert len(list(conv_bn_pairs(model))) == 1 + 2 * 8 + 3  # stem, 8 blocks, 3 downsamples


def test_cache_follows_the_weights():
    model = small_resnet()
    cache = FoldedBatchNormCache()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first = cache.get(model)
        assert cache.get(model) is first  # unchanged weights: reused
        # a versioned in-place change (load_state_dict, optimizer step)
        model.conv1.weight.mul_(2)
        second = cache.get(model)
        assert second is not first
        torch.testing.assert_close(second(x)[-1], model(x)[-1], rtol=1e-4, atol=1e-4)
        # an unversioned change through .data (mmengine's EMAHook swap)
        model.layer1[0].bn1.running_mean.data.add_(1.0)
        third = cache.get(model)
        assert third is not second
        torch.testing.assert_close(third(x)[-1], model(x)[-1], rtol=1e-4, atol=1e-4)
        # a replaced parameter
        model.conv1.weight = nn.Parameter(model.conv1.weight.detach().clone() * 0.5)
        fourth = cache.get(model)
        assert fourth is not third
        torch.testing.assert_close(fourth(x)[-1], model(x)[-1], rtol=1e-4, atol=1e-4)
    assert copy.deepcopy(cache)._folded is None  # copies fold their own weights


def test_detector_state_dict_is_unchanged_by_folding():
    """The detector holds the folded copy outside its module tree."""
    from mmengine.registry import init_default_scope

    from mmdet_deform.registry import MODELS

    from ..parity_utils import make_batch
    from ..test_deformable_detr import build_small, small_model_cfg

    init_default_scope('mmdet_deform')
    model = build_small('two_stage')
    randomise_batchnorms(model.backbone)
    keys = list(model.state_dict())
    num_params = len(list(model.parameters()))
    cfg = small_model_cfg('two_stage')
    cfg.fold_bn_in_inference = False
    unfolded = MODELS.build(cfg)
    unfolded.load_state_dict(model.state_dict())
    model.eval()
    unfolded.eval()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float64)
    model.double()
    unfolded.double()
    with torch.no_grad():
        ours = model.predict(inputs, [s.clone() for s in samples])
        ref = unfolded.predict(inputs, [s.clone() for s in samples])
    assert model._folded_backbone._folded is not None  # the folded path ran
    assert list(model.state_dict()) == keys
    assert len(list(model.parameters())) == num_params
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.pred_instances.scores, b.pred_instances.scores)
        torch.testing.assert_close(a.pred_instances.bboxes, b.pred_instances.bboxes)
    # with gradients (or in training) the backbone itself runs
    model._folded_backbone = FoldedBatchNormCache()
    model.predict(inputs, [s.clone() for s in samples])
    assert model._folded_backbone._folded is None
