"""``MultiScaleDeformableAttention`` is a drop-in for mmcv's module of the
same name (mmcv is only the test oracle here): same state dict, same
initialisation, same output and gradients."""

import importlib
import math

import pytest
import torch
from mmcv.ops import MultiScaleDeformableAttention as MMCVAttention
from torch.testing import assert_close

from mmdet_deform.ops import MultiScaleDeformableAttention

from .msda_inputs import DEVICES, level_metadata

EMBED_DIMS, NUM_HEADS, NUM_LEVELS, NUM_POINTS = 32, 4, 2, 3
LEVELS = ((6, 7), (3, 4))


def make_pair(device='cpu', **kwargs):
    """mmcv's module with non-trivial weights, and ours loaded from its state
    dict with strict=True; both float64."""
    args = dict(
        embed_dims=EMBED_DIMS, num_heads=NUM_HEADS, num_levels=NUM_LEVELS,
        num_points=NUM_POINTS, dropout=0.0,
    )  # fmt: skip
    args.update(kwargs)
    torch.manual_seed(0)
    theirs = MMCVAttention(**args)
    with torch.no_grad():  # offsets that vary with the query, non-uniform weights
        theirs.sampling_offsets.weight.normal_(std=0.2)
        theirs.attention_weights.weight.normal_(std=0.5)
        theirs.attention_weights.bias.normal_(std=0.5)
        theirs.value_proj.bias.normal_(std=0.1)
    ours = MultiScaleDeformableAttention(**args)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.double().to(device), ours.double().to(device)


def make_inputs(ref_dim, batch_first, self_attention, device='cpu', bs=3, num_queries=10):
    gen = torch.Generator().manual_seed(ref_dim + 10 * batch_first + 100 * self_attention)
    shapes, starts = level_metadata(LEVELS)
    num_keys = int((shapes[:, 0] * shapes[:, 1]).sum())
    if self_attention:
        num_queries = num_keys
    query = torch.randn(bs, num_queries, EMBED_DIMS, generator=gen, dtype=torch.float64)
    value = None if self_attention else torch.randn(bs, num_keys, EMBED_DIMS, generator=gen)
    query_pos = torch.randn(bs, num_queries, EMBED_DIMS, generator=gen, dtype=torch.float64)
    identity = torch.randn(bs, num_queries, EMBED_DIMS, generator=gen, dtype=torch.float64)
    # padding: the last key columns of each level of sample 0 and 2
    mask = torch.zeros(bs, num_keys, dtype=torch.bool)
    mask[0, 5:num_keys:7] = True
    mask[2, -4:] = True
    ref = torch.rand(bs, num_queries, NUM_LEVELS, ref_dim, generator=gen, dtype=torch.float64)
    if ref_dim == 4:  # boxes (cx, cy, w, h)
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    tensors = dict(query=query, value=value, query_pos=query_pos, identity=identity)
    for name, t in tensors.items():
        if t is not None:
            t = t.double().to(device)
            tensors[name] = t if batch_first else t.transpose(0, 1)  # (n, bs, c)
    return dict(
        **tensors,
        key_padding_mask=mask.to(device),
        reference_points=ref.to(device),
        spatial_shapes=shapes.to(device),
        level_start_index=starts.to(device),
    )


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('ref_dim', [2, 4])
@pytest.mark.parametrize('batch_first', [False, True])
@pytest.mark.parametrize('self_attention', [False, True], ids=['cross', 'self'])
def test_matches_mmcv(device, ref_dim, batch_first, self_attention):
    theirs, ours = make_pair(device, batch_first=batch_first)
    inputs = make_inputs(ref_dim, batch_first, self_attention, device)
    outputs, grads = [], []
    for module in (theirs, ours):
        args = {k: (v.clone().requires_grad_() if k == 'query' else v) for k, v in inputs.items()}
        out = module(**args)
        out.square().sum().backward()
        outputs.append(out)
        grads.append(dict(query=args['query'].grad))
        grads[-1].update((n, p.grad) for n, p in module.named_parameters())
    expected_shape = inputs['query'].shape
    assert outputs[1].shape == expected_shape
    assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-10)
    assert grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-9, msg=name)


def test_state_dict_is_interchangeable():
    theirs, ours = make_pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert value.shape == theirs.state_dict()[key].shape, key
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # value_proj_ratio changes the projection sizes the same way
    theirs = MMCVAttention(embed_dims=32, num_heads=4, value_proj_ratio=0.5)
    MultiScaleDeformableAttention(embed_dims=32, num_heads=4, value_proj_ratio=0.5).load_state_dict(
        theirs.state_dict(), strict=True
    )


