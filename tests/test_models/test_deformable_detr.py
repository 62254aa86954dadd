"""Behaviour of our Deformable DETR on its own: every config builds, losses
on empty ground truth, padded batches, rescaling, config validation, and
mmdet's inference API."""

import glob
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import init_default_scope
from torch.utils._python_dispatch import TorchDispatchMode

from mmdet_deform.models import DeformableDETR, DeformableDETRHead
from mmdet_deform.ops import MultiScaleDeformableAttention
from mmdet_deform.registry import MODELS

from .parity_utils import REPO_ROOT, SMALL, VARIANTS, make_batch

CONFIGS = sorted(glob.glob(osp.join(REPO_ROOT, 'configs', 'deformable_detr', '*.py')))


@pytest.fixture(autouse=True)
def default_scope():
    # unqualified names in our configs (ResNet, DetDataPreprocessor...) resolve
    # from our scope, as in tools/train.py
    init_default_scope('mmdet_deform')


def small_model_cfg(variant: str) -> Config:
    """Model config of a variant with the small test overrides."""
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'deformable_detr', VARIANTS[variant][0]))
    cfg.merge_from_dict(SMALL)
    return cfg.model


def build_small(variant: str, seed: int = 0) -> DeformableDETR:
    torch.manual_seed(seed)
    model = MODELS.build(small_model_cfg(variant))
    model.init_weights()
    return model


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: osp.basename(p))
def test_shipped_config_builds(path):
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    assert type(model) is DeformableDETR
    assert type(model.bbox_head) is DeformableDETRHead
    assert model.num_queries == cfg.model.num_queries
    assert model.embed_dims == cfg.model.encoder.layer_cfg.self_attn_cfg.embed_dims
    assert model.num_feature_levels == 4
    num_layers = cfg.model.decoder.num_layers
    assert len(model.encoder.layers) == cfg.model.encoder.num_layers
    assert len(model.decoder.layers) == num_layers
    for layer in model.encoder.layers:
        assert type(layer.self_attn) is MultiScaleDeformableAttention
    for layer in model.decoder.layers:
        assert type(layer.cross_attn) is MultiScaleDeformableAttention
    head = model.bbox_head
    assert len(head.cls_branches) == num_layers + int(model.as_two_stage)
    shared = head.cls_branches[0] is head.cls_branches[1]
    assert shared == (not model.with_box_refine)
    assert hasattr(model, 'query_embedding') != model.as_two_stage


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_empty_ground_truth(variant):
    """No objects: classification is still trained (all background), and no
    box loss is made up."""
    model = build_small(variant)
    model.train()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32, num_gts=(0, 0))
    losses = model.loss(inputs, samples)
    cls_names = [name for name in losses if name.endswith('loss_cls')]
    box_names = [name for name in losses if name.endswith(('loss_bbox', 'loss_iou'))]
    assert len(cls_names) == 2 + int(variant == 'two_stage')  # last, d0 (, enc)
    assert len(box_names) == 2 * len(cls_names)
    for name in cls_names:
        assert losses[name].item() > 0, name
    for name in box_names:
        assert losses[name].item() == 0, name
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_padded_batch_losses_and_rescaled_boxes(variant):
    """Two images of different sizes (one padded), each resized from a
    different original size: finite losses, and boxes inside each image,
    rescaled back to each original size."""
    model = build_small(variant)
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    # the second image was resized by (w, h) = (0.9, 0.7) from its original
    samples[1].set_metainfo(dict(scale_factor=(0.9, 0.7), ori_shape=(320, 320)))
    model.train()
    losses = model.loss(inputs, [s.clone() for s in samples])
    for name, value in losses.items():
        assert torch.isfinite(value).all(), name

    model.eval()
    with torch.no_grad():
        resized = model.predict(inputs, [s.clone() for s in samples], rescale=False)
        original = model.predict(inputs, [s.clone() for s in samples], rescale=True)
    for sample, res, orig in zip(samples, resized, original):
        img_h, img_w = sample.img_shape
        ori_h, ori_w = sample.ori_shape
        boxes = res.pred_instances.bboxes
        assert boxes.shape == (30, 4)
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= img_w).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= img_h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        scale_w, scale_h = sample.scale_factor
        expected = boxes / boxes.new_tensor([scale_w, scale_h, scale_w, scale_h])
        assert torch.allclose(orig.pred_instances.bboxes, expected)
        assert (orig.pred_instances.bboxes[:, 0::2] <= ori_w + 1e-3).all()
        assert (orig.pred_instances.bboxes[:, 1::2] <= ori_h + 1e-3).all()
        scores = res.pred_instances.scores
        assert ((scores >= 0) & (scores <= 1)).all()
        assert (scores[:-1] >= scores[1:]).all()  # sorted
        labels = res.pred_instances.labels
        assert ((labels >= 0) & (labels < 10)).all()


