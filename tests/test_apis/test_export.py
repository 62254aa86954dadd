"""mmdet_deform.apis.export: the exportable module equals the detector's own
prediction, configs and checkpoints are read (and refused) as documented,
and the ONNX export of random-weight plain and refine models matches eager
inference in ONNX Runtime at the export size and at other sizes."""

import json
import os.path as osp

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config

from mmdet_deform.apis.export import (
    ExportableDetector,
    export_detector,
    load_detector,
    model_variant,
    projecting_first,
    read_preprocessing,
    read_test_resize,
    resized_shape,
)

from ..conftest import REPO_ROOT

CONFIG_DIR = osp.join(REPO_ROOT, 'configs', 'deformable_detr')
CLASSES = ('circle', 'square', 'triangle', 'star', 'ring', 'cross')


def config_path(variant: str, dataset: str = 'shapes') -> str:
    return osp.join(CONFIG_DIR, f'{variant}_{dataset}.py')


def save_random_checkpoint(variant: str, path: str, seed: int = 0, meta_cfg: bool = True) -> str:
    """A checkpoint of the shapes config with seeded random weights, laid out
    as mmengine's Runner writes it (state_dict + meta with cfg and classes)."""
    from mmdet.apis import init_detector

    cfg = Config.fromfile(config_path(variant))
    model = init_detector(cfg, None, device='cpu')
    torch.manual_seed(seed)
    model.init_weights()
    meta = dict(dataset_meta=dict(classes=CLASSES))
    if meta_cfg:
        meta['cfg'] = cfg.pretty_text
    torch.save(dict(state_dict=model.state_dict(), meta=meta), path)
    return path


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('ckpt')
    return {v: save_random_checkpoint(v, str(root / f'{v}.pth')) for v in ('plain', 'refine')}


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen)


def assert_same_detections(actual, expected, score_atol: float, box_atol: float) -> None:
    """``(boxes, scores, labels)`` equal up to the tolerances, detections of
    tied scores in any order: random weights give many scores equal to
    within rounding, which two runtimes may rank either way. Each detection
    is matched to an unused expected one of the same label, a score within
    ``score_atol`` and the nearest box."""
    boxes, scores, labels = (np.asarray(a) for a in actual)
    exp_boxes, exp_scores, exp_labels = (np.asarray(e) for e in expected)
    assert boxes.shape == exp_boxes.shape and scores.shape == exp_scores.shape
    # both sorted by score: the sorted scores agree element by element
    np.testing.assert_allclose(scores, exp_scores, rtol=0, atol=score_atol)
    used = np.zeros(len(exp_scores), dtype=bool)
    for i in range(len(scores)):
        candidates = np.flatnonzero(
            ~used & (np.abs(exp_scores - scores[i]) <= 2 * score_atol) & (exp_labels == labels[i])
        )
        assert len(candidates), f'detection {i} (label {labels[i]}, score {scores[i]}) unmatched'
        distance = np.abs(exp_boxes[candidates] - boxes[i]).max(axis=1)
        best = candidates[np.argmin(distance)]
        assert distance.min() <= box_atol, (i, boxes[i], exp_boxes[best])
        used[best] = True


