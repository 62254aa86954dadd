"""Export a trained Deformable DETR as one graph from an image to its
detections: ONNX with standard operators only, or ``torch.export`` +
AOTInductor (a ``.pt2`` package).

The exported graph (:class:`ExportableDetector`) takes one image as the test
pipeline's ``Resize`` leaves it (uint8, (H, W, 3), in the channel order of the
image file as OpenCV decodes it, BGR) and holds everything after that:

1. the data preprocessor's steps: channel flip, ``(x - mean) / std`` and
   zero padding to ``pad_size_divisor``;
2. the detector's own steps: ``extract_feat`` and ``forward_transformer``
   (``pre_transformer`` -> ``forward_encoder`` -> ``pre_decoder`` ->
   ``forward_decoder``);
3. the head's ``predict`` without rescaling: sigmoid, the top
   ``test_cfg.max_per_img`` (query, class) pairs, boxes in pixels of the input.

Its outputs are ``boxes`` (N, 4) float32 x1, y1, x2, y2, ``scores`` (N,)
float32 sorted in descending order and ``labels`` (N,) int64, N =
``max_per_img``. Height and width are dynamic unless a static shape is asked
for. What a runner needs besides (classes, the resize, normalisation, the
valid input sizes, a default score threshold) is written next to the model as
``<model file>.json`` (:func:`write_metadata`); ``tools/deployment/
run_exported.py`` reads it.

Example::

    from mmdet_deform.apis.export import export_detector

    export_detector('configs/deformable_detr/two_stage_shapes.py', 'epoch_4.pth',
                    fmt='onnx', out='model.onnx')
"""

import contextlib
import copy
import hashlib
import json
import math
import os
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops import MultiScaleDeformableAttention, at_least_float32

__all__ = [
    'METADATA_SUFFIX',
    'METADATA_VERSION',
    'PRECISIONS',
    'ExportableDetector',
    'export_detector',
    'export_onnx',
    'export_pt2',
    'file_sha256',
    'load_detector',
    'metadata_path',
    'model_variant',
    'projecting_first',
    'read_preprocessing',
    'read_test_resize',
    'resized_shape',
    'write_metadata',
]

#: The metadata of ``model.onnx`` is ``model.onnx.json``.
METADATA_SUFFIX = '.json'
#: Version of the metadata layout (a runner refuses other versions).
METADATA_VERSION = 1
FORMATS = ('onnx', 'pt2')
#: ``precision`` of :func:`export_detector` -> ``autocast_dtype`` of
#: :class:`ExportableDetector`. bf16 is for ``.pt2`` packages: fast on CPUs
#: with bf16 matrix units (AVX512-BF16, AMX), slower than float32 elsewhere.
#: int8 is for ONNX files: the float32 graph quantized afterwards
#: (:mod:`mmdet_deform.apis.quantize`).
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'int8': None}
#: The format each precision other than fp32 is for.
PRECISION_FORMATS = {'bf16': 'pt2', 'int8': 'onnx'}
DEFAULT_OPSET = 20
_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'area', 'lanczos')