def test_padding_changes_nothing_for_the_unpadded_image():
    """The first image of a padded batch is not padded: its detections equal
    those of the same image alone (masks and valid ratios are per image)."""
    model = build_small('two_stage')
    model.eval()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    with torch.no_grad():
        batch = model.predict(inputs, [s.clone() for s in samples])
        alone = model.predict(inputs[:1], [samples[0].clone()])
    assert torch.allclose(batch[0].pred_instances.scores, alone[0].pred_instances.scores, atol=1e-5)
    assert torch.allclose(batch[0].pred_instances.bboxes, alone[0].pred_instances.bboxes, atol=1e-3)


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('bbox_head.share_pred_layer', True, 'share_pred_layer'),
        ('bbox_head.as_two_stage', True, 'as_two_stage'),
        ('decoder.post_norm_cfg', dict(type='LN'), 'post_norm_cfg'),
        ('encoder.layer_cfg.self_attn_cfg.batch_first', False, 'batch_first'),
        ('positional_encoding.num_feats', 64, 'num_feats'),
        ('num_feature_levels', 3, 'num_levels'),
        ('bbox_head.embed_dims', 128, 'embed_dims'),
    ],
)
def test_bad_config_raises_a_clear_error(key, value, message):
    model_cfg = small_model_cfg('refine')
    *parents, last = key.split('.')
    target = model_cfg
    for parent in parents:
        target = target[parent]
    target[last] = value
    with pytest.raises(ValueError, match=message):
        MODELS.build(model_cfg)


def test_inference_detector_with_our_config():
    """mmdet's inference API builds our classes from our config path and
    detects on a generated image."""
    from mmdet.apis import inference_detector, init_detector

    path = osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_r50.py')
    model = init_detector(
        path,
        None,
        device='cpu',
        cfg_options={
            'model.backbone.init_cfg': None,
            # keep the generated image small (the default test scale is 1333x800)
            'test_dataloader.dataset.pipeline.1.scale': (320, 256),
        },
    )
    assert type(model) is DeformableDETR
    assert type(model.encoder.layers[0].self_attn) is MultiScaleDeformableAttention
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    result = inference_detector(model, image)
    pred = result.pred_instances
    assert pred.bboxes.shape == (100, 4)
    assert result.ori_shape == (200, 300)
    assert (pred.bboxes[:, 0::2] <= 300 + 1e-3).all() and (pred.bboxes[:, 1::2] <= 200 + 1e-3).all()
    assert torch.isfinite(pred.scores).all()


def test_channels_last_changes_only_the_layout():
    """channels_last (the default) keeps the backbone weights in NHWC and
    gives the same detections as the NCHW model."""
    model = build_small('refine')
    conv = model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    cfg = small_model_cfg('refine')
    cfg.channels_last = False
    nchw = MODELS.build(cfg)
    nchw.load_state_dict(model.state_dict())
    assert nchw.backbone.conv1.weight.is_contiguous()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    model.eval()
    nchw.eval()
    with torch.no_grad():
        ours = model.predict(inputs, [s.clone() for s in samples])
        ref = nchw.predict(inputs, [s.clone() for s in samples])
    for a, b in zip(ours, ref):
        assert torch.allclose(a.pred_instances.scores, b.pred_instances.scores, atol=1e-5)
        assert torch.allclose(a.pred_instances.bboxes, b.pred_instances.bboxes, atol=1e-2)