# ---------------------------------------------------------------- the module
@pytest.mark.parametrize('variant', ['plain', 'two_stage'])
def test_module_equals_the_detectors_own_prediction(checkpoints, tmp_path, variant):
    path = checkpoints.get(variant) or save_random_checkpoint(variant, str(tmp_path / 'c.pth'))
    model, cfg, _ = load_detector(config_path(variant), path)
    module = ExportableDetector(model, **read_preprocessing(cfg)).eval()
    img = image(168, 224)
    with torch.no_grad():
        boxes, scores, labels = module(img)
        # the detector's own path: data preprocessor, predict without rescaling
        sample = DetDataSample(metainfo=dict(img_shape=(168, 224), ori_shape=(168, 224)))
        data = model.data_preprocessor(dict(inputs=[img.permute(2, 0, 1)], data_samples=[sample]))
        expected = model.predict(data['inputs'], data['data_samples'], rescale=False)[0]
    n = model.bbox_head.test_cfg['max_per_img']
    assert boxes.shape == (n, 4) and scores.shape == (n,) and labels.shape == (n,)
    assert labels.dtype == torch.int64
    assert torch.all(scores[:-1] >= scores[1:])
    torch.testing.assert_close(scores, expected.pred_instances.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(boxes, expected.pred_instances.bboxes, rtol=1e-5, atol=1e-4)
    assert torch.equal(labels, expected.pred_instances.labels)


def test_padding_to_the_size_divisor_gives_the_padded_batch_result(checkpoints):
    model, cfg, _ = load_detector(config_path('plain'), checkpoints['plain'])
    module = ExportableDetector(model, **dict(read_preprocessing(cfg), pad_size_divisor=32))
    img = image(100, 90, seed=1)
    with torch.no_grad():
        boxes, scores, _ = module.eval()(img)
        sample = DetDataSample(metainfo=dict(img_shape=(100, 90), ori_shape=(100, 90)))
        model.data_preprocessor.pad_size_divisor = 32
        data = model.data_preprocessor(dict(inputs=[img.permute(2, 0, 1)], data_samples=[sample]))
        assert tuple(data['inputs'].shape[-2:]) == (128, 96)
        expected = model.predict(data['inputs'], data['data_samples'], rescale=False)[0]
    torch.testing.assert_close(scores, expected.pred_instances.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(boxes, expected.pred_instances.bboxes, rtol=1e-5, atol=1e-4)


def test_bf16_autocast_runs_the_detector_in_bf16_and_returns_float32(checkpoints):
    model, cfg, _ = load_detector(config_path('refine'), checkpoints['refine'])
    preprocessing = read_preprocessing(cfg)
    fp32 = ExportableDetector(model, **preprocessing).eval()
    bf16 = ExportableDetector(model, **preprocessing, autocast_dtype=torch.bfloat16).eval()
    img = image(168, 224)
    seen = set()
    hook = model.encoder.layers[0].ffn.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    with torch.no_grad():
        boxes, scores, labels = bf16(img)
        hook.remove()
        expected = fp32(img)
    assert seen == {torch.bfloat16}
    assert boxes.dtype == scores.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.all(scores[:-1] >= scores[1:])
    # bf16 keeps 8 bits of mantissa: scores move, by little
    score_diff = (scores - expected[1]).abs().max().item()
    assert 0 < score_diff < 2e-2, score_diff
    # outside the module autocast stays off
    assert not torch.is_autocast_enabled('cpu')


def test_precisions_are_refused_where_they_do_not_apply(checkpoints, tmp_path):
    model, cfg, _ = load_detector(config_path('plain'), checkpoints['plain'])
    with pytest.raises(ValueError, match='autocast_dtype must be None or torch.bfloat16'):
        ExportableDetector(model, **read_preprocessing(cfg), autocast_dtype=torch.float16)
    out = str(tmp_path / 'm.onnx')
    with pytest.raises(ValueError, match=r"precision='bf16' is for fmt='pt2' only"):
        export_detector(config_path('plain'), checkpoints['plain'], 'onnx', out, precision='bf16')
    pt2 = str(tmp_path / 'm.pt2')
    with pytest.raises(ValueError, match=r"precision='int8' is for fmt='onnx' only"):
        export_detector(config_path('plain'), checkpoints['plain'], 'pt2', pt2, precision='int8')
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'int8'\)"):
        export_detector(config_path('plain'), checkpoints['plain'], 'pt2', out, precision='fp16')
    with pytest.raises(ValueError, match='calibration_num must be >= 1, got 0'):
        export_detector(
            config_path('plain'), checkpoints['plain'], 'onnx', out, precision='int8',
            calibration_num=0,
        )  # fmt: skip
    assert not osp.exists(out) and not osp.exists(pt2)


# ---------------------------------------------------------------- configs
def test_reads_preprocessing_and_resize_of_the_configs():
    cfg = Config.fromfile(config_path('two_stage'))
    assert read_preprocessing(cfg) == dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1,
        pad_value=0.0,
    )
    assert read_test_resize(cfg) == dict(
        scale=[224, 224], keep_ratio=True, interpolation='bilinear'
    )
    coco = Config.fromfile(config_path('two_stage', 'r50'))
    assert read_test_resize(coco)['scale'] == [1333, 800]
    assert model_variant(cfg.model) == 'two_stage'
    assert model_variant(Config.fromfile(config_path('plain')).model) == 'plain'
    assert model_variant(Config.fromfile(config_path('refine')).model) == 'refine'


def test_refuses_a_test_pipeline_it_cannot_repeat():
    cfg = Config.fromfile(config_path('plain'))
    cfg.test_dataloader.dataset.pipeline.insert(2, dict(type='RandomFlip', prob=1.0))
    with pytest.raises(ValueError, match='RandomFlip'):
        read_test_resize(cfg)
    cfg = Config.fromfile(config_path('plain'))
    cfg.test_dataloader.dataset.pipeline[1] = dict(type='Resize', scale_factor=0.5)
    with pytest.raises(ValueError, match='scale_factor'):
        read_test_resize(cfg)


@pytest.mark.parametrize('size', [(96, 128), (320, 320), (37, 500), (1000, 20)])
def test_resized_shape_is_mmcv_resize(size):
    from mmdet.datasets.transforms import Resize

    resize = dict(scale=[224, 224], keep_ratio=True, interpolation='bilinear')
    results = Resize(scale=(224, 224), keep_ratio=True)(
        dict(img=np.zeros((*size, 3), np.uint8), img_shape=size)
    )
    assert resized_shape(*size, resize) == tuple(results['img_shape'])


