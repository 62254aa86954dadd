"""tools/model_converters/official_to_mmdet_deform.py: official
(fundamentalvision/Deformable-DETR) checkpoints load into our models."""

import argparse
import importlib.util
import os.path as osp
import sys
from collections import OrderedDict
from unittest import mock

import pytest
import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = {
    # variant: (our config, with_box_refine, two_stage)
    'plain': ('r50.py', False, False),
    'refine': ('refine_r50.py', True, False),
    'two_stage': ('two_stage_r50.py', True, True),
}


def load_tool():
    path = osp.join(REPO_ROOT, 'tools', 'model_converters', 'official_to_mmdet_deform.py')
    spec = importlib.util.spec_from_file_location('official_to_mmdet_deform', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_state_dict(with_box_refine: bool, two_stage: bool) -> 'OrderedDict':
    """A random state dict with the official model's keys and shapes (ResNet-50
    with frozen BN, 6+6 layers, 256 dims, 8 heads, 4 levels, 4 points, 300
    queries, 91 COCO category ids), as its code registers them."""
    gen = torch.Generator().manual_seed(0)
    state = OrderedDict()

    def add(key, *shape):
        state[key] = torch.randn(*shape, generator=gen)

    def frozen_bn(prefix, channels):
        for name in ('weight', 'bias', 'running_mean'):
            add(f'{prefix}.{name}', channels)
        state[f'{prefix}.running_var'] = torch.rand(channels, generator=gen) + 0.5

    body = 'backbone.0.body'
    add(f'{body}.conv1.weight', 64, 3, 7, 7)
    frozen_bn(f'{body}.bn1', 64)
    in_channels = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for block in range(blocks):
            prefix = f'{body}.layer{stage}.{block}'
            add(f'{prefix}.conv1.weight', width, in_channels, 1, 1)
            frozen_bn(f'{prefix}.bn1', width)
            add(f'{prefix}.conv2.weight', width, width, 3, 3)
            frozen_bn(f'{prefix}.bn2', width)
            add(f'{prefix}.conv3.weight', width * 4, width, 1, 1)
            frozen_bn(f'{prefix}.bn3', width * 4)
            if block == 0:
                add(f'{prefix}.downsample.0.weight', width * 4, in_channels, 1, 1)
                frozen_bn(f'{prefix}.downsample.1', width * 4)
            in_channels = width * 4

    def linear(prefix, out_dims, in_dims):
        add(f'{prefix}.weight', out_dims, in_dims)
        add(f'{prefix}.bias', out_dims)

    def msda(prefix):
        linear(f'{prefix}.sampling_offsets', 256, 256)
        linear(f'{prefix}.attention_weights', 128, 256)
        linear(f'{prefix}.value_proj', 256, 256)
        linear(f'{prefix}.output_proj', 256, 256)

    add('transformer.level_embed', 4, 256)
    for i in range(6):
        prefix = f'transformer.encoder.layers.{i}'
        msda(f'{prefix}.self_attn')
        linear(f'{prefix}.norm1', 256, 1)
        linear(f'{prefix}.linear1', 1024, 256)
        linear(f'{prefix}.linear2', 256, 1024)
        linear(f'{prefix}.norm2', 256, 1)
    for i in range(6):
        prefix = f'transformer.decoder.layers.{i}'
        msda(f'{prefix}.cross_attn')
        linear(f'{prefix}.norm1', 256, 1)
        add(f'{prefix}.self_attn.in_proj_weight', 768, 256)
        add(f'{prefix}.self_attn.in_proj_bias', 768)
        linear(f'{prefix}.self_attn.out_proj', 256, 256)
        linear(f'{prefix}.norm2', 256, 1)
        linear(f'{prefix}.linear1', 1024, 256)
        linear(f'{prefix}.linear2', 256, 1024)
        linear(f'{prefix}.norm3', 256, 1)
    for key in [k for k in state if '.norm' in k and k.endswith('.weight')]:
        state[key] = state[key][:, 0]  # LayerNorm weights are 1-d
    if two_stage:
        linear('transformer.enc_output', 256, 256)
        add('transformer.enc_output_norm.weight', 256)
        add('transformer.enc_output_norm.bias', 256)
        linear('transformer.pos_trans', 512, 512)
        add('transformer.pos_trans_norm.weight', 512)
        add('transformer.pos_trans_norm.bias', 512)
    else:
        linear('transformer.reference_points', 2, 256)

    # heads: one per decoder layer (+1 for two-stage proposals); without
    # refinement one module is shared, so every index holds the same tensors
    num_pred = 7 if two_stage else 6
    for i in range(num_pred if with_box_refine else 1):
        linear(f'class_embed.{i}', 91, 256)
        linear(f'bbox_embed.{i}.layers.0', 256, 256)
        linear(f'bbox_embed.{i}.layers.1', 256, 256)
        linear(f'bbox_embed.{i}.layers.2', 4, 256)
    if not with_box_refine:
        for key in [k for k in state if k.startswith(('class_embed.0.', 'bbox_embed.0.'))]:
            for i in range(1, num_pred):
                state[key.replace('.0.', f'.{i}.', 1)] = state[key]
    # refinement / two-stage register the heads again under the decoder
    if with_box_refine:
        for key in [k for k in state if k.startswith('bbox_embed.')]:
            state[f'transformer.decoder.{key}'] = state[key]
    if two_stage:
        for key in [k for k in state if k.startswith('class_embed.')]:
            state[f'transformer.decoder.{key}'] = state[key]
    else:
        add('query_embed.weight', 300, 512)

    for i, in_dims in enumerate((512, 1024, 2048)):
        add(f'input_proj.{i}.0.weight', 256, in_dims, 1, 1)
        add(f'input_proj.{i}.0.bias', 256)
        add(f'input_proj.{i}.1.weight', 256)
        add(f'input_proj.{i}.1.bias', 256)
    add('input_proj.3.0.weight', 256, 2048, 3, 3)
    add('input_proj.3.0.bias', 256)
    add('input_proj.3.1.weight', 256)
    add('input_proj.3.1.bias', 256)
    return state


def build_ours(config: str):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmdet_deform.registry import MODELS

    init_default_scope('mmdet_deform')
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'deformable_detr', config))
    cfg.model.backbone.init_cfg = None
    cfg.model.neck.bias = True  # the official input projections have a bias
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('variant', list(CONFIGS))
def test_official_state_dict_loads_strictly(variant):
    tool = load_tool()
    config, with_box_refine, two_stage = CONFIGS[variant]
    official = official_state_dict(with_box_refine, two_stage)
    converted = tool.convert(official)
    model = build_ours(config)
    model.load_state_dict(converted, strict=True)

    state = model.state_dict()
    # decoder norms follow the official order: self-attn (norm2), cross (norm1), ffn (norm3)
    src = 'transformer.decoder.layers.3'
    assert torch.equal(state['decoder.layers.3.norms.0.weight'], official[f'{src}.norm2.weight'])
    assert torch.equal(state['decoder.layers.3.norms.1.bias'], official[f'{src}.norm1.bias'])
    assert torch.equal(state['decoder.layers.3.norms.2.weight'], official[f'{src}.norm3.weight'])
    assert torch.equal(
        state['decoder.layers.3.self_attn.attn.in_proj_weight'],
        official[f'{src}.self_attn.in_proj_weight'],
    )
    assert torch.equal(
        state['encoder.layers.5.ffn.layers.1.weight'],
        official['transformer.encoder.layers.5.linear2.weight'],
    )
    # 91 category ids -> 80 classes: label 0 is id 1 (person), label 79 is id 90
    cls_weight = official['class_embed.0.weight']
    assert torch.equal(state['bbox_head.cls_branches.0.weight'][0], cls_weight[1])
    assert torch.equal(state['bbox_head.cls_branches.0.weight'][79], cls_weight[90])
    assert torch.equal(
        state['bbox_head.reg_branches.2.4.weight'], official['bbox_embed.2.layers.2.weight']
    )
    # input projections: 1x1 -> convs, the stride-2 3x3 -> extra_convs
    assert torch.equal(state['neck.convs.2.conv.bias'], official['input_proj.2.0.bias'])
    assert torch.equal(state['neck.extra_convs.0.gn.weight'], official['input_proj.3.1.weight'])
    assert torch.equal(
        state['backbone.layer3.5.bn2.running_var'],
        official['backbone.0.body.layer3.5.bn2.running_var'],
    )
    if two_stage:
        assert torch.equal(state['pos_trans_fc.weight'], official['transformer.pos_trans.weight'])
    else:
        assert torch.equal(state['query_embedding.weight'], official['query_embed.weight'])


