"""mmdet_deform.plugins.mmcv_msda: after the import, mmdet's own Deformable
DETR, DINO and Mask2Former pixel decoder build with our
MultiScaleDeformableAttention, load the state dict of the mmcv-module version
with strict=True, initialise identically and give the same outputs and
gradients (float64). mmcv's module (the oracle) is built with the switch
reverted; the switch is reverted again after these tests."""

import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch

from mmdet_deform.ops import MultiScaleDeformableAttention as OurMSDA

from ..conftest import REPO_ROOT

NAME = 'MultiScaleDeformableAttention'

# No dropout, nothing to download, a small model of the same structure.
SMALL = {
    'model.backbone.init_cfg': None,
    'model.backbone.depth': 18,
    'model.backbone.base_channels': 16,
    'model.neck.in_channels': [32, 64, 128],
    'model.encoder.num_layers': 2,
    'model.encoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.encoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,
    'model.encoder.layer_cfg.ffn_cfg.feedforward_channels': 128,
    'model.decoder.num_layers': 2,
    'model.decoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.cross_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,
    'model.decoder.layer_cfg.ffn_cfg.feedforward_channels': 128,
    'model.num_queries': 30,
    'model.bbox_head.num_classes': 10,
    'model.test_cfg.max_per_img': 20,
}
DETECTORS = {
    # two-stage with box refinement: 2-d reference points in the encoder,
    # 4-d reference boxes in the decoder
    'deformable_detr': (
        'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
        {},
    ),
    'dino': (
        'dino/dino-4scale_r50_8xb2-12e_coco.py',
        {'model.dn_cfg.group_cfg.num_dn_queries': 10},
    ),
}
IMG_SHAPES = ((96, 128), (80, 112))  # the second image is padded
BATCH_INPUT_SHAPE = IMG_SHAPES[0]


@pytest.fixture(scope='module')
def plugin():
    """The plugin module (importing it applies the switch); reverted after
    this test module so that other tests see mmcv's module."""
    import mmdet_deform.plugins.mmcv_msda as plugin

    yield plugin
    plugin.revert()
    assert not plugin.is_applied()


def mmcv_msda_class():
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention

    return MultiScaleDeformableAttention


def msda_modules(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if type(m).__name__ == NAME]


# --------------------------------------------------------------------------
# The switch itself
# --------------------------------------------------------------------------
def test_import_switches_every_place_mmdet_takes_the_class_from(plugin):
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    plugin.apply()
    assert plugin.is_applied()
    mmcv_cls = mmcv_msda_class()
    for name in plugin.CLASS_MODULES:
        assert getattr(sys.modules[name], NAME) is OurMSDA, name
    for name in plugin.ISINSTANCE_MODULES:  # init_weights re-initialises both kinds
        assert getattr(sys.modules[name], NAME) == (OurMSDA, mmcv_cls), name
    # nothing else imported so far still holds mmcv's class, except mmcv's own module
    left = sorted(
        name
        for name, module in list(sys.modules.items())
        if (name.startswith(('mmdet.', 'mmcv.')) and getattr(module, NAME, None) is mmcv_cls)
    )
    assert left == ['mmcv.ops.multi_scale_deform_attn']
    # type='MultiScaleDeformableAttention' in a config
    with DefaultScope.overwrite_default_scope('mmdet'):
        built = MODELS.build(dict(type=NAME, embed_dims=32, num_heads=4, batch_first=True))
    assert type(built) is OurMSDA


def test_apply_is_idempotent_and_revert_restores_mmcv(plugin):
    import importlib

    from mmengine.registry import MODELS

    mmcv_cls = mmcv_msda_class()
    plugin.apply()
    plugin.apply()
    assert importlib.import_module('mmdet_deform.plugins.mmcv_msda') is plugin
    assert plugin.is_applied()
    plugin.revert()
    assert not plugin.is_applied()
    for name in plugin.PATCHED_MODULES:
        assert getattr(sys.modules[name], NAME) is mmcv_cls, name
    assert MODELS.module_dict[NAME] is mmcv_cls
    plugin.revert()  # a second revert changes nothing
    assert getattr(sys.modules['mmcv.ops'], NAME) is mmcv_cls
    plugin.apply()
    assert plugin.is_applied()


# --------------------------------------------------------------------------
# mmdet's detectors
# --------------------------------------------------------------------------
def build_detector(plugin, mmdet_config_dir: str, kind: str, switched: bool):
    from mmdet.apis import init_detector

    config, extra = DETECTORS[kind]
    if switched:
        plugin.apply()
    else:
        plugin.revert()
    torch.manual_seed(0)  # what init_weights leaves alone keeps its construction values
    try:
        return init_detector(
            osp.join(mmdet_config_dir, config),
            None,
            device='cpu',
            cfg_options={**SMALL, **extra},
        )
    finally:
        plugin.apply()