# ---------------------------------------------------------------- checkpoints
def test_a_checkpoint_of_another_variant_is_refused(checkpoints):
    # two-stage has other parameters: named with both files
    with pytest.raises(ValueError, match=r'plain\.pth.*two_stage_shapes\.py|two_stage') as err:
        load_detector(config_path('two_stage'), checkpoints['plain'])
    assert 'plain.pth' in str(err.value)
    # plain and refine have the same parameter names: the checkpoint's config tells
    with pytest.raises(ValueError, match='trained as a plain Deformable DETR'):
        load_detector(config_path('refine'), checkpoints['plain'])


def test_a_checkpoint_without_its_config_is_checked_by_its_parameters(tmp_path):
    path = save_random_checkpoint('two_stage', str(tmp_path / 'bare.pth'), meta_cfg=False)
    with pytest.raises(ValueError, match='missing: query_embedding.weight'):
        load_detector(config_path('plain'), path)
    cfg = Config.fromfile(config_path('two_stage'))
    cfg.model.bbox_head.num_classes = 80
    with pytest.raises(ValueError, match=r'shape: bbox_head.cls_branches.0.weight \(6, 128\)'):
        load_detector(cfg, path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        load_detector(config_path('plain'), str(tmp_path / 'none.pth'))


def test_export_refuses_an_unsupported_opset_and_existing_files(checkpoints, tmp_path):
    with pytest.raises(ValueError, match='opset_version must be an int from 18 to 23'):
        export_detector(config_path('plain'), checkpoints['plain'], 'onnx', 'm.onnx', 17)
    out = tmp_path / 'm.onnx'
    out.write_bytes(b'precious')
    with pytest.raises(FileExistsError, match='m.onnx'):
        export_detector(config_path('plain'), checkpoints['plain'], 'onnx', str(out))
    assert out.read_bytes() == b'precious'


# ---------------------------------------------------------------- ONNX parity
@pytest.mark.slow
@pytest.mark.parametrize(
    'variant,msda_form',
    [('plain', 'grid_sample'), ('refine', 'grid_sample'), ('refine', 'deform_conv')],
)
def test_onnx_export_matches_eager_at_any_size(checkpoints, tmp_path, variant, msda_form):
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    out = str(tmp_path / f'{variant}.onnx')
    meta = export_detector(
        config_path(variant), checkpoints[variant], 'onnx', out, msda_form=msda_form
    )
    assert meta['msda_form'] == msda_form
    with open(out + '.json') as f:
        assert json.load(f) == meta
    assert meta['variant'] == variant and meta['classes'] == list(CLASSES)
    assert meta['input']['dynamic'] and meta['input']['min_hw'][0] <= 96
    domains = {node.domain for node in onnx.load(out).graph.node}
    assert domains <= {'', 'ai.onnx'}, domains
    model, cfg, _ = load_detector(config_path(variant), checkpoints[variant])
    module = ExportableDetector(model, **read_preprocessing(cfg)).eval()
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    # the export's example size (a 3:4 image resized to 168x224) and others
    for h, w in ((168, 224), (224, 160), (97, 130)):
        img = image(h, w, seed=h)
        with torch.no_grad():
            expected = [t.numpy() for t in module(img)]
        boxes, scores, labels = session.run(None, {'image': img.numpy()})
        assert_same_detections((boxes, scores, labels), expected, score_atol=1e-5, box_atol=1e-3)


def test_onnx_export_projects_the_decoders_value_first_and_restores_the_model(checkpoints):
    model, _, _ = load_detector(config_path('refine'), checkpoints['refine'])
    cross = [layer.cross_attn for layer in model.decoder.layers]
    assert cross and all(m.sample_then_project for m in cross)
    self_attn = [layer.self_attn for layer in model.encoder.layers]
    assert not any(m.sample_then_project for m in self_attn)
    with projecting_first(model):
        assert not any(m.sample_then_project for m in cross + self_attn)
    assert all(m.sample_then_project for m in cross)
    with pytest.raises(RuntimeError, match='inside'), projecting_first(model):
        raise RuntimeError('inside')
    assert all(m.sample_then_project for m in cross)
    assert not any(m.sample_then_project for m in self_attn)


def test_detection_matching_allows_tied_order_only():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]], dtype=np.float32)
    scores = np.array([0.5, 0.5, 0.3], dtype=np.float32)
    labels = np.array([1, 1, 2])
    swapped = (boxes[[1, 0, 2]], scores[[1, 0, 2]], labels[[1, 0, 2]])
    assert_same_detections(swapped, (boxes, scores, labels), score_atol=1e-5, box_atol=1e-3)
    moved = boxes.copy()
    moved[0, 2] += 0.01
    with pytest.raises(AssertionError):
        assert_same_detections((moved, scores, labels), (boxes, scores, labels), 1e-5, 1e-3)
    relabelled = labels.copy()
    relabelled[2] = 0
    with pytest.raises(AssertionError):
        assert_same_detections((boxes, scores, relabelled), (boxes, scores, labels), 1e-5, 1e-3)
