"""Parity with mmdet 3.3's Deformable DETR (the oracle): for each variant, our
config and mmdet's packaged config build through ``mmdet.apis.init_detector``
to the same state-dict keys, and with the same weights, in float64, give the
same predictions, losses and gradients (mmdet running mmcv's grid_sample
attention, we our compiled op)."""

import pytest
import torch

from mmdet_deform.ops import MultiScaleDeformableAttention

from .parity_utils import NO_DROPOUT, SMALL, VARIANTS, build_pair, config_paths, make_batch

SCORE_ATOL = 1e-6
BOX_ATOL = 1e-6  # pixels
LOSS_ATOL = 1e-7
GRAD_RTOL = 1e-6  # relative to the largest gradient of each parameter


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_full_config_state_dict_matches_mmdet(variant, mmdet_config_dir):
    """The shipped r50 configs: same keys in the same order, and mmdet's
    weights load with strict=True (so its released checkpoints do)."""
    from mmcv.ops import MultiScaleDeformableAttention as MmcvMSDA
    from mmdet.apis import init_detector
    from mmdet.models.dense_heads import DeformableDETRHead as MmdetHead
    from mmdet.models.detectors import DeformableDETR as MmdetDeformableDETR

    from mmdet_deform.models import DeformableDETR

    ours_path, theirs_path = config_paths(variant, mmdet_config_dir)
    ours = init_detector(ours_path, None, device='cpu', cfg_options=dict(NO_DROPOUT))
    theirs = init_detector(theirs_path, None, device='cpu', cfg_options=dict(NO_DROPOUT))
    assert type(ours) is DeformableDETR
    # importing ours leaves mmdet's config building mmdet's classes
    assert type(theirs) is MmdetDeformableDETR
    assert type(theirs.bbox_head) is MmdetHead
    assert type(theirs.encoder.layers[0].self_attn) is MmcvMSDA
    assert type(theirs.decoder.layers[0].cross_attn) is MmcvMSDA
    assert isinstance(ours.encoder.layers[0].self_attn, MultiScaleDeformableAttention)
    assert isinstance(ours.decoder.layers[0].cross_attn, MultiScaleDeformableAttention)
    # level_embed starts as torch.empty (may hold NaN, which torch.equal
    # never matches): initialise every weight, deterministically
    torch.manual_seed(0)
    theirs.init_weights()
    theirs_state = theirs.state_dict()
    for name, value in theirs_state.items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), name
    assert list(ours.state_dict()) == list(theirs_state)
    for name, value in ours.state_dict().items():
        assert value.shape == theirs_state[name].shape, name
    ours.load_state_dict(theirs_state, strict=True)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[name]), name


@pytest.fixture(scope='module', params=list(VARIANTS))
def float64_pair(request, mmdet_config_dir):
    """(variant, ours, mmdet's): the small models, same weights, float64."""
    ours, theirs = build_pair(request.param, mmdet_config_dir, SMALL)
    return request.param, ours.double(), theirs.double()


@pytest.mark.slow
def test_predict_matches_mmdet(float64_pair):
    _, ours, theirs = float64_pair
    inputs, samples = make_batch(num_classes=10)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        results = ours.predict(inputs, [s.clone() for s in samples], rescale=True)
        expected = theirs.predict(inputs, [s.clone() for s in samples], rescale=True)
    for result, target in zip(results, expected):
        pred, ref = result.pred_instances, target.pred_instances
        assert pred.scores.shape == ref.scores.shape == (30,)
        assert torch.allclose(pred.scores, ref.scores, rtol=0, atol=SCORE_ATOL)
        assert torch.allclose(pred.bboxes, ref.bboxes, rtol=0, atol=BOX_ATOL)
        assert torch.equal(pred.labels, ref.labels)


@pytest.mark.slow
def test_loss_and_gradients_match_mmdet(float64_pair):
    variant, ours, theirs = float64_pair
    inputs, samples = make_batch(num_classes=10)
    ours.train()
    theirs.train()
    ours.zero_grad()
    theirs.zero_grad()
    losses = ours.loss(inputs, [s.clone() for s in samples])
    expected = theirs.loss(inputs, [s.clone() for s in samples])

    assert list(losses) == list(expected)
    assert 'd0.loss_cls' in losses and 'd0.loss_iou' in losses
    assert ('enc_loss_cls' in losses) == (variant == 'two_stage')
    for name, value in losses.items():
        assert abs(value.item() - expected[name].item()) <= LOSS_ATOL, name

    sum(losses.values()).sum().backward()
    sum(expected.values()).sum().backward()
    theirs_params = dict(theirs.named_parameters())
    num_checked = 0
    for name, param in ours.named_parameters():
        ref = theirs_params[name]
        assert (param.grad is None) == (ref.grad is None), name
        if param.grad is None:
            continue
        assert torch.isfinite(param.grad).all(), name
        scale = ref.grad.abs().max().clamp(min=1e-12)
        assert ((param.grad - ref.grad).abs().max() / scale).item() <= GRAD_RTOL, name
        num_checked += 1
    # sampling offsets and attention weights get gradients through the op
    assert ours.encoder.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert ours.decoder.layers[-1].cross_attn.attention_weights.weight.grad.abs().sum() > 0
    assert num_checked > 50