def test_checkpoint_file_round_trip(tmp_path):
    """An official checkpoint file (with its pickled argparse args) converts
    through the command line and loads with mmdet's init_detector."""
    from mmdet.apis import init_detector

    tool = load_tool()
    official = official_state_dict(with_box_refine=True, two_stage=True)
    src = tmp_path / 'official.pth'
    dst = tmp_path / 'converted.pth'
    torch.save({'model': official, 'args': argparse.Namespace(two_stage=True), 'epoch': 49}, src)
    with mock.patch.object(sys, 'argv', ['convert', str(src), str(dst)]):
        tool.main()
    model = init_detector(
        osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_r50.py'),
        str(dst),
        device='cpu',
        cfg_options={'model.backbone.init_cfg': None, 'model.neck.bias': True},
    )
    assert torch.equal(
        model.state_dict()['memory_trans_fc.weight'], official['transformer.enc_output.weight']
    )


def test_unknown_key_and_broken_alias_are_rejected():
    tool = load_tool()
    with pytest.raises(KeyError, match='transformer.mystery'):
        tool.convert({'transformer.mystery.weight': torch.zeros(1)})
    state = {
        'bbox_embed.0.layers.0.weight': torch.zeros(2),
        'transformer.decoder.bbox_embed.0.layers.0.weight': torch.ones(2),
    }
    with pytest.raises(ValueError, match='alias'):
        tool.convert(state)
