"""int8 ONNX files for ONNX Runtime on CPUs: the convolutions quantized
statically (calibrated on images), the Linear layers dynamically.

An opt-in step of the ONNX export (``tools/deployment/export.py --format
onnx --precision int8``, or :func:`quantize_onnx` on a float32 file written
by :func:`mmdet_deform.apis.export.export_onnx`). It uses
``onnxruntime.quantization`` (the ``deploy`` extra):

* every ``Conv`` (the backbone and the neck) gets int8 weights, one scale
  per output channel, and uint8 inputs whose scales were measured (min / max)
  on the calibration images, written as ``QuantizeLinear`` /
  ``DequantizeLinear`` pairs around the float32 ``Conv`` that ONNX Runtime
  runs as one int8 convolution;
* every ``MatMul`` / ``Gemm`` with constant weights (the Linear layers of the
  encoder, the decoder and the head) gets int8 weights and uint8 inputs
  quantized at run time (``DynamicQuantizeLinear``, one scale per tensor per
  call: no calibration).

Everything else (the attention's sampling, softmax, layer norms, the head's
sigmoid and top-k) stays float32, as do the inputs and outputs: the file
is run like the float32 one. The quantized operators are standard ONNX
(opset 10 or later); ONNX Runtime runs them with its int8 matrix kernels
(AVX512-VNNI or AMX where the CPU has them).
"""

import os
import os.path as osp
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

__all__ = ['calibration_images', 'quantize_onnx', 'quantized_operators']


def _image_files(paths: Sequence[str]) -> List[str]:
    """The files of ``paths``, and the images of its folders (the suffixes
    mmdet's ``DetInferencer`` takes from a folder)."""
    from mmdet.apis.det_inferencer import IMG_EXTENSIONS

    files = []
    for path in paths:
        if osp.isdir(path):
            files += sorted(
                osp.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMG_EXTENSIONS)
            )
        elif osp.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f'calibration image not found: {path!r}')
    return files


def _dataset_image_files(cfg, num: int) -> List[str]:
    """The first ``num`` image files of the config's training set."""
    from mmdet_deform.registry import DATASETS

    loader = cfg.get('train_dataloader') or {}
    if not loader.get('dataset'):
        raise ValueError('the config has no train_dataloader.dataset to calibrate on')
    dataset = DATASETS.build(loader['dataset'])
    return [dataset.get_data_info(i)['img_path'] for i in range(min(num, len(dataset)))]


def calibration_images(
    cfg, num: int = 32, paths: Optional[Sequence[str]] = None
) -> List[np.ndarray]:
    """Calibration images as the exported graph takes them: uint8 (H, W, 3)
    BGR, loaded and resized by the config's test pipeline
    (``LoadImageFromFile`` and ``Resize``).

    Args:
        cfg (Config): The detector's config.
        num (int): How many images (the first ``num`` files).
        paths (Sequence[str], optional): Image files or folders of images;
            defaults to the images of the config's ``train_dataloader``.

    Raises:
        FileNotFoundError: if a path does not exist.
        ValueError: if ``num`` < 1 or no image was found.
    """
    from mmcv.transforms import Compose
    from mmengine.registry import init_default_scope

    import mmdet_deform  # noqa: F401  (registers the datasets and the scope)
    from mmdet_deform.apis.export import _test_pipeline

    init_default_scope(cfg.get('default_scope', 'mmdet'))  # as init_detector does
    if num < 1:
        raise ValueError(f'num must be >= 1, got {num}')
    files = _image_files(paths) if paths else _dataset_image_files(cfg, num)
    if not files:
        raise ValueError(f'no calibration image (a file, or images in a folder) in {paths}')
    kinds = ('LoadImageFromFile', 'Resize')
    pipeline = Compose(
        [t for t in _test_pipeline(cfg) if str(t.get('type', '')).split('.')[-1] in kinds]
    )
    images = []
    for path in files[:num]:
        try:
            results = pipeline(dict(img_path=path, img_id=0))
        except Exception as e:  # mmcv raises several kinds for unreadable files
            raise ValueError(f'calibration image could not be read: {path!r} ({e})') from e
        if results is None or results.get('img') is None:
            raise ValueError(f'calibration image could not be read: {path!r}')
        images.append(np.ascontiguousarray(results['img'], dtype=np.uint8))
    return images


class _Images:
    """``onnxruntime.quantization.CalibrationDataReader`` over images."""

    def __init__(self, images: Iterable[np.ndarray], input_name: str) -> None:
        self._feeds: Iterator[Dict[str, np.ndarray]] = ({input_name: img} for img in images)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._feeds, None)


def quantize_onnx(
    model_path: str, out: str, images: Sequence[np.ndarray], input_name: str = 'image'
) -> Dict:
    """Write the int8 version of the float32 ONNX file ``model_path`` to
    ``out`` (see the module's docstring).

    Args:
        model_path (str): A float32 ONNX file of the exporter.
        out (str): The int8 file to write (replaced if it exists).
        images (Sequence[np.ndarray]): Calibration inputs of the graph
            (:func:`calibration_images`).
        input_name (str): The graph's input.

    Returns:
        dict: ``convs`` and ``linears`` quantized, ``calibration_images``.

    Raises:
        ImportError: without ``onnxruntime``.
        ValueError: if ``images`` is empty.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not len(images):
        raise ValueError('quantize_onnx needs at least one calibration image')
    prepared, convs_done = out + '.prepared.tmp', out + '.convs.tmp'
    try:
        # constant folding and ONNX Runtime's basic (standard-operator) rewrites
        quant_pre_process(model_path, prepared, skip_symbolic_shape=True)
        quantize_static(
            prepared,
            convs_done,
            _Images(images, input_name),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=['Conv'],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        quantize_dynamic(
            convs_done, out, op_types_to_quantize=['MatMul', 'Gemm'], weight_type=QuantType.QInt8
        )
    finally:
        for path in (prepared, convs_done):
            if osp.exists(path):
                os.remove(path)
    return dict(quantized_operators(out), calibration_images=len(images))


def quantized_operators(path: str) -> Dict[str, int]:
    """How many convolutions and matrix products of the ONNX file ``path``
    run in int8: ``convs`` (``Conv`` with dequantized input and weights),
    ``linears`` (``MatMulInteger``), and the float32 ones left, ``float_convs``
    and ``float_matmuls`` (``MatMul`` / ``Gemm``)."""
    import onnx

    nodes = onnx.load(path, load_external_data=False).graph.node
    producer = {name: node.op_type for node in nodes for name in node.output}
    convs = [n for n in nodes if n.op_type == 'Conv']
    int8_convs = sum(
        all(producer.get(name) == 'DequantizeLinear' for name in n.input[:2]) for n in convs
    )
    return dict(
        convs=int8_convs,
        linears=sum(n.op_type == 'MatMulInteger' for n in nodes),
        float_convs=len(convs) - int8_convs,
        float_matmuls=sum(n.op_type in ('MatMul', 'Gemm') for n in nodes),
    )
