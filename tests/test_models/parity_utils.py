"""Helpers of the parity tests: our detector against mmdet 3.3's (the oracle),
built through mmdet's ``init_detector`` from our config and mmdet's packaged
config with the same overrides, sharing weights, on a small padded batch."""

import os.path as osp
from typing import Dict, List, Tuple

import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

# (our config, mmdet's packaged config)
VARIANTS = {
    'plain': ('r50.py', 'deformable-detr_r50_16xb2-50e_coco.py'),
    'refine': ('refine_r50.py', 'deformable-detr-refine_r50_16xb2-50e_coco.py'),
    'two_stage': ('two_stage_r50.py', 'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'),
}

# No dropout and nothing to download; applied to both models.
NO_DROPOUT = {
    'model.backbone.init_cfg': None,
    'model.encoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.encoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,
    'model.decoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.cross_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,
}

# A smaller model of the same structure (ResNet-18, 2+2 layers, 40 queries,
# 10 classes) keeps the float64 forward/backward fast.
SMALL = {
    **NO_DROPOUT,
    'model.backbone.depth': 18,
    'model.backbone.base_channels': 16,
    'model.neck.in_channels': [32, 64, 128],
    'model.encoder.num_layers': 2,
    'model.encoder.layer_cfg.ffn_cfg.feedforward_channels': 256,
    'model.decoder.num_layers': 2,
    'model.decoder.layer_cfg.ffn_cfg.feedforward_channels': 256,
    'model.num_queries': 40,
    'model.bbox_head.num_classes': 10,
    'model.test_cfg.max_per_img': 30,
}

BATCH_INPUT_SHAPE = (256, 320)
IMG_SHAPES = ((256, 320), (224, 288))  # the second image is padded


def config_paths(variant: str, mmdet_config_dir: str) -> Tuple[str, str]:
    ours, theirs = VARIANTS[variant]
    return (
        osp.join(REPO_ROOT, 'configs', 'deformable_detr', ours),
        osp.join(mmdet_config_dir, 'deformable_detr', theirs),
    )


def build_pair(
    variant: str, mmdet_config_dir: str, cfg_options: Dict, seed: int = 0
) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """Our model and mmdet's, built by ``mmdet.apis.init_detector`` with the
    same ``cfg_options``; mmdet's is initialised, perturbed (so that offsets,
    attention weights and box deltas are not at their trivial initial
    values) and its state dict loaded into ours with ``strict=True``."""
    from mmdet.apis import init_detector

    ours_path, theirs_path = config_paths(variant, mmdet_config_dir)
    ours = init_detector(ours_path, None, device='cpu', cfg_options=dict(cfg_options))
    theirs = init_detector(theirs_path, None, device='cpu', cfg_options=dict(cfg_options))
    torch.manual_seed(seed)
    theirs.init_weights()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def make_batch(
    num_classes: int, seed: int = 0, dtype: torch.dtype = torch.float64, num_gts=(3, 2)
) -> Tuple[torch.Tensor, List[DetDataSample]]:
    """A normalised, padded batch of two images of different sizes with
    random ground-truth boxes inside each image."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(len(IMG_SHAPES), 3, *BATCH_INPUT_SHAPE, generator=gen, dtype=dtype)
    samples = []
    for i, (h, w) in enumerate(IMG_SHAPES):
        inputs[i, :, h:, :] = 0  # padding (0 after normalisation)
        inputs[i, :, :, w:] = 0
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(h, w),
                ori_shape=(h * 2, w * 2),
                scale_factor=(0.5, 0.5),
                batch_input_shape=BATCH_INPUT_SHAPE,
                pad_shape=BATCH_INPUT_SHAPE,
            )
        )
        n = num_gts[i]
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(n, 2, generator=gen) * 0.3 + 0.05) * torch.tensor([w, h])
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], -1).to(dtype),
            labels=torch.randint(0, num_classes, (n,), generator=gen),
        )
        samples.append(sample)
    return inputs, samples
