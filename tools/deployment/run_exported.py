"""Run an exported Deformable DETR (``tools/deployment/export.py``) on images,
without mmdet, mmcv or mmengine.

    python tools/deployment/run_exported.py MODEL IMG [IMG ...] --out-dir DIR
        [--score-thr 0.3] [--threads N] [--no-vis] [--runtime {onnxruntime,openvino}]

``MODEL`` is a ``.onnx`` file (run by ONNX Runtime, or by OpenVINO with
``--runtime openvino``, in float32, unless it was exported with ``--msda-form
deform_conv`` or ``--precision int8``; with numpy and OpenCV only: torch is
not imported) or a
``.pt2`` AOTInductor package (run by torch, with the compiled
``mmdet_deform._C`` op library loaded directly, not through the
``mmdet_deform`` package). ``MODEL.json``, written by the export, says how to
prepare an image. For every image the runner

1. decodes it as mmdet's ``LoadImageFromFile`` does (OpenCV, 3-channel BGR,
   8 bits);
2. resizes it as the config's test ``Resize`` (mmcv's arithmetic and OpenCV
   interpolation);
3. runs the model (normalisation, padding, detector, top-k are inside);
4. maps the boxes back to the original image (divides by the resize's scale
   factors, as mmdet's ``rescale=True``);

and writes ``DIR/preds/<name>.json`` (``labels``, ``scores``, ``bboxes``: all
``max_per_img`` detections, the layout of ``demo/image_demo.py``) and
``DIR/vis/<image file name>`` (the detections above ``--score-thr`` drawn).

Every input is checked before anything runs: a model file that does not
match its JSON (another file, edited, another format), a missing, empty or
undecodable image, or an image whose resized size the model does not take
stops the runner with a message naming the file and what was expected (exit
code 2).
"""

import argparse
import glob
import hashlib
import importlib.util
import json
import math
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

#: Layout version of ``MODEL.json`` this runner reads.
METADATA_VERSION = 1
FORMATS = {'.onnx': 'onnx', '.pt2': 'pt2'}
INTERPOLATIONS = {
    'nearest': cv2.INTER_NEAREST,
    'bilinear': cv2.INTER_LINEAR,
    'bicubic': cv2.INTER_CUBIC,
    'area': cv2.INTER_AREA,
    'lanczos': cv2.INTER_LANCZOS4,
}


class InputError(Exception):
    """A bad model, metadata or image file (the CLI exits with code 2)."""


# --------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def load_metadata(model_path: str) -> Dict:
    """Read and check ``model_path + '.json'`` against the model file.

    Raises:
        InputError: naming the file and what was expected.
    """
    if not osp.isfile(model_path):
        raise InputError(f'model not found: {model_path!r}')
    suffix = osp.splitext(model_path)[1]
    if suffix not in FORMATS:
        raise InputError(f'model {model_path!r} must be a .onnx file or a .pt2 package')
    meta_path = model_path + '.json'
    if not osp.isfile(meta_path):
        raise InputError(
            f'{meta_path!r} not found: the runner needs the JSON that '
            'tools/deployment/export.py writes next to the model'
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f'{meta_path!r} is not a readable JSON file: {e}') from e
    required = ('metadata_version', 'format', 'model_sha256', 'input', 'resize', 'classes')
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise InputError(
            f'{meta_path!r} lacks {missing}: not written by tools/deployment/export.py'
        )
    if meta['metadata_version'] != METADATA_VERSION:
        raise InputError(
            f'{meta_path!r} has metadata_version {meta["metadata_version"]}, this runner '
            f'reads {METADATA_VERSION}: export the model again'
        )
    if meta['format'] != FORMATS[suffix]:
        raise InputError(
            f'{meta_path!r} describes a {meta["format"]} model but {model_path!r} is a '
            f'{FORMATS[suffix]} file'
        )
    if file_sha256(model_path) != meta['model_sha256']:
        raise InputError(
            f'model {model_path!r} does not match {meta_path!r} (SHA-256 differs from the '
            f'exported {meta.get("model_file")!r}): the file was replaced or changed after export'
        )
    return meta


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
def read_image(path: str) -> np.ndarray:
    """Decode an image as mmdet's ``LoadImageFromFile`` (OpenCV, color: 3
    channels, BGR, 8 bits).

    Raises:
        InputError: naming the file.
    """
    if not osp.isfile(path):
        raise InputError(f'image {path!r} not found')
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise InputError(f'image {path!r} is empty (0 bytes)')
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f'image {path!r} is not an image OpenCV can decode')
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise InputError(f'image {path!r} has no pixels ({img.shape[0]}x{img.shape[1]})')
    return img