# --------------------------------------------------------------------------
# the exported module
# --------------------------------------------------------------------------
class ExportableDetector(nn.Module):
    """One image in, its detections out (see the module docstring).

    Args:
        detector (nn.Module): A built :class:`~mmdet_deform.models.DeformableDETR`
            (any variant) in eval mode.
        mean (Sequence[float]): Per-channel mean of the data preprocessor, in
            the channel order after the optional flip.
        std (Sequence[float]): Per-channel std of the data preprocessor.
        bgr_to_rgb (bool): Flip the channels of the input first. Defaults to True.
        pad_size_divisor (int): Pad the normalised image with zeros at the
            bottom/right to a multiple of this. Defaults to 1.
        pad_value (float): Value of the padding. Defaults to 0.
        autocast_dtype (torch.dtype, optional): Run the backbone, neck,
            encoder and decoder under ``torch.autocast`` to this dtype (only
            ``torch.bfloat16``): matrix products and convolutions in bf16,
            the rest as autocast decides. The preprocessing and the head
            (classification and box branches, sigmoid, top-k, box
            conversion) stay in float32, and so do the outputs. Defaults to
            None (float32 throughout).
    """

    def __init__(
        self,
        detector: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        bgr_to_rgb: bool = True,
        pad_size_divisor: int = 1,
        pad_value: float = 0.0,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f'mean and std must have 3 values, got {mean} and {std}')
        if pad_size_divisor < 1:
            raise ValueError(f'pad_size_divisor must be >= 1, got {pad_size_divisor}')
        if autocast_dtype not in (None, torch.bfloat16):
            raise ValueError(f'autocast_dtype must be None or torch.bfloat16, got {autocast_dtype}')
        self.detector = detector
        self.autocast_dtype = autocast_dtype
        self.bgr_to_rgb = bgr_to_rgb
        self.pad_size_divisor = int(pad_size_divisor)
        self.pad_value = float(pad_value)
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Detect the objects of one image.

        Args:
            image (Tensor): uint8, has shape (H, W, 3), in the channel order
                of the image file (BGR as OpenCV decodes it).

        Returns:
            tuple[Tensor, Tensor, Tensor]: ``boxes`` (N, 4) x1, y1, x2, y2 in
            pixels of ``image``, ``scores`` (N,) in descending order and
            ``labels`` (N,) int64.
        """
        from mmdet.structures import DetDataSample

        # (H, W, 3) -> (1, 3, H, W)
        inputs = image.permute(2, 0, 1)[None]
        if self.bgr_to_rgb:
            inputs = inputs.flip(1)
        inputs = (inputs.float() - self.mean) / self.std
        img_h, img_w = inputs.shape[-2:]
        divisor = self.pad_size_divisor
        pad_h = (divisor - img_h % divisor) % divisor
        pad_w = (divisor - img_w % divisor) % divisor
        if divisor > 1:
            inputs = nn.functional.pad(inputs, (0, pad_w, 0, pad_h), value=self.pad_value)
        sample = DetDataSample()
        # set_field, not set_metainfo: the latter deep-copies, which symbolic sizes refuse
        sample.set_field((img_h + pad_h, img_w + pad_w), 'batch_input_shape', field_type='metainfo')
        sample.set_field((img_h, img_w), 'img_shape', field_type='metainfo')
        samples = [sample]
        with torch.autocast(
            inputs.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        ):
            feats = self.detector.extract_feat(inputs)
            head_inputs = self.detector.forward_transformer(feats, samples)
        head_inputs = at_least_float32(head_inputs)
        results = self.detector.bbox_head.predict(
            **head_inputs, batch_data_samples=samples, rescale=False
        )[0]
        return results.bboxes, results.scores, results.labels


# --------------------------------------------------------------------------
# config and checkpoint
# --------------------------------------------------------------------------
def model_variant(model_cfg) -> str:
    """``'plain'``, ``'refine'``, ``'two_stage'`` (two-stage with refinement,
    the paper's) or ``'two_stage_no_refine'`` from a model config dict."""
    refine = bool(model_cfg.get('with_box_refine', False))
    two_stage = bool(model_cfg.get('as_two_stage', False))
    if two_stage:
        return 'two_stage' if refine else 'two_stage_no_refine'
    return 'refine' if refine else 'plain'


def _variant_in_config_text(text: str) -> Optional[str]:
    """The variant written in a config's text (a checkpoint's ``meta['cfg']``),
    read without executing it; None if it does not say."""
    found = {}
    for key in ('with_box_refine', 'as_two_stage'):
        match = re.search(rf'\b{key}\s*=\s*(True|False)\b', text)
        if match is None:
            return None
        found[key] = match.group(1) == 'True'
    return model_variant(found)


def read_preprocessing(cfg) -> Dict:
    """mean, std, bgr_to_rgb, pad_size_divisor and pad_value of the config's
    ``model.data_preprocessor`` (a ``DetDataPreprocessor``).

    Raises:
        ValueError: naming the setting the exported graph cannot hold.
    """
    pre = cfg.model.get('data_preprocessor') or {}
    kind = str(pre.get('type', 'DetDataPreprocessor')).split('.')[-1]
    if kind != 'DetDataPreprocessor':
        raise ValueError(f'model.data_preprocessor must be a DetDataPreprocessor, got {kind}')
    if pre.get('batch_augments'):
        raise ValueError('model.data_preprocessor.batch_augments must be empty for export')
    if pre.get('rgb_to_bgr', False):
        raise ValueError('model.data_preprocessor.rgb_to_bgr is not supported by the export')
    mean = pre.get('mean') or [0.0, 0.0, 0.0]
    std = pre.get('std') or [1.0, 1.0, 1.0]
    return dict(
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        bgr_to_rgb=bool(pre.get('bgr_to_rgb', False)),
        pad_size_divisor=int(pre.get('pad_size_divisor', 1)),
        pad_value=float(pre.get('pad_value', 0)),
    )


def _test_pipeline(cfg) -> List[dict]:
    for key in ('test_dataloader', 'val_dataloader'):
        loader = cfg.get(key)
        if loader and loader.get('dataset') and loader['dataset'].get('pipeline'):
            return list(loader['dataset']['pipeline'])
    if cfg.get('test_pipeline'):
        return list(cfg.test_pipeline)
    raise ValueError('the config has no test pipeline (test_dataloader.dataset.pipeline)')


def read_test_resize(cfg) -> Dict:
    """The ``Resize`` of the config's test pipeline, which the runner repeats:
    ``scale`` (w, h), ``keep_ratio`` and ``interpolation`` (OpenCV backend).

    Raises:
        ValueError: if the test pipeline has another geometric transform, a
            ``Resize`` by ``scale_factor`` or a non-OpenCV backend.
    """
    resizes = []
    for transform in _test_pipeline(cfg):
        kind = str(transform.get('type', '')).split('.')[-1]
        if kind == 'Resize':
            resizes.append(transform)
        elif kind in ('LoadImageFromFile', 'LoadAnnotations', 'PackDetInputs', 'InferencerLoader'):
            continue
        else:
            raise ValueError(
                f'the test pipeline holds {kind}; the runner only repeats one Resize '
                '(LoadImageFromFile, Resize, LoadAnnotations, PackDetInputs)'
            )
    if len(resizes) != 1:
        raise ValueError(f'the test pipeline must hold one Resize, got {len(resizes)}')
    resize = resizes[0]
    scale = resize.get('scale')
    if scale is None:
        raise ValueError(
            'the test Resize must give scale (resizing by scale_factor is not supported)'
        )
    if isinstance(scale, int):
        scale = (scale, scale)
    interpolation = resize.get('interpolation', 'bilinear')
    if resize.get('backend', 'cv2') != 'cv2' or interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"the test Resize must use backend='cv2' and one of {_INTERPOLATIONS}, got "
            f'{resize.get("backend", "cv2")!r} / {interpolation!r}'
        )
    return dict(
        scale=[int(scale[0]), int(scale[1])],
        keep_ratio=bool(resize.get('keep_ratio', False)),
        interpolation=interpolation,
    )