def make_batch(model, seed: int = 0):
    """A normalised float64 batch of two images (the second padded) with
    random boxes, and its data samples."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(len(IMG_SHAPES), 3, *BATCH_INPUT_SHAPE, generator=gen, dtype=torch.float64)
    samples = []
    for i, (h, w) in enumerate(IMG_SHAPES):
        inputs[i, :, h:, :] = 0
        inputs[i, :, :, w:] = 0
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(h, w),
                ori_shape=(h, w),
                scale_factor=(1.0, 1.0),
                batch_input_shape=BATCH_INPUT_SHAPE,
                pad_shape=BATCH_INPUT_SHAPE,
            )
        )
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(3, 2, generator=gen) * 0.3 + 0.05) * torch.tensor([w, h])
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], -1).double(),
            labels=torch.randint(0, 10, (3,), generator=gen),
        )
        samples.append(sample)
    return inputs, samples


@pytest.fixture(scope='module', params=sorted(DETECTORS))
def detector_pair(request, plugin, mmdet_config_dir):
    """(kind, mmcv-module model, our-module model): mmcv's initialised and
    perturbed (offsets and attention weights away from their initial
    values), its state dict loaded into ours with strict=True."""
    kind = request.param
    theirs = build_detector(plugin, mmdet_config_dir, kind, switched=False)
    ours = build_detector(plugin, mmdet_config_dir, kind, switched=True)
    torch.manual_seed(0)
    theirs.init_weights()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return kind, theirs, ours


def test_detector_builds_with_our_module(detector_pair):
    kind, theirs, ours = detector_pair
    num_layers = 2 + 2  # encoder self-attention, decoder cross-attention
    assert [type(m) for m in msda_modules(ours)] == [OurMSDA] * num_layers
    assert [type(m) for m in msda_modules(theirs)] == [mmcv_msda_class()] * num_layers


def test_detector_initialises_as_with_mmcv(plugin, mmdet_config_dir, detector_pair):
    """init_weights finds our module (mmdet's isinstance checks see it) and
    draws the same weights as with mmcv's; a model built before the switch
    (with mmcv's module) is still initialised as mmdet does it."""
    kind = detector_pair[0]
    models = [
        build_detector(plugin, mmdet_config_dir, kind, switched) for switched in (False, True)
    ]
    states = []
    for model in models:
        torch.manual_seed(1)
        model.init_weights()
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    for model in models:  # zero: re-initialised by the module's init_weights
        assert not msda_modules(model)[0].sampling_offsets.weight.any()


def test_detector_outputs_match_mmcv(detector_pair):
    kind, theirs, ours = detector_pair
    inputs, samples = make_batch(theirs)
    results = []
    for model in (theirs, ours):
        model.double().eval()
        with torch.no_grad():
            results.append(model(inputs, samples, mode='tensor'))
    expected, actual = (torch.utils._pytree.tree_leaves(r) for r in results)
    assert len(expected) == len(actual) > 0
    for e, a in zip(expected, actual):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_detector_losses_and_gradients_match_mmcv(detector_pair):
    """In float64, except DINO, whose denoising-query generator (mmdet's)
    fills float32 buffers: float32 with a tight tolerance there."""
    kind, theirs, ours = detector_pair
    dtype = torch.float32 if kind == 'dino' else torch.float64
    # relative error allowed on each loss, and on each gradient (as a whole);
    # measured: below 2e-6 in float32, 3e-15 in float64
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    inputs, samples = make_batch(theirs, seed=1)
    inputs = inputs.to(dtype)
    for sample in samples:
        sample.gt_instances.bboxes = sample.gt_instances.bboxes.to(dtype)
    losses = []
    for model in (theirs, ours):
        model.to(dtype).train()
        model.zero_grad()
        torch.manual_seed(2)  # DINO's denoising queries
        loss_dict = model(inputs, samples, mode='loss')
        loss, _ = model.parse_losses(loss_dict)
        loss.backward()
        losses.append(loss_dict)
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        expected, actual = (torch.as_tensor(d[key], dtype=torch.float64) for d in losses)
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=key)
    grads = [dict(m.named_parameters()) for m in (theirs, ours)]
    num_grads = 0
    for name, p in grads[0].items():
        q = grads[1][name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            error = (q.grad.double() - p.grad.double()).norm()
            assert error <= tol * max(p.grad.double().norm(), 1e-6), name
            num_grads += 1
    assert num_grads > 100


# --------------------------------------------------------------------------
# Mask2Former's pixel decoder
# --------------------------------------------------------------------------
def build_pixel_decoder(plugin, switched: bool):
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    cfg = ConfigDict(
        type='MSDeformAttnPixelDecoder',
        in_channels=[8, 16, 32, 64],
        strides=[4, 8, 16, 32],
        feat_channels=32,
        out_channels=32,
        num_outs=3,
        norm_cfg=dict(type='GN', num_groups=8),
        act_cfg=dict(type='ReLU'),
        encoder=dict(
            num_layers=2,
            layer_cfg=dict(
                self_attn_cfg=dict(
                    embed_dims=32,
                    num_heads=4,
                    num_levels=3,
                    num_points=4,
                    dropout=0.0,
                    batch_first=True,
                ),
                ffn_cfg=dict(embed_dims=32, feedforward_channels=64, num_fcs=2, ffn_drop=0.0),
            ),
        ),
        positional_encoding=dict(num_feats=16, normalize=True),
    )
    if switched:
        plugin.apply()
    else:
        plugin.revert()
    torch.manual_seed(0)
    try:
        return MODELS.build(cfg)
    finally:
        plugin.apply()


def test_pixel_decoder_matches_mmcv(plugin):
    theirs, ours = (build_pixel_decoder(plugin, switched) for switched in (False, True))
    assert [type(m) for m in msda_modules(theirs)] == [mmcv_msda_class()] * 2
    assert [type(m) for m in msda_modules(ours)] == [OurMSDA] * 2
    # same initialisation (the decoder's init_weights re-initialises our module)
    for model in (theirs, ours):
        torch.manual_seed(3)
        model.init_weights()
    for (key, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), key
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(theirs.state_dict(), strict=True)

    gen = torch.Generator().manual_seed(4)
    feats = [
        torch.randn(2, c, 64 // s, 80 // s, generator=gen, dtype=torch.float64)
        for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])
    ]
    outputs = []
    for model in (theirs, ours):
        model.double().train()
        leaves = [f.clone().requires_grad_() for f in feats]
        mask_feature, multi_scale = model(leaves)
        (mask_feature.square().sum() + sum(f.sum() for f in multi_scale)).backward()
        outputs.append((mask_feature, multi_scale, [f.grad for f in leaves], model))
    (e_mask, e_scales, e_grads, _), (a_mask, a_scales, a_grads, _) = outputs
    torch.testing.assert_close(a_mask, e_mask, rtol=1e-9, atol=1e-10)
    for a, e in zip(a_scales + a_grads, e_scales + e_grads):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9, msg=name)


