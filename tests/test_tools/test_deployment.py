"""tools/deployment: a two-stage checkpoint trained for a few iterations,
exported to ONNX and to an AOTInductor package, run by run_exported.py
(without mmdet, mmcv or mmengine) gives demo/image_demo.py's predictions, on
an image of the export's size and on one of another size; bad input stops
both tools with exit code 2 and a message naming the file."""

import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from ..conftest import REPO_ROOT
from .conftest import CONFIG, load_tool, run_tool, smoke_options, tool_env

pytestmark = pytest.mark.slow

EXPORT = 'tools/deployment/export.py'
RUNNER = 'tools/deployment/run_exported.py'
OPENMMLAB = {'mmdet', 'mmcv', 'mmengine', 'mmdet_deform'}


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> str:
    """demo.jpg resizes to the export's example size (168x224), tall.png to
    224x168."""
    root = tmp_path_factory.mktemp('deploy_images')
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cv2.circle(img, (40, 50), 20, (0, 0, 255), -1)
    cv2.imwrite(str(root / 'demo.jpg'), img)
    img = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    cv2.rectangle(img, (10, 20), (60, 90), (0, 255, 0), -1)
    cv2.imwrite(str(root / 'tall.png'), img)
    return str(root)


@pytest.fixture(scope='module')
def demo_preds(dist_run, images, tmp_path_factory) -> dict:
    assert dist_run.proc.returncode == 0, 'the training run failed'
    out_dir = str(tmp_path_factory.mktemp('demo_out'))
    proc = run_tool(
        ['demo/image_demo.py', images, CONFIG, '--weights', dist_run.checkpoint]
        + ['--out-dir', out_dir, '--device', 'cpu', '--no-save-vis']
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return {s: read_preds(osp.join(out_dir, 'preds', f'{s}.json')) for s in ('demo', 'tall')}


def export(dist_run, fmt: str, out: str, *options: str) -> str:
    proc = run_tool([EXPORT, CONFIG, dist_run.checkpoint, '--format', fmt, '--out', out, *options])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f'exported a two_stage Deformable DETR to {out}' in proc.stdout
    return out


@pytest.fixture(scope='module')
def onnx_model(dist_run, tmp_path_factory) -> str:
    for name in ('onnx', 'onnxscript', 'onnxruntime'):  # the deploy extra
        pytest.importorskip(name)
    return export(dist_run, 'onnx', str(tmp_path_factory.mktemp('onnx') / 'model.onnx'))


@pytest.fixture(scope='module')
def onnx_deform_conv_model(dist_run, tmp_path_factory) -> str:
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(name)
    out = str(tmp_path_factory.mktemp('onnx_deform_conv') / 'model.onnx')
    return export(dist_run, 'onnx', out, '--msda-form', 'deform_conv')


@pytest.fixture(scope='module')
def onnx_int8_model(dist_run, images, tmp_path_factory) -> str:
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(name)
    out = str(tmp_path_factory.mktemp('onnx_int8') / 'model.onnx')
    int8 = ['--precision', 'int8', '--calib-images', images]  # calibrated on its two images
    return export(dist_run, 'onnx', out, '--msda-form', 'deform_conv', *int8)


@pytest.fixture(scope='module')
def pt2_model(dist_run, tmp_path_factory) -> str:
    return export(dist_run, 'pt2', str(tmp_path_factory.mktemp('pt2') / 'model.pt2'))


@pytest.fixture(scope='module')
def pt2_bf16_model(dist_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp('pt2_bf16') / 'model.pt2')
    return export(dist_run, 'pt2', out, '--precision', 'bf16')


def read_preds(path: str) -> dict:
    with open(path) as f:
        preds = json.load(f)
    assert sorted(preds) == ['bboxes', 'labels', 'scores']
    return {k: np.asarray(v) for k, v in preds.items()}


def run_runner(*args: str) -> subprocess.CompletedProcess:
    """run_exported.py in a fresh interpreter that then prints its top-level modules."""
    code = (
        'import json, runpy, sys\n'
        f'sys.argv = {[RUNNER, *args]!r}\n'
        f'runpy.run_path({RUNNER!r}, run_name="__main__")\n'
        'print("MODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})))\n'
    )
    return subprocess.run(
        [sys.executable, '-c', code],
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def loaded_modules(proc: subprocess.CompletedProcess) -> set:
    line = next(s for s in proc.stdout.splitlines() if s.startswith('MODULES '))
    return set(json.loads(line[len('MODULES ') :]))


def assert_same_detections(actual: dict, expected: dict) -> None:
    """Scores within 1e-4, boxes within 0.05 px and equal labels for every
    detection above 0.05 (at least the top 10)."""
    assert len(actual['scores']) == len(expected['scores'])
    np.testing.assert_allclose(actual['scores'], expected['scores'], rtol=0, atol=1e-4)
    keep = max(int((expected['scores'] > 0.05).sum()), 10)
    print(
        f'{keep} compared: max |score diff| '
        f'{np.abs(actual["scores"] - expected["scores"]).max():.2e}, max |box diff| '
        f'{np.abs(actual["bboxes"][:keep] - expected["bboxes"][:keep]).max():.2e} px, '
        f'top score {expected["scores"][0]:.3f}'
    )
    np.testing.assert_array_equal(actual['labels'][:keep], expected['labels'][:keep])
    np.testing.assert_allclose(
        actual['bboxes'][:keep], expected['bboxes'][:keep], rtol=0, atol=0.05
    )


@pytest.mark.parametrize(
    'model_name,runtime',
    [
        ('onnx_model', 'onnxruntime'),
        ('onnx_model', 'openvino'),
        ('onnx_deform_conv_model', 'onnxruntime'),
        ('pt2_model', 'torch'),
    ],
)
def test_runner_matches_image_demo(request, model_name, runtime, images, demo_preds, tmp_path):
    model = request.getfixturevalue(model_name)
    fmt = model_name.split('_')[0]
    with open(model + '.json') as f:
        meta = json.load(f)
    assert meta['format'] == fmt and meta['variant'] == 'two_stage'
    if fmt == 'onnx':
        form = 'deform_conv' if 'deform_conv' in model_name else 'grid_sample'
        assert meta['msda_form'] == form
        ops = {node.op_type for node in pytest.importorskip('onnx').load(model).graph.node}
        # the encoder's attention as DeformConv, the decoder's with GridSample
        assert ('DeformConv' in ops) == (form == 'deform_conv') and 'GridSample' in ops
    assert meta['input']['dynamic'] and meta['resize']['scale'] == [224, 224]
    assert meta['input']['feature_strides'] == [8, 16, 32, 64]
    # a two-stage model selects num_queries proposals from the encoder's tokens
    assert (
        meta['input']['min_tokens']
        == Config.fromfile(osp.join(REPO_ROOT, CONFIG)).model.num_queries
    )
    out_dir = str(tmp_path / 'out')
    inputs = [osp.join(images, 'demo.jpg'), osp.join(images, 'tall.png')]
    options = ['--runtime', runtime] if fmt == 'onnx' else []
    proc = run_runner(model, *inputs, '--out-dir', out_dir, '--threads', '1', *options)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    modules = loaded_modules(proc)
    assert not modules & OPENMMLAB, modules & OPENMMLAB
    assert runtime in modules
    if fmt == 'onnx':
        assert 'torch' not in modules
        assert ({'onnxruntime', 'openvino'} - {runtime}).isdisjoint(modules)
    for stem in ('demo', 'tall'):
        actual = read_preds(osp.join(out_dir, 'preds', f'{stem}.json'))
        assert_same_detections(actual, demo_preds[stem])
    vis = cv2.imread(osp.join(out_dir, 'vis', 'tall.png'))
    assert vis is not None and vis.shape == (120, 90, 3)


def matched_detections(
    actual: dict, expected: dict, top: int, score_atol: float, box_atol: float
) -> list:
    """Box differences (px) of the first ``top`` ``actual`` detections that
    have an unused ``expected`` one (at any rank) of the same label, a score
    within ``score_atol`` and a box within ``box_atol``."""
    used = np.zeros(len(expected['scores']), dtype=bool)
    diffs = []
    for box, score, label in zip(
        actual['bboxes'][:top], actual['scores'][:top], actual['labels'][:top]
    ):
        distance = np.abs(expected['bboxes'] - box).max(axis=1)
        ok = (
            ~used
            & (expected['labels'] == label)
            & (np.abs(expected['scores'] - score) <= score_atol)
            & (distance <= box_atol)
        )
        if ok.any():
            best = np.flatnonzero(ok)[np.argmin(distance[ok])]
            used[best] = True
            diffs.append(float(distance[best]))
    return diffs


def test_bf16_package_is_close_to_image_demo(pt2_bf16_model, images, demo_preds, tmp_path):
    with open(pt2_bf16_model + '.json') as f:
        assert json.load(f)['precision'] == 'bf16'
    out_dir = str(tmp_path / 'out')
    inputs = [osp.join(images, 'demo.jpg'), osp.join(images, 'tall.png')]
    proc = run_runner(pt2_bf16_model, *inputs, '--out-dir', out_dir, '--threads', '1')
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    top = 40
    for stem in ('demo', 'tall'):
        actual = read_preds(osp.join(out_dir, 'preds', f'{stem}.json'))
        expected = demo_preds[stem]
        # the checkpoint is trained for a few iterations only, so its scores
        # are near-ties (all about 0.02-0.03): bf16 rounding may swap which
        # encoder proposals make the two-stage top-k and which detections make
        # the final one. So the sorted scores are compared, and most (not all)
        # of the top detections must have an fp32 twin: same label, score
        # within 1e-3, box within 0.5 px (a wrong bf16 graph matches none)
        score_diff = np.abs(actual['scores'] - expected['scores']).max()
        assert score_diff < 2e-3
        assert score_diff > 0  # bf16 did run
        diffs = matched_detections(actual, expected, top, score_atol=1e-3, box_atol=0.5)
        print(
            f'{stem}: max |sorted score diff| {score_diff:.2e}, {len(diffs)} of the top {top} '
            f'matched, max |box diff| {max(diffs, default=0):.2e} px'
        )
        assert len(diffs) >= 0.9 * top


def test_int8_file_is_close_to_image_demo(
    onnx_int8_model, onnx_deform_conv_model, images, demo_preds, tmp_path
):
    from mmdet_deform.apis.quantize import quantized_operators

    with open(onnx_int8_model + '.json') as f:
        meta = json.load(f)
    assert meta['precision'] == 'int8' and meta['msda_form'] == 'deform_conv'
    # every convolution and Linear layer of the float32 file runs in int8; the
    # float32 matrix products left multiply two activations (the decoder's
    # self-attention: two per layer)
    float32 = quantized_operators(onnx_deform_conv_model)
    decoder_layers = Config.fromfile(CONFIG).model.decoder.num_layers
    assert meta['quantization'] == dict(
        convs=float32['float_convs'],
        linears=float32['float_matmuls'] - 2 * decoder_layers,
        float_convs=0,
        float_matmuls=2 * decoder_layers,
        calibration_images=2,
    )
    out_dir = str(tmp_path / 'out')
    inputs = [osp.join(images, 'demo.jpg'), osp.join(images, 'tall.png')]
    proc = run_runner(onnx_int8_model, *inputs, '--out-dir', out_dir, '--threads', '1')
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not loaded_modules(proc) & (OPENMMLAB | {'torch'})
    top = 40
    for stem in ('demo', 'tall'):
        actual = read_preds(osp.join(out_dir, 'preds', f'{stem}.json'))
        expected = demo_preds[stem]
        # near-tied scores (see the bf16 test): sorted scores, and twins of
        # most top detections at any rank
        score_diff = np.abs(actual['scores'] - expected['scores']).max()
        diffs = matched_detections(actual, expected, top, score_atol=1e-3, box_atol=0.5)
        print(
            f'{stem}: max |sorted score diff| {score_diff:.2e}, {len(diffs)} of the top {top} '
            f'matched, max |box diff| {max(diffs, default=0):.2e} px'
        )
        assert 0 < score_diff < 2e-3  # int8 did run
        assert len(diffs) >= 0.9 * top


EVALUATE = 'tools/deployment/evaluate_exported.py'


def mean_ap(text: str) -> float:
    return float(re.search(r'coco/bbox_mAP: (-?[\d.]+)', text).group(1))


def test_evaluate_exported_gives_the_checkpoints_validation_map(
    dist_run, onnx_deform_conv_model, onnx_int8_model
):
    """The float32 file scores the mAP the training run's validation gave
    its checkpoint (same 8 images, same metric); the int8 file about it."""
    expected = mean_ap(dist_run.log)
    found = {}
    for name, model in (('fp32', onnx_deform_conv_model), ('int8', onnx_int8_model)):
        proc = run_tool(
            [EVALUATE, model, CONFIG, '--cfg-options', *smoke_options(dist_run.data_root)]
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert f'{model} (onnx, {name}, onnxruntime) on the test set' in proc.stdout
        found[name] = mean_ap(proc.stdout)
    print(f'validation mAP {expected}, exported files {found}')
    assert found['fp32'] == expected
    assert abs(found['int8'] - expected) <= 0.01


def test_evaluate_exported_scores_the_ground_truth_as_perfect(tmp_path):
    """A stand-in model that returns every image's ground truth (in the
    resized image's pixels, as an exported graph does) scores mAP 1; shifted
    by 20% of the image, 0."""
    from mmengine.registry import init_default_scope

    from mmdet_deform.apis.export import read_test_resize
    from mmdet_deform.registry import DATASETS

    tool = load_tool(EVALUATE)
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(
        {
            'test_dataloader.dataset.data_root': str(tmp_path),
            'test_dataloader.dataset.generate.num_images': 3,
        }
    )
    meta = dict(resize=read_test_resize(cfg))
    init_default_scope(cfg.default_scope)
    infos = [DATASETS.build(cfg.test_dataloader.dataset).get_data_info(i) for i in range(3)]

    class GroundTruth:
        def __init__(self, shift: float) -> None:
            self.calls, self.shift = 0, shift

        def __call__(self, image):
            info = infos[self.calls]
            self.calls += 1
            scale = image.shape[1] / info['width'], image.shape[0] / info['height']
            boxes = np.array([obj['bbox'] for obj in info['instances']], np.float32)
            boxes = boxes * np.array(scale * 2, np.float32) + self.shift * image.shape[1]
            labels = np.array([obj['bbox_label'] for obj in info['instances']], np.int64)
            return boxes, np.linspace(0.9, 0.5, len(boxes), dtype=np.float32), labels

    assert tool.evaluate(GroundTruth(0.0), meta, cfg)['coco/bbox_mAP'] == 1.0
    assert tool.evaluate(GroundTruth(0.2), meta, cfg)['coco/bbox_mAP'] == 0.0


def test_evaluate_exported_names_bad_input(onnx_model, tmp_path):
    orphan = str(tmp_path / 'orphan.onnx')
    shutil.copy(onnx_model, orphan)  # no JSON beside it
    proc = run_tool([EVALUATE, orphan, CONFIG])
    assert proc.returncode == 2 and f"'{orphan}.json' not found" in proc.stderr
    proc = run_tool([EVALUATE, onnx_model, str(tmp_path / 'none.py')])
    assert proc.returncode == 2 and 'config not found' in proc.stderr


# ---------------------------------------------------------------- bad input
def test_runner_names_bad_images(onnx_model, images, tmp_path):
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image')
    good = osp.join(images, 'demo.jpg')
    out_dir = tmp_path / 'out'
    proc = run_tool([RUNNER, onnx_model, good, str(empty), str(text), '--out-dir', str(out_dir)])
    assert proc.returncode == 2
    assert 'nothing was run' in proc.stderr
    assert f"image '{empty}' is empty" in proc.stderr
    assert f"image '{text}' is not an image OpenCV can decode" in proc.stderr
    assert not out_dir.exists()


def test_runner_refuses_a_model_that_does_not_match_its_json(onnx_model, images, tmp_path):
    good = osp.join(images, 'demo.jpg')
    # the file changed after export
    changed = str(tmp_path / 'changed.onnx')
    shutil.copy(onnx_model, changed)
    shutil.copy(onnx_model + '.json', changed + '.json')
    with open(changed, 'ab') as f:
        f.write(b'\0')
    proc = run_tool([RUNNER, changed, good, '--out-dir', str(tmp_path / 'o1')])
    assert proc.returncode == 2
    assert f"model '{changed}' does not match '{changed}.json'" in proc.stderr
    # no JSON beside the model
    os.remove(changed + '.json')
    proc = run_tool([RUNNER, changed, good, '--out-dir', str(tmp_path / 'o2')])
    assert proc.returncode == 2 and f"'{changed}.json' not found" in proc.stderr
    # a JSON of another format
    renamed = str(tmp_path / 'model.pt2')
    shutil.copy(onnx_model, renamed)
    shutil.copy(onnx_model + '.json', renamed + '.json')
    proc = run_tool([RUNNER, renamed, good, '--out-dir', str(tmp_path / 'o3')])
    assert proc.returncode == 2
    assert f"describes a onnx model but '{renamed}' is a pt2 file" in proc.stderr


def test_runner_runs_onnx_only_in_openvino(pt2_model, images, tmp_path):
    out_dir = tmp_path / 'out'
    good = osp.join(images, 'demo.jpg')
    proc = run_tool([RUNNER, pt2_model, good, '--out-dir', str(out_dir), '--runtime', 'openvino'])
    assert proc.returncode == 2
    assert f"--runtime openvino runs .onnx models; '{pt2_model}' is a .pt2 package" in proc.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize(
    'model_name, reason',
    [
        ('onnx_deform_conv_model', '--msda-form deform_conv (DeformConv), which OpenVINO does not'),
        ('onnx_int8_model', '--precision int8, quantized for ONNX Runtime'),
    ],
)
def test_runner_refuses_files_openvino_does_not_run(request, model_name, reason, images, tmp_path):
    model = request.getfixturevalue(model_name)
    out_dir = tmp_path / 'out'
    good = osp.join(images, 'demo.jpg')
    proc = run_tool([RUNNER, model, good, '--out-dir', str(out_dir), '--runtime', 'openvino'])
    assert proc.returncode == 2
    assert f"'{model}' was exported with {reason}" in proc.stderr
    assert not out_dir.exists()


def test_openvino_model_computes_in_the_precision_asked(onnx_model):
    """f32 by default (the runner), bf16 on request (the benchmark's bf16 row)."""
    pytest.importorskip('openvino')
    runner = load_tool(RUNNER)

    def precision(model) -> str:
        return model.compiled.get_property('INFERENCE_PRECISION_HINT').to_string()

    assert precision(runner.OpenVinoModel(onnx_model, 1)) == 'f32'
    assert precision(runner.OpenVinoModel(onnx_model, 1, 'bf16')) == 'bf16'
    with pytest.raises(runner.InputError, match="precision must be 'f32' or 'bf16', got 'fp16'"):
        runner.OpenVinoModel(onnx_model, 1, 'fp16')


def test_runner_refuses_sizes_the_model_does_not_take(tmp_path):
    runner = load_tool(RUNNER)
    meta = dict(input=dict(dynamic=True, min_hw=[65, 65], max_hw=[None, None]))
    assert runner.size_problem(224, 168, meta) is None
    assert 'at least 65x65' in runner.size_problem(64, 300, meta)
    # two-stage: 300 proposals need 300 encoder positions (13^2 + 7^2 + 4^2 + 2^2 = 238 at 100x100)
    two_stage = dict(input=dict(meta['input'], feature_strides=[8, 16, 32, 64], min_tokens=300))
    assert '238 encoder positions' in runner.size_problem(100, 100, two_stage)
    assert runner.size_problem(150, 150, two_stage) is None
    static = dict(input=dict(dynamic=False, min_hw=[168, 224], max_hw=[168, 224]))
    assert runner.size_problem(168, 224, static) is None
    assert 'exported for exactly 168x224' in runner.size_problem(224, 168, static)


@pytest.mark.parametrize('size', [(96, 128), (120, 90), (33, 401), (500, 17)])
def test_runner_resize_is_the_test_pipeline_resize(size):
    from mmdet.datasets.transforms import Resize

    runner = load_tool(RUNNER)
    img = np.random.default_rng(size[0]).integers(0, 255, (*size, 3), dtype=np.uint8)
    resize = dict(scale=[224, 224], keep_ratio=True, interpolation='bilinear')
    actual, scale_factor = runner.resize_image(img, resize)
    expected = Resize(scale=(224, 224), keep_ratio=True)(dict(img=img, img_shape=size))
    np.testing.assert_array_equal(actual, expected['img'])
    assert scale_factor == expected['scale_factor']


def test_export_names_bad_input(tmp_path):
    from ..test_apis.test_export import save_random_checkpoint

    plain = save_random_checkpoint('plain', str(tmp_path / 'plain.pth'))
    out = str(tmp_path / 'm.onnx')
    proc = run_tool([EXPORT, CONFIG, plain, '--format', 'onnx', '--out', out])
    assert proc.returncode == 2
    assert f"checkpoint '{plain}' was trained as a plain Deformable DETR" in proc.stderr
    assert not osp.exists(out)
    proc = run_tool([EXPORT, CONFIG, plain, '--format', 'onnx', '--out', out, '--opset', '17'])
    assert proc.returncode == 2 and '--opset must be from 18 to 23' in proc.stderr
    proc = run_tool([EXPORT, CONFIG, plain, '--format', 'pt2', '--out', out])
    assert proc.returncode == 2 and '--out must end in .pt2' in proc.stderr
    proc = run_tool(
        [EXPORT, CONFIG, plain, '--format', 'onnx', '--out', out, '--precision', 'bf16']
    )
    assert proc.returncode == 2 and '--precision bf16 is for --format pt2 only' in proc.stderr
    pt2_out = str(tmp_path / 'm.pt2')
    proc = run_tool(
        [EXPORT, CONFIG, plain, '--format', 'pt2', '--out', pt2_out, '--precision', 'int8']
    )
    assert proc.returncode == 2 and '--precision int8 is for --format onnx only' in proc.stderr
    int8 = ['--format', 'onnx', '--out', out, '--precision', 'int8']
    missing = str(tmp_path / 'calib')
    proc = run_tool([EXPORT, CONFIG, plain, *int8, '--calib-images', missing])
    assert proc.returncode == 2 and f'calibration image not found: {missing!r}' in proc.stderr
    proc = run_tool(
        [EXPORT, CONFIG, plain, '--format', 'onnx', '--out', out, '--calib-images', out]
    )
    assert proc.returncode == 2 and '--calib-images is for --precision int8 only' in proc.stderr
    proc = run_tool([EXPORT, CONFIG, plain, *int8, '--calib-num', '0'])
    assert proc.returncode == 2 and '--calib-num must be >= 1, got 0' in proc.stderr
    # a calibration file that is not an image (found once the checkpoint is read)
    two_stage = save_random_checkpoint('two_stage', str(tmp_path / 'two_stage.pth'))
    broken = tmp_path / 'broken.jpg'
    broken.write_text('not an image')
    proc = run_tool([EXPORT, CONFIG, two_stage, *int8, '--calib-images', str(broken)])
    assert proc.returncode == 2
    assert f'calibration image could not be read: {str(broken)!r}' in proc.stderr
    assert not osp.exists(out) and not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]
    deform_conv = ['--msda-form', 'deform_conv']
    proc = run_tool(
        [EXPORT, CONFIG, plain, '--format', 'onnx', '--out', out, *deform_conv, '--opset', '18']
    )
    assert proc.returncode == 2
    assert '--msda-form deform_conv needs --opset 19 or later (DeformConv), got 18' in proc.stderr
    pt2 = str(tmp_path / 'm.pt2')
    proc = run_tool([EXPORT, CONFIG, plain, '--format', 'pt2', '--out', pt2, *deform_conv])
    assert (
        proc.returncode == 2 and '--msda-form deform_conv is for --format onnx only' in proc.stderr
    )
    proc = run_tool([EXPORT, CONFIG, str(tmp_path / 'none.pth'), '--format', 'onnx', '--out', out])
    assert proc.returncode == 2 and 'checkpoint not found' in proc.stderr
    with open(out, 'w') as f:
        f.write('precious')
    proc = run_tool([EXPORT, CONFIG, plain, '--format', 'onnx', '--out', out])
    assert proc.returncode == 2 and 'exists; pass --overwrite' in proc.stderr
    with open(out) as f:
        assert f.read() == 'precious'


PROFILER = 'tools/deployment/profile_onnxruntime.py'


def test_onnxruntime_profile_of_an_exported_model(onnx_deform_conv_model):
    """Per operator type and slowest nodes, from ONNX Runtime's profiler: the
    deform_conv file samples the encoder with DeformConv and the decoder with
    GridSample."""
    proc = run_tool([PROFILER, onnx_deform_conv_model, '--shape', '168', '224', '--iters', '2'])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert '168x224 image' in proc.stdout
    lines = proc.stdout.splitlines()
    first = lines.index('| operator | ms per run | share | nodes |') + 2
    rows = [line.strip('| ').split(' | ') for line in lines[first : lines.index('', first)]]
    types = {row[0]: row for row in rows}
    assert 'DeformConv' in types and 'GridSample' in types
    assert abs(sum(float(row[2].rstrip('%')) for row in rows) - 100) < 1  # shares of one total
    assert types['DeformConv'][3] == '2'  # the shapes model's two encoder layers


def test_onnxruntime_profile_names_bad_input(onnx_model, tmp_path):
    missing = str(tmp_path / 'missing.onnx')
    proc = run_tool([PROFILER, missing])
    assert proc.returncode == 2 and f'model {missing!r} not found' in proc.stderr
    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'not a model')
    proc = run_tool([PROFILER, str(garbage)])
    assert proc.returncode == 2 and 'is not an ONNX model ONNX Runtime can run' in proc.stderr
    # a graph that does not take one uint8 image
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node('Relu', ['x'], ['y'])],
        'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [2, 3])],
    )
    other = str(tmp_path / 'relu.onnx')
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)]), other)
    proc = run_tool([PROFILER, other])
    assert proc.returncode == 2 and 'expected one uint8 (H, W, 3) image' in proc.stderr
    # a size the graph cannot take (smaller than the backbone's strides allow)
    proc = run_tool([PROFILER, onnx_model, '--shape', '8', '8', '--iters', '1'])
    assert proc.returncode == 2 and 'failed on a 8x8 image' in proc.stderr