def resized_shape(height: int, width: int, resize: Dict) -> Tuple[int, int]:
    """(h, w) of an image after the test ``Resize`` (mmcv's arithmetic)."""
    scale_w, scale_h = resize['scale']
    if not resize['keep_ratio']:
        return scale_h, scale_w
    factor = min(
        max(scale_w, scale_h) / max(height, width), min(scale_w, scale_h) / min(height, width)
    )
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _state_dict_of(checkpoint: dict) -> 'OrderedDict[str, Tensor]':
    state_dict = checkpoint.get('state_dict', checkpoint)
    return OrderedDict((re.sub(r'^module\.', '', k), v) for k, v in state_dict.items())


def load_detector(config, checkpoint: str, device: str = 'cpu'):
    """Build the config's detector and load ``checkpoint`` into it, strictly.

    Unlike ``init_detector`` (which loads non-strictly and only logs missing
    keys), a checkpoint of another variant or number of classes is refused.

    Args:
        config (str | Config): Config file or object.
        checkpoint (str): Checkpoint file (mmengine's, or a bare state dict).
        device (str): Device. Defaults to 'cpu'.

    Returns:
        tuple[nn.Module, Config, dict]: The detector in eval mode (with
        ``dataset_meta`` as ``init_detector`` sets it), the config, and the
        checkpoint's ``meta``.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: naming the checkpoint, the config and what differs.
    """
    import warnings

    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmengine.runner import CheckpointLoader

    import mmdet_deform  # noqa: F401  (registers the model, its scope and the checkpoint globals)

    for name, path in (('config', config), ('checkpoint', checkpoint)):
        if isinstance(path, str) and not osp.isfile(path):
            raise FileNotFoundError(f'{name} not found: {path!r}')
    cfg = Config.fromfile(config) if isinstance(config, str) else copy.deepcopy(config)
    config_name = config if isinstance(config, str) else 'the config'
    if 'DeformableDETR' not in str(cfg.model.get('type', '')):
        raise ValueError(f'{config_name} does not build a DeformableDETR ({cfg.model.get("type")})')
    wanted = model_variant(cfg.model)
    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {checkpoint!r} holds no state dict')
    meta = ckpt.get('meta', {}) or {}
    saved = _variant_in_config_text(str(meta.get('cfg', '')))
    if saved is not None and saved != wanted:
        raise ValueError(
            f'checkpoint {checkpoint!r} was trained as a {saved} Deformable DETR, but '
            f'{config_name} builds a {wanted} one: export it with its own config'
        )
    cfg.model.pop('init_cfg', None)
    if cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None  # no pretrained download: the checkpoint has it
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "checkpoint is None, use COCO classes by default"
        model = init_detector(cfg, None, device=device)
    state_dict = _state_dict_of(ckpt)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    resized = [
        f'{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or resized:
        lines = []
        for what, keys in (('missing', missing), ('unexpected', unexpected), ('shape', resized)):
            if keys:
                shown = ', '.join(keys[:4]) + (
                    f' and {len(keys) - 4} more' if len(keys) > 4 else ''
                )
                lines.append(f'{what}: {shown}')
        raise ValueError(
            f'checkpoint {checkpoint!r} does not match the {wanted} Deformable DETR of '
            f'{config_name} (another variant, number of classes or model size?): '
            + '; '.join(lines)
        )
    model.load_state_dict(state_dict, strict=True)
    dataset_meta = {k.lower(): v for k, v in (meta.get('dataset_meta') or {}).items()}
    if 'classes' not in dataset_meta and 'CLASSES' in meta:
        dataset_meta['classes'] = meta['CLASSES']
    if 'classes' in dataset_meta:
        model.dataset_meta = dataset_meta
    model.eval()
    return model, cfg, meta


def _palette_of(cfg, dataset_meta: dict) -> Optional[List[List[int]]]:
    """The palette of the checkpoint, else of the test dataset's class
    (without building the dataset)."""
    palette = dataset_meta.get('palette')
    if palette is None:
        try:
            from mmdet.registry import DATASETS

            dataset_type = cfg.test_dataloader.dataset.type
            palette = DATASETS.get(dataset_type).METAINFO.get('palette')
        except Exception:  # noqa: BLE001 - a palette only colours the drawing
            palette = None
    if not isinstance(palette, (list, tuple)):
        return None
    return [[int(c) for c in colour] for colour in palette]


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
def _dynamic_shapes(dynamic: bool):
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    return ({0: auto, 1: auto, 2: torch.export.Dim.STATIC},)


def _input_ranges(program) -> Dict:
    """min/max (h, w) of the exported program's image input (equal: static)."""
    placeholder = next(
        node
        for node in program.graph.nodes
        if node.op == 'placeholder' and node.name in program.graph_signature.user_inputs
    )
    ranges = {}
    for axis, name in ((0, 'height'), (1, 'width')):
        size = placeholder.meta['val'].shape[axis]
        if isinstance(size, int):
            ranges[name] = (size, size)
            continue
        bounds = program.range_constraints[size.node.expr]
        upper = bounds.upper
        ranges[name] = (int(bounds.lower), None if not math.isfinite(float(upper)) else int(upper))
    return dict(
        min_hw=[ranges['height'][0], ranges['width'][0]],
        max_hw=[ranges['height'][1], ranges['width'][1]],
    )


def _export_program(module: ExportableDetector, example: Tensor, dynamic: bool):
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=_dynamic_shapes(dynamic))


