"""Inference entry points with checked inputs and checkpoints loaded as data.

mmdet's ``init_detector`` / ``inference_detector`` / ``DetInferencer`` with
three differences, so that what a user passes in gives either detections or a
clear error:

* images: a file must exist and be readable; an array must be an image
  (:func:`~mmdet_deform.datasets.check_image_array`): (H, W) and (H, W, 1)
  are grayscale and become 3-channel (mmdet would raise an ``IndexError``
  deep in the data preprocessor), (H, W, 4) loses its alpha; an empty image
  (mmdet: ``ZeroDivisionError``), non-finite values (mmdet: NaN boxes) and
  float arrays (mmdet reads [0, 1] images as 0-255, i.e. black) raise
  ``ValueError`` naming the argument and the problem; uint8 0-255 is the
  contract. The test pipeline also gets a
  :class:`~mmdet_deform.datasets.CheckImage` step after the loading one, for
  what a config's loader produces (e.g. ``color_type='grayscale'``);
* weights: a local checkpoint is read by
  :func:`~mmdet_deform.engine.load_checkpoint_file` (no code runs, no
  arbitrary object is built, clear errors for broken files; checkpoints of
  mmdet 3.3 with numpy objects load too); URLs go through mmengine's
  weights-only loader;
* the config: always given by the caller. mmdet's
  ``DetInferencer(model=None, weights=...)`` takes the config text stored in
  the checkpoint and executes it as Python (``Config.fromstring``): a
  checkpoint from elsewhere would run code. :class:`SafeDetInferencer`
  refuses ``model=None``.
"""

import copy
import os
import os.path as osp
import re
import warnings
from typing import Any, List, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from mmdet.apis import DetInferencer
from mmengine.config import Config
from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model

from mmdet_deform.datasets import add_image_check, check_image_array, image_file_problem
from mmdet_deform.engine import load_checkpoint_file

ImageInput = Union[str, os.PathLike, np.ndarray]
_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')

__all__ = [
    'SafeDetInferencer',
    'check_inference_image',
    'image_path_problem',
    'inference_detector',
    'init_detector',
    'load_weights',
]


def image_path_problem(path: str) -> Optional[str]:
    """What keeps the file ``path`` from being read as an image (None: nothing found).

    Cheap: reads the file's first and last bytes, decodes nothing.
    """
    if not osp.exists(path):
        return 'does not exist'
    if not osp.isfile(path):
        return 'is not a file'
    problem = image_file_problem(path)
    if problem is None and not cv2.haveImageReader(path):
        problem = 'is not an image file OpenCV can read'
    return problem


def check_inference_image(image: Any, name: str = 'img') -> Union[str, np.ndarray]:
    """Check one image given to a detector.

    Args:
        image (str | os.PathLike | np.ndarray): An image file, or an image
            array (see :func:`~mmdet_deform.datasets.check_image_array`:
            uint8 0-255, BGR, grayscale or BGRA).
        name (str): How messages call it.

    Returns:
        str | np.ndarray: The path as ``str``, or the array as (H, W, 3) uint8.

    Raises:
        TypeError: Neither a path nor an array.
        FileNotFoundError: The file does not exist.
        ValueError: The file is not a readable image, or the array is not
            an acceptable image (the message says why).
    """
    if isinstance(image, np.ndarray):
        return check_image_array(image, name=name)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if _URL.match(path):
            return path  # read by mmcv's file backends, checked after loading
        problem = image_path_problem(path)
        if problem == 'does not exist':
            raise FileNotFoundError(f'{name}: image file {path!r} does not exist')
        if problem is not None:
            raise ValueError(f'{name}: image file {path!r} {problem}')
        return path
    raise TypeError(
        f'{name} must be an image file path or a numpy array, got {type(image).__name__}'
    )


def load_weights(checkpoint: str) -> dict:
    """A checkpoint for inference: local files as data
    (:func:`~mmdet_deform.engine.load_checkpoint_file`), URLs through
    mmengine's weights-only loader."""
    if _URL.match(str(checkpoint)):
        return _load_checkpoint(checkpoint, map_location='cpu')
    return load_checkpoint_file(checkpoint, map_location='cpu')


