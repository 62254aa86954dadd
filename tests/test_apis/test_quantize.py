"""mmdet_deform.apis.quantize: calibration images come out as the exported
graph takes them (the test pipeline's load and resize), and a float32 ONNX
graph comes out with int8 convolutions and Linear layers that compute what
the float32 one does, within int8's rounding."""

import os.path as osp

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from mmdet_deform.apis.quantize import calibration_images, quantize_onnx, quantized_operators

from ..conftest import REPO_ROOT

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxruntime.quantization')

CONFIG = osp.join(REPO_ROOT, 'configs', 'deformable_detr', 'two_stage_shapes.py')


def write_images(folder, sizes) -> None:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(folder / f'{i}.png'), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_calibration_images_from_files_are_resized_as_the_test_pipeline(tmp_path):
    write_images(tmp_path, [(96, 128), (120, 90), (320, 320)])
    (tmp_path / 'notes.txt').write_text('not an image')  # not an image suffix: left out
    cfg = Config.fromfile(CONFIG)  # Resize to (224, 224), keep_ratio
    images = calibration_images(cfg, num=2, paths=[str(tmp_path)])
    assert [img.shape for img in images] == [(168, 224, 3), (224, 168, 3)]
    assert all(img.dtype == np.uint8 and img.flags['C_CONTIGUOUS'] for img in images)
    expected = cv2.resize(cv2.imread(str(tmp_path / '0.png')), (224, 168))
    np.testing.assert_array_equal(images[0], expected)  # mmcv's bilinear resize is OpenCV's
    one = calibration_images(cfg, num=5, paths=[str(tmp_path / '2.png')])
    assert [img.shape for img in one] == [(224, 224, 3)]


def test_calibration_images_default_to_the_training_set(tmp_path):
    cfg = Config.fromfile(CONFIG)
    dataset = cfg.train_dataloader.dataset
    dataset.data_root = str(tmp_path / 'shapes')
    dataset.generate.num_images = 3  # generated on first use, as the main job does
    images = calibration_images(cfg, num=2)
    assert len(images) == 2 and all(img.shape == (224, 224, 3) for img in images)


def test_calibration_images_name_bad_input(tmp_path):
    cfg = Config.fromfile(CONFIG)
    missing = str(tmp_path / 'missing.jpg')
    with pytest.raises(FileNotFoundError, match='calibration image not found'):
        calibration_images(cfg, paths=[missing])
    broken = tmp_path / 'broken.jpg'
    broken.write_text('not an image')
    with pytest.raises(ValueError, match='calibration image could not be read'):
        calibration_images(cfg, paths=[str(broken)])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no calibration image'):
        calibration_images(cfg, paths=[str(tmp_path / 'empty')])
    with pytest.raises(ValueError, match='num must be >= 1'):
        calibration_images(cfg, num=0, paths=[str(broken)])


def small_detector_graph(path: str) -> None:
    """uint8 (H, W, 3) image -> float -> NCHW -> Conv 3x3 + Relu -> global
    mean -> Linear (MatMul + Add) -> (1, 8): one convolution, one Linear."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.1, (16, 3, 3, 3)).astype(np.float32), 'conv_w'),
        numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), 'conv_b'),
        numpy_helper.from_array(rng.normal(0, 0.5, (16, 8)).astype(np.float32), 'fc_w'),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), 'fc_b'),
        numpy_helper.from_array(np.array([0], np.int64), 'zero'),
        numpy_helper.from_array(np.array([1, 16], np.int64), 'flat'),
    ]
    nodes = [
        helper.make_node('Cast', ['image'], ['f'], to=TensorProto.FLOAT),
        helper.make_node('Transpose', ['f'], ['chw'], perm=[2, 0, 1]),
        helper.make_node('Unsqueeze', ['chw', 'zero'], ['x']),
        helper.make_node('Conv', ['x', 'conv_w', 'conv_b'], ['c'], pads=[1, 1, 1, 1]),
        helper.make_node('Relu', ['c'], ['r']),
        helper.make_node('GlobalAveragePool', ['r'], ['p']),
        helper.make_node('Reshape', ['p', 'flat'], ['v']),
        helper.make_node('MatMul', ['v', 'fc_w'], ['m']),
        helper.make_node('Add', ['m', 'fc_b'], ['out']),
    ]
    graph = helper.make_graph(
        nodes,
        'small',
        [helper.make_tensor_value_info('image', TensorProto.UINT8, ['h', 'w', 3])],
        [helper.make_tensor_value_info('out', TensorProto.FLOAT, [1, 8])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), path)


def test_quantize_onnx_makes_convolutions_and_linears_int8(tmp_path):
    float_file, int8_file = str(tmp_path / 'f.onnx'), str(tmp_path / 'q.onnx')
    small_detector_graph(float_file)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(4)]
    info = quantize_onnx(float_file, int8_file, images)
    expected = dict(convs=1, linears=1, float_convs=0, float_matmuls=0, calibration_images=4)
    assert info == expected
    assert quantized_operators(float_file) == dict(
        convs=0, linears=0, float_convs=1, float_matmuls=1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.onnx', 'q.onnx']  # no leftovers
    runs = [
        ort.InferenceSession(f, providers=['CPUExecutionProvider']) for f in (float_file, int8_file)
    ]
    for img in images[:2] + [rng.integers(0, 256, (24, 56, 3), dtype=np.uint8)]:
        reference, quantized = (s.run(None, {'image': img})[0] for s in runs)
        error = np.abs(quantized - reference).max() / np.abs(reference).max()
        assert 0 < error < 0.05, error  # int8 rounding: close, not equal


def test_quantize_onnx_needs_calibration_images(tmp_path):
    float_file = str(tmp_path / 'f.onnx')
    small_detector_graph(float_file)
    with pytest.raises(ValueError, match='at least one calibration image'):
        quantize_onnx(float_file, str(tmp_path / 'q.onnx'), [])
    assert not osp.exists(tmp_path / 'q.onnx')