@contextlib.contextmanager
def projecting_first(module: nn.Module) -> Iterator[None]:
    """Within the block, the attention modules of ``module`` that sample the
    unprojected value (``sample_then_project``, the decoder's
    cross-attention) project first, the default order; restored on exit.

    Both orders give the same result up to rounding. Sampling first is
    faster in eager PyTorch, but in ONNX it samples 8x more channels in
    ``GridSample``: projecting first makes the ONNX Runtime graph about 4%
    faster overall (two-stage R50, 512x672).
    """
    switched = [
        m
        for m in module.modules()
        if isinstance(m, MultiScaleDeformableAttention) and m.sample_then_project
    ]
    for m in switched:
        m.sample_then_project = False
    try:
        yield
    finally:
        for m in switched:
            m.sample_then_project = True


def export_onnx(
    module: ExportableDetector,
    example: Tensor,
    path: str,
    opset_version: int = DEFAULT_OPSET,
    dynamic: bool = True,
    msda_form: str = 'grid_sample',
) -> Dict:
    """Export ``module`` to an ONNX file of standard operators (weights
    inside), its attention projecting the value before sampling
    (:func:`projecting_first`).

    Args:
        msda_form (str): How ``ms_deform_attn`` is written (see
            :mod:`mmdet_deform.ops.onnx`): ``'grid_sample'`` (ONNX Runtime and
            OpenVINO) or ``'deform_conv'`` (the encoder's attention as
            ``DeformConv``: faster in ONNX Runtime, opset 19 or later, not
            read by OpenVINO).

    Returns:
        dict: The valid input sizes (``min_hw``, ``max_hw``).
    """
    from mmdet_deform.ops.onnx import check_opset, onnx_translation_table

    check_opset(opset_version, msda_form)
    with projecting_first(module):
        program = _export_program(module, example, dynamic)
    onnx_program = torch.onnx.export(
        program,
        input_names=['image'],
        output_names=['boxes', 'scores', 'labels'],
        opset_version=opset_version,
        custom_translation_table=onnx_translation_table(msda_form),
        verbose=False,
    )
    onnx_program.save(path, external_data=False)
    return _input_ranges(program)


