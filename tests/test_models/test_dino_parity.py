"""Parity with mmdet 3.3's DINO (the oracle): configs/dino/dino_4scale_r50.py
and mmdet's packaged DINO config build through ``mmdet.apis.init_detector``
to the same state-dict keys, and with the same weights, in float64, give the
same predictions, and, with the same seed right before each denoising-query
generator, the same denoising queries, losses and gradients."""

import os.path as osp

import pytest
import torch

from .parity_utils import NO_DROPOUT, REPO_ROOT, SMALL, make_batch

OURS = osp.join(REPO_ROOT, 'configs', 'dino', 'dino_4scale_r50.py')
THEIRS = osp.join('dino', 'dino-4scale_r50_8xb2-12e_coco.py')
# few matching and denoising queries keep the float64 model fast
DINO_SMALL = {**SMALL, 'model.num_queries': 30, 'model.dn_cfg.group_cfg.num_dn_queries': 12}
DN_SEED = 7
SCORE_ATOL = 1e-6
BOX_ATOL = 1e-6  # pixels
LOSS_ATOL = 1e-7
GRAD_RTOL = 1e-6  # relative to the largest gradient of each parameter


def build_pair(mmdet_config_dir, cfg_options):
    """Ours and mmdet's DINO; mmdet's initialised and perturbed, its state
    dict loaded into ours with strict=True."""
    from mmdet.apis import init_detector

    theirs_path = osp.join(mmdet_config_dir, THEIRS)
    ours = init_detector(OURS, None, device='cpu', cfg_options=dict(cfg_options))
    theirs = init_detector(theirs_path, None, device='cpu', cfg_options=dict(cfg_options))
    torch.manual_seed(0)
    theirs.init_weights()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.fixture()
def seeded_dn_generators(monkeypatch):
    """Seed torch right before every denoising-query generator call, ours (a
    module: a forward pre-hook) and mmdet's (patched ``__call__``)."""
    from mmdet.models.layers.transformer.dino_layers import CdnQueryGenerator

    original = CdnQueryGenerator.__call__

    def seeded_call(self, *args, **kwargs):
        torch.manual_seed(DN_SEED)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CdnQueryGenerator, '__call__', seeded_call)

    def hook(module, args):
        torch.manual_seed(DN_SEED)

    return hook


def test_full_config_state_dict_matches_mmdet(mmdet_config_dir):
    """The shipped config: same keys in the same order, and mmdet DINO's
    weights load with strict=True (so its released checkpoints do)."""
    from mmdet.apis import init_detector
    from mmdet.models.detectors import DINO as MmdetDINO

    from mmdet_deform.models import DINO, DINOHead

    ours = init_detector(OURS, None, device='cpu', cfg_options=dict(NO_DROPOUT))
    theirs = init_detector(
        osp.join(mmdet_config_dir, THEIRS), None, device='cpu', cfg_options=dict(NO_DROPOUT)
    )
    assert type(ours) is DINO
    assert type(ours.bbox_head) is DINOHead
    assert type(theirs) is MmdetDINO
    assert ours.num_queries == 900 and ours.bbox_head.test_cfg['max_per_img'] == 300
    torch.manual_seed(0)
    theirs.init_weights()
    theirs_state = theirs.state_dict()
    assert list(ours.state_dict()) == list(theirs_state)
    for name, value in ours.state_dict().items():
        assert value.shape == theirs_state[name].shape, name
    ours.load_state_dict(theirs_state, strict=True)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[name]), name


def test_dn_queries_match_mmdet(mmdet_config_dir):
    """Our generator draws the noise in mmdet's order: one seed, the same
    denoising queries, mask and layout."""
    from mmdet.models.layers.transformer.dino_layers import CdnQueryGenerator as Theirs

    from mmdet_deform.models.layers import CdnQueryGenerator

    _, samples = make_batch(num_classes=10, dtype=torch.float32, num_gts=(5, 2))
    kwargs = dict(
        num_classes=10,
        embed_dims=8,
        num_matching_queries=6,
        label_noise_scale=0.5,
        box_noise_scale=0.4,
        group_cfg=dict(dynamic=True, num_dn_queries=12),
    )
    ours, theirs = CdnQueryGenerator(**kwargs), Theirs(**kwargs)
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(3)
    label_query, bbox_query, mask, meta = ours(samples)
    torch.manual_seed(3)
    ref_label_query, ref_bbox_query, ref_mask, ref_meta = theirs(samples)
    assert meta == ref_meta == dict(num_denoising_queries=20, num_denoising_groups=2)
    assert label_query.shape == (2, 20, 8) and bbox_query.shape == (2, 20, 4)
    assert torch.equal(label_query, ref_label_query)
    assert torch.equal(bbox_query, ref_bbox_query)
    assert torch.equal(mask, ref_mask)


@pytest.fixture(scope='module')
def float64_pair(mmdet_config_dir):
    ours, theirs = build_pair(mmdet_config_dir, DINO_SMALL)
    return ours.double(), theirs.double()


@pytest.mark.slow
def test_predict_matches_mmdet(float64_pair):
    ours, theirs = float64_pair
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
def test_loss_and_gradients_match_mmdet(float64_pair, seeded_dn_generators):
    ours, theirs = float64_pair
    handle = ours.dn_query_generator.register_forward_pre_hook(seeded_dn_generators)
    inputs, samples = make_batch(num_classes=10)
    ours.train()
    theirs.train()
    ours.zero_grad()
    theirs.zero_grad()
    try:
        losses = ours.loss(inputs, [s.clone() for s in samples])
    finally:
        handle.remove()
    # mmdet builds the padded denoising queries and their box targets with
    # torch.zeros (the default dtype): float64 keeps its float64 run exact
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        expected = theirs.loss(inputs, [s.clone() for s in samples])
    finally:
        torch.set_default_dtype(default_dtype)

    assert list(losses) == list(expected)
    for name in ('enc_loss_cls', 'dn_loss_bbox', 'd0.dn_loss_iou', 'd0.loss_cls'):
        assert name in losses, name
    for name, value in losses.items():
        assert abs(value.item() - expected[name].item()) <= LOSS_ATOL, name

    sum(losses.values()).backward()
    sum(expected.values()).backward()
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
    # the denoising label embedding and the content queries are trained
    assert ours.dn_query_generator.label_embedding.weight.grad.abs().sum() > 0
    assert ours.query_embedding.weight.grad.abs().sum() > 0
    assert num_checked > 50