def test_two_stage_needs_enough_encoder_positions():
    model = build_small('two_stage')  # 40 queries
    model.eval()
    inputs = torch.zeros(1, 3, 32, 32)  # 4x4 + 2x2 + 1x1 + 1x1 = 22 positions
    sample = DetDataSample(
        metainfo=dict(img_shape=(32, 32), batch_input_shape=(32, 32), scale_factor=(1.0, 1.0))
    )
    with pytest.raises(ValueError, match='num_queries'), torch.no_grad():
        model.predict(inputs, [sample])


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_attention_forward_hooks_fire_in_train_and_eval(variant):
    """Every layer calls its attention modules, so hooks on them see every
    call, in training and in inference."""
    model = build_small(variant)
    calls = []
    # in call order: encoder layers, then each decoder layer's two attentions
    attentions = [layer.self_attn for layer in model.encoder.layers]
    for layer in model.decoder.layers:
        attentions += [layer.self_attn, layer.cross_attn]
    for attn in attentions:
        attn.register_forward_hook(lambda m, args, out: calls.append(m))
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    model.train()
    model.loss(inputs, [s.clone() for s in samples])
    assert calls == attentions
    calls.clear()
    model.eval()
    with torch.no_grad():
        model.predict(inputs, [s.clone() for s in samples])
    assert calls == attentions


def test_attention_module_is_swappable_from_the_config():
    """A registered subclass of the attention, named in the config, is what
    the layers build and call."""
    from mmdet_deform.models.layers import DeformableDetrTransformerEncoderLayer

    class Recording(MultiScaleDeformableAttention):
        calls = 0

        def forward(self, *args, **kwargs):
            Recording.calls += 1
            return super().forward(*args, **kwargs)

    layer = DeformableDetrTransformerEncoderLayer(
        self_attn_cfg=dict(embed_dims=32, num_heads=4, num_levels=1, num_points=2, dropout=0.0),
        ffn_cfg=dict(embed_dims=32, feedforward_channels=64, ffn_drop=0.0),
    )
    layer.self_attn = Recording(
        embed_dims=32, num_heads=4, num_levels=1, num_points=2, dropout=0.0, batch_first=True
    )
    query = torch.randn(1, 12, 32)
    layer(
        query,
        torch.zeros_like(query),
        None,
        torch.rand(1, 12, 1, 2),
        torch.tensor([[3, 4]]),
        torch.tensor([0]),
    )
    assert Recording.calls == 1