def export_pt2(
    module: ExportableDetector,
    example: Tensor,
    path: str,
    dynamic: bool = True,
) -> Dict:
    """Export ``module`` with ``torch.export`` and compile it ahead of time
    with AOTInductor into the package ``path`` (``.pt2``). The package calls
    the compiled ``mmdet_deform::ms_deform_attn`` kernel: loading it needs
    ``mmdet_deform._C`` loaded first.

    Returns:
        dict: The valid input sizes (``min_hw``, ``max_hw``).
    """
    program = _export_program(module, example, dynamic)
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    return _input_ranges(program)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def metadata_path(model_path: str) -> str:
    """Where the metadata of an exported model lives: ``<model file>.json``."""
    return model_path + METADATA_SUFFIX


def write_metadata(model_path: str, metadata: Dict) -> Dict:
    """Write ``metadata`` (plus the model file's name and SHA-256) next to the
    model (:func:`metadata_path`); returns what was written."""
    metadata = dict(
        metadata,
        metadata_version=METADATA_VERSION,
        model_file=osp.basename(model_path),
        model_sha256=file_sha256(model_path),
    )
    path = metadata_path(model_path)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(metadata, f, indent=2)
    os.replace(tmp, path)
    return metadata


def _example_image(resize: Dict, shape: Optional[Tuple[int, int]]) -> Tensor:
    """A random uint8 image of ``shape``, or else of a 3:4 image after the resize."""
    if shape is None:
        shape = resized_shape(600, 800, resize)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (shape[0], shape[1], 3), dtype=torch.uint8, generator=gen)