def init_detector(
    config: Union[str, Config],
    checkpoint: Optional[str] = None,
    device: str = 'cpu',
    cfg_options: Optional[dict] = None,
) -> torch.nn.Module:
    """mmdet's ``init_detector`` with the checkpoint loaded as data and an
    image check in the test pipeline.

    Args:
        config (str | Config): The config (never taken from the checkpoint).
        checkpoint (str, optional): Weights; None keeps the initial weights.
        device (str): Device of the model.
        cfg_options (dict, optional): Overrides of config settings.

    Returns:
        nn.Module: The model in eval mode, with ``cfg`` and ``dataset_meta``
        (the checkpoint's classes if it has them).
    """
    from mmdet.apis import init_detector as mmdet_init_detector

    if isinstance(config, (str, os.PathLike)):
        config = Config.fromfile(os.fspath(config))
    elif not isinstance(config, Config):
        raise TypeError(f'config must be a file path or a Config, got {type(config).__name__}')
    weights = None if checkpoint is None else load_weights(checkpoint)
    with warnings.catch_warnings(record=True) as caught:  # mmdet resets the filters inside
        warnings.simplefilter('always')
        model = mmdet_init_detector(config, None, device=device, cfg_options=cfg_options)
    for warning in caught:  # 'checkpoint is None' is not so when weights follow
        if weights is None or 'checkpoint is None' not in str(warning.message):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    pipeline = model.cfg.test_dataloader.dataset.pipeline
    model.cfg.test_dataloader.dataset.pipeline = add_image_check(pipeline)
    if weights is not None:
        _load_checkpoint_to_model(model, weights)
        meta = weights.get('meta', {}) if isinstance(weights, dict) else {}
        palette = model.dataset_meta.get('palette')
        if 'dataset_meta' in meta:
            model.dataset_meta = {
                k.lower(): v for k, v in copy.deepcopy(meta['dataset_meta']).items()
            }
        elif 'CLASSES' in meta:
            model.dataset_meta = {'classes': meta['CLASSES']}
        if palette is not None:
            model.dataset_meta.setdefault('palette', palette)
    return model


def inference_detector(
    model: torch.nn.Module,
    imgs: Union[ImageInput, Sequence[ImageInput]],
    test_pipeline: Optional[Any] = None,
):
    """mmdet's ``inference_detector`` with every image checked first
    (:func:`check_inference_image`).

    Args:
        model (nn.Module): A detector from :func:`init_detector`.
        imgs: An image file or array, or a list of them.
        test_pipeline (Compose, optional): As for mmdet's.

    Returns:
        DetDataSample or list[DetDataSample]: One per image, as mmdet's.
    """
    from mmdet.apis import inference_detector as mmdet_inference_detector

    if isinstance(imgs, (list, tuple)):
        if not imgs:
            raise ValueError('imgs: no image given (an empty list)')
        checked: Any = [check_inference_image(img, f'imgs[{i}]') for i, img in enumerate(imgs)]
        if len({type(img) for img in checked}) > 1:
            raise ValueError('imgs: give either files or arrays, not both in one call')
    else:
        checked = check_inference_image(imgs, 'imgs')
    return mmdet_inference_detector(model, checked, test_pipeline=test_pipeline)


class SafeDetInferencer(DetInferencer):
    """mmdet's ``DetInferencer`` with checked inputs and weights loaded as data.

    Differences (see the module docstring): ``model`` (a config file,
    ``Config`` or dict) is required, since ``model=None`` would execute the
    config text stored in the checkpoint; ``weights`` is read by
    :func:`load_weights`; every input image is checked
    (:func:`check_inference_image`) before anything runs, and the pipeline
    checks each loaded image; the visualizer is built without a
    ``LocalVisBackend`` that has no ``save_dir`` (the inferencer writes its
    drawings itself; such a backend only warns that it could not be added).

    Takes the arguments of :class:`mmdet.apis.DetInferencer`.
    """

    def __init__(self, model: Any = None, weights: Optional[str] = None, *args, **kwargs) -> None:
        if model is None:
            raise ValueError(
                'model: give the config (a file, Config or dict). The config text stored in a '
                "checkpoint is not used: mmdet's DetInferencer(model=None) would execute it as "
                'Python.'
            )
        super().__init__(model, weights, *args, **kwargs)

    def _init_model(self, cfg: Any, weights: Optional[str], device: str = 'cpu'):
        checkpoint = None if weights is None else load_weights(weights)
        with warnings.catch_warnings():  # weights follow right below
            warnings.filterwarnings('ignore', message='Checkpoint is not loaded')
            warnings.filterwarnings('ignore', message='weights is None')
            model = super()._init_model(cfg, None, device)
        if checkpoint is not None:
            self._load_weights_to_model(model, checkpoint, cfg)
            model.to(device)
        return model

    def _init_pipeline(self, cfg: Any):
        dataset = cfg.test_dataloader.dataset
        dataset.pipeline = add_image_check(dataset.pipeline)
        return super()._init_pipeline(cfg)

    def _init_visualizer(self, cfg: Any):
        visualizer = cfg.get('visualizer')
        if visualizer is not None and visualizer.get('save_dir') is None:
            backends = visualizer.get('vis_backends') or []
            visualizer.vis_backends = [
                b for b in backends if not str(b.get('type', '')).endswith('LocalVisBackend')
            ]
        return super()._init_visualizer(cfg)

    def _inputs_to_list(self, inputs: Any) -> List[Union[str, np.ndarray]]:
        if isinstance(inputs, (str, os.PathLike)) and not osp.exists(os.fspath(inputs)):
            raise FileNotFoundError(f'inputs: {os.fspath(inputs)!r} does not exist')
        items = super()._inputs_to_list(
            os.fspath(inputs) if isinstance(inputs, os.PathLike) else inputs
        )
        if not items:
            raise ValueError(f'inputs: no images found in {inputs!r}')
        return [check_inference_image(item, f'inputs[{i}]') for i, item in enumerate(items)]