class _MSDACalls(TorchDispatchMode):
    """Records the dtypes of ``sampling_locations`` and
    ``attention_weights`` of every ``mmdet_deform::ms_deform_attn`` call as
    the kernel receives it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == 'mmdet_deform::ms_deform_attn':
            self.dtypes.append((args[3].dtype, args[4].dtype))
        return func(*args, **(kwargs or {}))


def _wide_batch():
    """One image 40 px high and 4160 px wide: its first level is 520 px wide,
    where a bfloat16 x coordinate is off by up to a pixel."""
    gen = torch.Generator().manual_seed(0)
    shape = (40, 4160)
    inputs = torch.randn(1, 3, *shape, generator=gen)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=shape,
            ori_shape=shape,
            scale_factor=(1.0, 1.0),
            batch_input_shape=shape,
            pad_shape=shape,
        )
    )
    return inputs, [sample]


@pytest.mark.slow
def test_autocast_keeps_sampling_locations_in_float32(monkeypatch):
    """Under bf16 autocast every MSDA call of a full detector forward gets
    float32 locations and weights, and the outputs are closer to float32's
    than with locations rounded to bfloat16."""
    msda = sys.modules['mmdet_deform.ops.ms_deform_attn']

    model = build_small('refine')  # learnt queries: outputs comparable query by query
    with torch.no_grad():  # offsets and weights away from their initial values
        for module in model.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.sampling_offsets.weight.normal_(0, 0.05)
                module.attention_weights.weight.normal_(0, 0.05)
    model.eval()
    memories, queries = [], []
    model.encoder.register_forward_hook(lambda m, a, out: memories.append(out.float()))
    model.decoder.register_forward_hook(lambda m, a, out: queries.append(out[0].float()))
    inputs, samples = _wide_batch()
    with torch.no_grad():
        model._forward(inputs, samples)
        recorder = _MSDACalls()
        with torch.autocast('cpu', dtype=torch.bfloat16), recorder:
            model._forward(inputs, samples)
        # the same forward with locations and weights rounded to the value's dtype
        monkeypatch.setattr(msda, '_op_dtype', lambda tensor, value: tensor.to(value.dtype))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model._forward(inputs, samples)
    # one call per encoder layer, two per decoder layer (value, then its validity)
    num_calls = len(model.encoder.layers) + 2 * len(model.decoder.layers)
    assert recorder.dtypes == [(torch.float32, torch.float32)] * num_calls

    # encoder memory and decoder queries: (float32, autocast, autocast with rounded locations)
    # (the decoder adds bfloat16 rounding of its own, hence the looser bound)
    for outputs, bound in ((memories, 0.5), (queries, 0.8)):
        errors = [(x - outputs[0]).abs().mean().item() for x in outputs[1:]]
        assert errors[0] < bound * errors[1], errors


def test_predictions_under_bf16_autocast_are_float32():
    """mmengine's ``test_cfg.fp16=True`` runs predict under autocast, which is
    bf16 on a CPU: the detections stay float32 (numpy-convertible for the
    metrics, boxes not rounded to bf16) and close to the float32 ones."""
    model = build_small('two_stage').eval()
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    with torch.no_grad():
        expected = model.predict(inputs, [s.clone() for s in samples], rescale=False)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            results = model.predict(inputs, [s.clone() for s in samples], rescale=False)
    for result, exp in zip(results, expected):
        pred = result.pred_instances
        assert pred.scores.dtype == pred.bboxes.dtype == torch.float32
        assert np.isfinite(pred.scores.numpy()).all()
        assert 0 < (pred.scores - exp.pred_instances.scores).abs().max() < 2e-2


def test_look_forward_twice_changes_gradients_not_losses():
    """With refinement, look forward twice returns the refined references with
    their gradient: the same losses, and the last layer's box losses now reach
    the first layer's regression branch."""
    inputs, samples = make_batch(num_classes=10, dtype=torch.float32)
    grads, all_losses = [], []
    for flag in (False, True):
        cfg = small_model_cfg('refine')
        cfg.look_forward_twice = flag
        torch.manual_seed(0)
        model = MODELS.build(cfg)
        model.init_weights()
        assert model.decoder.look_forward_twice is flag
        model.train()
        losses = model.loss(inputs, [s.clone() for s in samples])
        all_losses.append(losses)
        (losses['loss_bbox'] + losses['loss_iou']).backward()
        grad = model.bbox_head.reg_branches[0][-1].weight.grad
        grads.append(0.0 if grad is None else grad.abs().sum().item())
    for name, value in all_losses[0].items():
        assert torch.allclose(value, all_losses[1][name], atol=1e-6), name
    assert grads[0] == 0 and grads[1] > 0


@pytest.mark.parametrize(
    'variant, key, value, names',
    [
        ('plain', 'look_forward_twice', True, ('look_forward_twice', 'with_box_refine')),
        ('refine', 'dn_cfg', dict(label_noise_scale=0.5), ('dn_cfg', 'mmdet_deform.DINO')),
    ],
)
def test_switch_without_its_variant_raises_naming_both(variant, key, value, names):
    cfg = small_model_cfg(variant)
    cfg[key] = value
    with pytest.raises(ValueError) as error:
        MODELS.build(cfg)
    for name in names:
        assert name in str(error.value), (name, str(error.value))