def export_detector(
    config,
    checkpoint: str,
    fmt: str,
    out: str,
    opset_version: int = DEFAULT_OPSET,
    shape: Optional[Tuple[int, int]] = None,
    score_thr: float = 0.3,
    overwrite: bool = False,
    precision: str = 'fp32',
    msda_form: str = 'grid_sample',
    calibration_images: Optional[Sequence[str]] = None,
    calibration_num: int = 32,
) -> Dict:
    """Export the detector of ``config`` with the weights of ``checkpoint``.

    Args:
        config (str | Config): Config file or object.
        checkpoint (str): Checkpoint file.
        fmt (str): ``'onnx'`` or ``'pt2'``.
        out (str): The model file to write; the metadata goes to
            ``out + '.json'``.
        opset_version (int): ONNX opset (18 to 23). Defaults to 20.
        shape (tuple[int, int], optional): Export for exactly this (h, w)
            after the resize instead of dynamic sizes.
        score_thr (float): The runner's default score threshold for drawing.
        overwrite (bool): Replace existing ``out`` / metadata files.
        precision (str): ``'fp32'`` (the default), ``'bf16'`` (``pt2``
            only: the backbone, neck, encoder and decoder run under bf16
            autocast, see :class:`ExportableDetector`) or ``'int8'`` (``onnx``
            only: the float32 file quantized, convolutions calibrated on
            images, see :mod:`mmdet_deform.apis.quantize`).
        msda_form (str): ``fmt='onnx'`` only: ``'grid_sample'`` (the
            default; ONNX Runtime and OpenVINO) or ``'deform_conv'`` (faster
            in ONNX Runtime, opset 19 or later; see :func:`export_onnx`).
        calibration_images (Sequence[str], optional): ``precision='int8'``:
            image files or folders to calibrate the convolutions on; defaults
            to the images of the config's ``train_dataloader``.
        calibration_num (int): ``precision='int8'``: how many of them (the
            first ones). Defaults to 32.

    Returns:
        dict: The metadata written.
    """
    if fmt not in FORMATS:
        raise ValueError(f'fmt must be one of {FORMATS}, got {fmt!r}')
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {tuple(PRECISIONS)}, got {precision!r}')
    if precision != 'fp32' and fmt != PRECISION_FORMATS[precision]:
        raise ValueError(
            f'precision={precision!r} is for fmt={PRECISION_FORMATS[precision]!r} only, '
            f'got fmt={fmt!r}'
        )
    if calibration_num < 1:
        raise ValueError(f'calibration_num must be >= 1, got {calibration_num}')
    if fmt == 'onnx':
        from mmdet_deform.ops.onnx import check_opset

        check_opset(opset_version, msda_form)
    elif msda_form != 'grid_sample':
        raise ValueError(
            f"msda_form={msda_form!r} is for fmt='onnx' only (a .pt2 package calls the "
            f'compiled op), got fmt={fmt!r}'
        )
    if shape is not None and (len(shape) != 2 or min(shape) < 1):
        raise ValueError(f'shape must be two positive sizes (h, w), got {shape}')
    if not 0 <= score_thr <= 1:
        raise ValueError(f'score_thr must be in [0, 1], got {score_thr}')
    for path in (out, metadata_path(out)):
        if osp.exists(path) and not overwrite:
            raise FileExistsError(
                f'{path!r} exists; pass overwrite=True (--overwrite) to replace it'
            )
    model, cfg, meta = load_detector(config, checkpoint)
    preprocessing = read_preprocessing(cfg)
    resize = read_test_resize(cfg)
    module = ExportableDetector(model, **preprocessing, autocast_dtype=PRECISIONS[precision]).eval()
    example = _example_image(resize, shape)
    out_dir = osp.dirname(osp.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    quantization = None
    if fmt == 'onnx':
        from mmdet_deform.apis import quantize

        images = None
        if precision == 'int8':  # read first: a bad image stops before the export
            images = quantize.calibration_images(cfg, calibration_num, calibration_images)
        float_file = out if images is None else out + '.fp32.tmp'
        try:
            ranges = export_onnx(
                module, example, float_file, opset_version, shape is None, msda_form
            )
            if images is not None:
                quantization = quantize.quantize_onnx(float_file, out, images)
        finally:
            if images is not None and osp.exists(float_file):
                os.remove(float_file)
    else:
        ranges = export_pt2(module, example, out, dynamic=shape is None)
    with torch.no_grad():  # strides of the levels: the runner counts encoder positions
        feats = model.extract_feat(torch.zeros(1, 3, *example.shape[:2]))
    strides = [2 ** round(math.log2(example.shape[0] / f.shape[-2])) for f in feats]
    dataset_meta = getattr(model, 'dataset_meta', None) or {}
    classes = [str(c) for c in dataset_meta.get('classes', ())]
    num_classes = model.bbox_head.num_classes
    if len(classes) != num_classes:
        classes = [f'class_{i}' for i in range(num_classes)]
    metadata = dict(
        format=fmt,
        opset_version=opset_version if fmt == 'onnx' else None,
        msda_form=msda_form if fmt == 'onnx' else None,
        precision=precision,
        quantization=quantization,
        torch_version=torch.__version__.split('+')[0],
        variant=model_variant(cfg.model),
        config=osp.basename(config) if isinstance(config, str) else None,
        checkpoint=osp.basename(checkpoint),
        classes=classes,
        palette=_palette_of(cfg, dataset_meta),
        input=dict(
            name='image',
            layout='HWC',
            dtype='uint8',
            channel_order='bgr',
            dynamic=shape is None and ranges['min_hw'] != ranges['max_hw'],
            **ranges,
            # two-stage selects num_queries proposals from the encoder positions,
            # sum(ceil(h / s) * ceil(w / s)) over the levels' strides s
            feature_strides=strides,
            min_tokens=int(model.num_queries) if model.as_two_stage else 0,
        ),
        resize=resize,
        preprocessing=preprocessing,
        outputs=['boxes', 'scores', 'labels'],
        max_per_img=int(model.bbox_head.test_cfg.get('max_per_img', model.num_queries)),
        score_thr=float(score_thr),
    )
    return write_metadata(out, metadata)