def test_benchmark_table_and_arguments():
    bench = load_tool('tools/deployment/benchmark.py')
    medians = {'mmdet': (2.0, 4.0), 'pt2': (0.5, 1.0), 'pt2_bf16': (0.25, 0.5)}
    table = bench.format_table(medians, (512, 672), 2)
    assert '| mmdet 3.3 eager | 2.000 | 1.00x | 4.000 | 1.00x |' in table
    assert '| ours pt2 (AOTInductor) | 0.500 | 4.00x | 1.000 | 4.00x |' in table
    assert '| ours pt2, bf16 autocast (--precision bf16) | 0.250 | 8.00x | 0.500 | 8.00x |' in table
    assert 'ONNX Runtime' not in table  # paths not timed have no row
    # without mmdet's eager inference there is nothing to compare with
    table = bench.format_table({'onnxruntime': (1.5, 3.0)}, (512, 672), 2)
    assert (
        '| ours ONNX Runtime (no custom op, GridSample form) | 1.500 | n/a | 3.000 | n/a |' in table
    )
    assert bench.parse_args([]).paths == list(bench.PATHS)
    assert bench.encoder_tokens((512, 672)) == 64 * 84 + 32 * 42 + 16 * 21 + 8 * 11
    bad_args = (
        ['--shape', '32', '32'],
        ['--shape', '96', '128'],  # 256 tokens, fewer than the 300 proposals
        ['--pause', '-1'],
        ['--serve', 'ours'],
    )
    for bad in bad_args:
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_benchmark_runs_every_path_in_its_own_process(tmp_path):
    # a .pt2 file torch cannot load: its path is skipped with the runner's reason
    (tmp_path / 'pt2.pt2').write_bytes(b'not a package')
    proc = run_tool(
        [
            'tools/deployment/benchmark.py',
            '--paths', 'mmdet', 'ours', 'pt2',
            '--shape', '128', '160',
            '--iters', '2', '--warmup', '0', '--pause', '0',
            '--work-dir', str(tmp_path), '--reuse-exports',
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert 'pt2: torch cannot load the AOTInductor package' in out and 'its row is skipped' in out
    pids = {name: int(out.split(f'{name}: process ')[1].split()[0]) for name in ('mmdet', 'ours')}
    assert len(set(pids.values())) == 2
    for name in ('mmdet', 'ours'):
        lines = [line for line in out.splitlines() if line.startswith(f'  {name} it ')]
        assert len(lines) == 2 and all(' minor page faults)' in line for line in lines)
        assert osp.isfile(tmp_path / f'{name}.log')
    rows = [line for line in out.splitlines() if line.startswith('| ')]
    assert rows[2].startswith('| mmdet 3.3 eager |') and ' 1.00x ' in rows[2]
    assert rows[3].startswith('| ours eager |') and len(rows) == 4  # no pt2 row
    assert osp.isfile(tmp_path / 'weights.pth')


def test_benchmark_quantizes_the_deform_conv_file_for_its_int8_row(
    onnx_deform_conv_model, tmp_path
):
    from mmdet_deform.apis.quantize import quantized_operators

    # any float32 deform_conv file stands in for the R50 export (reused)
    shutil.copy(onnx_deform_conv_model, tmp_path / 'model_deform_conv.onnx')
    proc = run_tool(
        [
            'tools/deployment/benchmark.py',
            '--paths', 'onnxruntime_int8',
            '--shape', '128', '160',
            '--iters', '1', '--warmup', '0', '--pause', '0',
            '--work-dir', str(tmp_path), '--reuse-exports',
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'model_deform_conv_int8.onnx: exported in' in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith('| ours ONNX Runtime')]
    assert len(rows) == 1 and rows[0].startswith('| ours ONNX Runtime, int8 ')
    counts = quantized_operators(str(tmp_path / 'model_deform_conv_int8.onnx'))
    assert counts['float_convs'] == 0 and counts['convs'] > 0 and counts['linears'] > 0