def resized_shape(height: int, width: int, resize: Dict) -> Tuple[int, int]:
    """(h, w) after the test ``Resize`` (mmcv's ``rescale_size`` arithmetic)."""
    scale_w, scale_h = resize['scale']
    if not resize['keep_ratio']:
        return int(scale_h), int(scale_w)
    long_edge, short_edge = max(scale_w, scale_h), min(scale_w, scale_h)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def resize_image(img: np.ndarray, resize: Dict) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Resize as the test pipeline; returns the image and (w_scale, h_scale)."""
    height, width = img.shape[:2]
    new_h, new_w = resized_shape(height, width, resize)
    if min(new_h, new_w) < 1:
        raise ValueError(f'a {height}x{width} image resizes to {new_h}x{new_w}')
    resized = cv2.resize(img, (new_w, new_h), interpolation=INTERPOLATIONS[resize['interpolation']])
    return resized, (new_w / width, new_h / height)


def size_problem(height: int, width: int, meta: Dict) -> Optional[str]:
    """What keeps an input of (height, width) out of the model (None: it fits)."""
    spec = meta['input']
    (min_h, min_w), (max_h, max_w) = spec['min_hw'], spec['max_hw']
    if not spec.get('dynamic', True):
        if (height, width) != (min_h, min_w):
            return (
                f'resizes to {height}x{width}, but the model was exported for exactly '
                f'{min_h}x{min_w} (--shape); export it without --shape for any size'
            )
        return None
    if height < min_h or width < min_w:
        return f'resizes to {height}x{width}; the model takes at least {min_h}x{min_w}'
    if (max_h is not None and height > max_h) or (max_w is not None and width > max_w):
        return f'resizes to {height}x{width}; the model takes at most {max_h}x{max_w}'
    min_tokens = spec.get('min_tokens', 0)
    if min_tokens:
        strides = spec['feature_strides']
        tokens = sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)
        if tokens < min_tokens:
            return (
                f'resizes to {height}x{width}, which gives {tokens} encoder positions; the '
                f'two-stage model selects {min_tokens} proposals from them (use larger images)'
            )
    return None


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
class OnnxModel:
    """An exported ``.onnx`` file in ONNX Runtime (CPU)."""

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise InputError(f'ONNX Runtime cannot load {path!r}: {e}') from e
        names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if names != ['image'] or outputs != ['boxes', 'scores', 'labels']:
            raise InputError(
                f'{path!r} has inputs {names} and outputs {outputs}; expected [image] and '
                '[boxes, scores, labels] (a model written by tools/deployment/export.py)'
            )

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, scores, labels = self.session.run(None, {'image': image})
        return boxes, scores, labels


class OpenVinoModel:
    """An exported ``.onnx`` file in OpenVINO's CPU plugin, computing in
    ``precision`` (``'f32'``, the default, or ``'bf16'``; set in every case:
    on CPUs with AMX or AVX512-BF16 the plugin would pick bf16 by itself)."""

    def __init__(self, path: str, threads: Optional[int] = None, precision: str = 'f32') -> None:
        if precision not in ('f32', 'bf16'):
            raise InputError(f"precision must be 'f32' or 'bf16', got {precision!r}")
        try:
            import openvino as ov
        except ImportError as e:
            raise InputError('--runtime openvino needs OpenVINO: `pip install openvino`') from e
        config = {'INFERENCE_PRECISION_HINT': precision}
        if threads is not None:
            config['INFERENCE_NUM_THREADS'] = threads
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(path), 'CPU', config)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise InputError(f'OpenVINO cannot load {path!r}: {e}') from e
        names = [i.get_any_name() for i in self.compiled.inputs]
        outputs = [o.get_any_name() for o in self.compiled.outputs]
        if names != ['image'] or outputs != ['boxes', 'scores', 'labels']:
            raise InputError(
                f'{path!r} has inputs {names} and outputs {outputs}; expected [image] and '
                '[boxes, scores, labels] (a model written by tools/deployment/export.py)'
            )
        self.request = self.compiled.create_infer_request()

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        results = self.request.infer({'image': image})
        boxes, scores, labels = (np.array(results[o]) for o in self.compiled.outputs)
        return boxes, scores, labels


def ops_library() -> str:
    """The compiled op library ``mmdet_deform/_C*.so``, found without
    importing the ``mmdet_deform`` package (whose ``__init__`` imports mmdet)."""
    spec = importlib.util.find_spec('mmdet_deform')
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            'a .pt2 model needs the mmdet_deform op library (_C); mmdet_deform is not '
            'installed (or pass --ops-library PATH)'
        )
    for folder in spec.submodule_search_locations:
        found = sorted(
            glob.glob(osp.join(folder, '_C.*.so')) + glob.glob(osp.join(folder, '_C*.pyd'))
        )
        if found:
            return found[0]
    raise InputError(
        'mmdet_deform/_C is not built: build it with `python setup.py build_ext --inplace` '
        '(or pass --ops-library PATH)'
    )


class Pt2Model:
    """An exported AOTInductor ``.pt2`` package (torch, no mmdet)."""

    def __init__(self, path: str, threads: Optional[int] = None, library: Optional[str] = None):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        library = library or ops_library()
        if not osp.isfile(library):
            raise InputError(f'op library not found: {library!r}')
        torch.ops.load_library(library)
        try:
            self.model = torch._inductor.aoti_load_package(path)
        except Exception as e:  # noqa: BLE001 - the loader raises RuntimeError and others
            raise InputError(f'torch cannot load the AOTInductor package {path!r}: {e}') from e
        self.torch = torch

    def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self.torch.inference_mode():
            boxes, scores, labels = self.model(self.torch.from_numpy(image))
        return boxes.numpy(), scores.numpy(), labels.numpy()


RUNTIMES = ('onnxruntime', 'openvino')


def load_model(
    path: str,
    meta: Dict,
    threads: Optional[int] = None,
    library=None,
    runtime: str = 'onnxruntime',
):
    """The model of ``path`` in ``runtime`` (``.onnx``: ``'onnxruntime'`` or
    ``'openvino'``; ``.pt2``: torch, ``runtime`` must stay the default)."""
    if runtime not in RUNTIMES:
        raise InputError(f'runtime must be one of {RUNTIMES}, got {runtime!r}')
    if meta['format'] == 'onnx':
        if runtime == 'onnxruntime':
            return OnnxModel(path, threads)
        if meta.get('precision') == 'int8':
            raise InputError(
                f'{path!r} was exported with --precision int8, quantized for ONNX Runtime: run '
                'it with --runtime onnxruntime, or give OpenVINO the float32 export'
            )
        if meta.get('msda_form', 'grid_sample') != 'grid_sample':
            raise InputError(
                f'{path!r} was exported with --msda-form {meta["msda_form"]} (DeformConv), '
                'which OpenVINO does not read: run it with --runtime onnxruntime, or export '
                'with --msda-form grid_sample for OpenVINO'
            )
        return OpenVinoModel(path, threads)
    if runtime != 'onnxruntime':
        raise InputError(
            f'--runtime {runtime} runs .onnx models; {path!r} is a .pt2 package (run by torch)'
        )
    return Pt2Model(path, threads, library)


# --------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------
def predict(model, img: np.ndarray, meta: Dict) -> Dict[str, np.ndarray]:
    """Detections of one decoded image, boxes in its own pixels."""
    resized, (w_scale, h_scale) = resize_image(img, meta['resize'])
    boxes, scores, labels = model(np.ascontiguousarray(resized))
    factors = np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)
    return dict(
        bboxes=(boxes.astype(np.float32) / factors).astype(np.float32),
        scores=scores.astype(np.float32),
        labels=labels.astype(np.int64),
    )


def draw(img: np.ndarray, preds: Dict[str, np.ndarray], meta: Dict, score_thr: float):
    """The detections above ``score_thr`` drawn on a copy of ``img`` (BGR)."""
    canvas = img.copy()
    classes = meta['classes']
    palette = meta.get('palette') or []
    thickness = max(1, round(min(img.shape[:2]) / 300))
    for box, score, label in zip(preds['bboxes'], preds['scores'], preds['labels']):
        if score < score_thr:
            continue
        r, g, b = palette[label % len(palette)] if palette else (0, 255, 0)
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (b, g, r), thickness)
        name = classes[label] if 0 <= label < len(classes) else str(label)
        cv2.putText(
            canvas,
            f'{name} {score:.2f}',
            (x1, max(y1 - 3, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (b, g, r),
            1,
            cv2.LINE_AA,
        )
    return canvas


def write_outputs(
    name: str,
    img: np.ndarray,
    preds: Dict[str, np.ndarray],
    meta: Dict,
    out_dir: str,
    score_thr: float,
    save_vis: bool = True,
) -> str:
    """Write ``preds/<stem>.json`` (and ``vis/<name>``); returns the JSON path."""
    stem = osp.splitext(name)[0]
    os.makedirs(osp.join(out_dir, 'preds'), exist_ok=True)
    path = osp.join(out_dir, 'preds', stem + '.json')
    result = dict(
        labels=preds['labels'].tolist(),
        scores=preds['scores'].tolist(),
        bboxes=preds['bboxes'].tolist(),
    )
    with open(path, 'w') as f:
        json.dump(result, f)
    if save_vis:
        os.makedirs(osp.join(out_dir, 'vis'), exist_ok=True)
        cv2.imwrite(osp.join(out_dir, 'vis', name), draw(img, preds, meta, score_thr))
    return path


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='exported model (.onnx or .pt2) with its .json beside it')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--out-dir', required=True, help='output folder (preds/ and vis/)')
    parser.add_argument(
        '--score-thr',
        type=float,
        default=None,
        help="draw detections above this score (default: the export's, 0.3 unless set)",
    )
    parser.add_argument('--threads', type=int, default=None, help='CPU threads of the runtime')
    parser.add_argument('--no-vis', action='store_true', help='do not write the drawings')
    parser.add_argument(
        '--runtime',
        choices=RUNTIMES,
        default='onnxruntime',
        help='runtime of a .onnx model (default: %(default)s; openvino: float32)',
    )
    parser.add_argument(
        '--ops-library',
        default=None,
        help='path of mmdet_deform/_C*.so for .pt2 models (default: found beside the package)',
    )
    args = parser.parse_args(argv)
    if args.score_thr is not None and not 0 <= args.score_thr <= 1:
        parser.error(f'--score-thr must be in [0, 1], got {args.score_thr}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be >= 1, got {args.threads}')
    return args


def check_inputs(args: argparse.Namespace) -> Tuple[Dict, List[Tuple[str, np.ndarray]]]:
    """The metadata and every decoded image, or an InputError listing all
    problems (nothing runs then)."""
    meta = load_metadata(args.model)
    problems = []
    images = []
    for path in args.images:
        try:
            img = read_image(path)
        except InputError as e:
            problems.append(str(e))
            continue
        height, width = resized_shape(img.shape[0], img.shape[1], meta['resize'])
        problem = size_problem(height, width, meta)
        if problem is not None:
            problems.append(f'image {path!r} ({img.shape[0]}x{img.shape[1]}) {problem}')
            continue
        images.append((path, img))
    names = [osp.basename(p) for p, _ in images]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f'images share the file names {duplicates}: their outputs would collide')
    if problems:
        raise InputError('bad input, nothing was run:\n  ' + '\n  '.join(problems))
    return meta, images


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict]:
    args = parse_args(argv)
    try:
        meta, images = check_inputs(args)
        model = load_model(args.model, meta, args.threads, args.ops_library, args.runtime)
    except InputError as e:
        print(f'run_exported.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    score_thr = meta.get('score_thr', 0.3) if args.score_thr is None else args.score_thr
    results = {}
    for path, img in images:
        preds = predict(model, img, meta)
        name = osp.basename(path)
        write_outputs(name, img, preds, meta, args.out_dir, score_thr, not args.no_vis)
        results[path] = preds
        kept = int((preds['scores'] >= score_thr).sum())
        print(f'{path}: {kept} detections above {score_thr}')
    print(f'results have been saved at {osp.abspath(args.out_dir)}')
    return results


if __name__ == '__main__':
    main()