def test_init_weights_matches_mmcv():
    theirs = MMCVAttention(embed_dims=64, num_heads=8, num_levels=4, num_points=4)
    theirs.init_weights()
    ours = MultiScaleDeformableAttention(embed_dims=64, num_heads=8, num_levels=4, num_points=4)
    ours.init_weights()
    # deterministic parts are equal
    for name in ('sampling_offsets.weight', 'sampling_offsets.bias', 'attention_weights.weight',
                 'attention_weights.bias', 'value_proj.bias', 'output_proj.bias'):  # fmt: skip
        assert_close(ours.state_dict()[name], theirs.state_dict()[name], rtol=0, atol=0, msg=name)
    # projections are Xavier-uniform
    for proj in (ours.value_proj, ours.output_proj):
        bound = math.sqrt(6 / (proj.in_features + proj.out_features))
        assert proj.weight.abs().max() <= bound
        assert proj.weight.std() > bound / 3  # not zero / constant


def test_accepts_any_im2col_step_and_batch_size():
    _, ours = make_pair(im2col_step=7)
    assert ours.im2col_step == 7
    inputs = make_inputs(2, batch_first=False, self_attention=False, bs=5)
    assert ours(**inputs).shape == inputs['query'].shape


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='embed_dims must be divisible by num_heads'):
        MultiScaleDeformableAttention(embed_dims=30, num_heads=4)
    _, ours = make_pair()
    inputs = make_inputs(2, batch_first=False, self_attention=False)
    bad = dict(inputs, reference_points=inputs['reference_points'][..., :1].repeat(1, 1, 1, 3))
    with pytest.raises(ValueError, match=r'reference_points must have shape .*2 or 4'):
        ours(**bad)
    with pytest.raises(ValueError, match='value_proj_ratio'):
        MultiScaleDeformableAttention(embed_dims=32, num_heads=8, value_proj_ratio=0.5625)
    with pytest.raises(ValueError, match='needs reference_points'):
        ours(**dict(inputs, reference_points=None))


def test_registered_in_our_scope_only():
    from mmengine.registry import MODELS as MMENGINE_MODELS
    from mmengine.registry import DefaultScope

    from mmdet_deform.registry import MODELS

    # the scope our configs set (default_scope='mmdet_deform'); mmengine's
    # Registry.build looks a bare name up in the current default scope, which
    # other tests may leave at 'mmdet'
    with DefaultScope.overwrite_default_scope('mmdet_deform'):
        module = MODELS.build(
            dict(type='MultiScaleDeformableAttention', embed_dims=32, num_heads=4)
        )
    assert type(module) is MultiScaleDeformableAttention
    module = MODELS.build(dict(type='mmdet_deform.MultiScaleDeformableAttention', embed_dims=32))
    assert type(module) is MultiScaleDeformableAttention
    # mmcv's own registration is untouched
    assert MMENGINE_MODELS.get('MultiScaleDeformableAttention') is MMCVAttention


def test_autocast_bfloat16_cpu():
    """Under CPU autocast the projections run in bf16; the op gets bf16 values
    with float32 locations, so it runs in float32 (locations keep their
    precision) and the output stays close to the float32 one."""
    theirs, ours = make_pair()
    ours = ours.float()
    inputs = make_inputs(2, batch_first=True, self_attention=False)
    inputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}  # fmt: skip
    ours.batch_first = True
    expected = ours(**inputs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ours(**inputs)
    assert torch.isfinite(out).all()
    assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_autocast_bfloat16_keeps_float32_locations(monkeypatch):
    """Under CPU bf16 autocast the sampling locations reach the op in float32.

    On a 512-pixel-wide map, locations rounded to bf16 (8 significant bits)
    are off by up to one pixel; the output would then differ from the float32
    one by O(1), while with float32 locations only the bf16 projections
    differ. The second half checks that this setup does detect rounded
    locations, so the tolerance of the first half means something.
    """
    # the module file, not the function of the same name that ops/__init__ exports
    msda_module = importlib.import_module('mmdet_deform.ops.ms_deform_attn')
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(
        embed_dims=32, num_heads=4, num_levels=1, num_points=2, dropout=0.0, batch_first=True
    )
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(std=0.5)
    shapes, starts = level_metadata(((2, 512),))
    query = torch.randn(2, 40, 32)
    value = torch.randn(2, 2 * 512, 32)
    reference_points = torch.rand(2, 40, 1, 2)
    kwargs = dict(
        value=value,
        identity=torch.zeros_like(query),
        reference_points=reference_points,
        spatial_shapes=shapes,
        level_start_index=starts,
    )
    expected = module(query, **kwargs)

    op = msda_module.ms_deform_attn
    seen = []

    def recording_op(value, spatial_shapes, level_start_index, locations, weights):
        seen.append(locations.dtype)
        return op(value, spatial_shapes, level_start_index, locations, weights)

    monkeypatch.setattr(msda_module, 'ms_deform_attn', recording_op)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = module(query, **kwargs)
    assert seen == [torch.float32]
    error = (out.float() - expected).abs().max().item()
    assert error < 3e-2, error

    def rounding_op(value, spatial_shapes, level_start_index, locations, weights):
        # what casting the locations to value's dtype (bf16) used to do
        return op(value, spatial_shapes, level_start_index, locations.bfloat16(), weights)

    monkeypatch.setattr(msda_module, 'ms_deform_attn', rounding_op)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        rounded = module(query, **kwargs)
    assert (rounded.float() - expected).abs().max().item() > 10 * error