# --------------------------------------------------------------------------
# The documented route: custom_imports in an mmdet config
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_custom_imports_in_a_config_switches_mmdet_dino(tmp_path, mmdet_config_dir):
    config = tmp_path / 'dino_with_plugin.py'
    base = osp.join(mmdet_config_dir, 'dino', 'dino-4scale_r50_8xb2-12e_coco.py')
    config.write_text(
        textwrap.dedent(
            f"""\
            _base_ = {base!r}
            custom_imports = dict(
                imports=['mmdet_deform.plugins.mmcv_msda'], allow_failed_imports=False)
            """
        )
    )
    script = textwrap.dedent(
        f"""\
        import numpy as np
        from mmdet.apis import inference_detector, init_detector

        model = init_detector({str(config)!r}, None, device='cpu', cfg_options={SMALL!r})
        kinds = sorted({{type(m).__module__ for m in model.modules()
                         if type(m).__name__ == 'MultiScaleDeformableAttention'}})
        count = sum(type(m).__name__ == 'MultiScaleDeformableAttention'
                    for m in model.modules())
        image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        result = inference_detector(model, image)
        print('MSDA', count, kinds, len(result.pred_instances))
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run(
        [sys.executable, '-c', script],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MSDA 4 ['mmdet_deform.ops.ms_deform_attn'] 20" in proc.stdout, proc.stdout


def test_importing_the_package_does_not_switch():
    """Only importing ``mmdet_deform.plugins.mmcv_msda`` switches."""
    script = textwrap.dedent(
        """\
        import mmdet_deform, mmdet_deform.plugins
        import mmcv.ops
        from mmdet.models.layers.transformer import deformable_detr_layers
        for cls in (mmcv.ops.MultiScaleDeformableAttention,
                    deformable_detr_layers.MultiScaleDeformableAttention):
            assert cls.__module__ == 'mmcv.ops.multi_scale_deform_attn', cls
        import mmdet_deform.plugins.mmcv_msda
        assert deformable_detr_layers.MultiScaleDeformableAttention.__module__ == (
            'mmdet_deform.ops.ms_deform_attn')
        print('OK')
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run(
        [sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'OK' in proc.stdout
