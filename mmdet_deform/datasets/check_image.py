"""Checks of the images a detector is given: shape, size, dtype, finite values."""

from typing import List, Optional

import numpy as np
from mmcv.transforms import BaseTransform

from ..registry import TRANSFORMS

#: What ``check_image_array`` accepts, for messages.
IMAGE_CONTRACT = (
    'a numpy array of shape (H, W, 3) in BGR order (also (H, W), (H, W, 1): grayscale, and '
    '(H, W, 4): BGRA), H and W >= 1, dtype uint8 (0-255)'
)

#: Pipeline steps that load the image, after which ``CheckImage`` goes.
_LOADERS = ('LoadImageFromFile', 'LoadImageFromNDArray', 'InferencerLoader')


def check_image_array(img: object, name: str = 'img', allow_float: bool = False) -> np.ndarray:
    """Check an image and bring it to the layout the detectors take.

    Args:
        img (np.ndarray): The image: (H, W) or (H, W, 1) grayscale, (H, W, 3)
            BGR or (H, W, 4) BGRA, dtype uint8 (0-255).
        name (str): How messages call the image (an argument name, a file).
        allow_float (bool): Also accept floating-point images, read as 0-255
            (what a ``LoadImageFromFile(to_float32=True)`` step makes). Off
            for images given by a user: a float image is as often in [0, 1],
            which a detector would silently see as black, so it is refused
            with the conversion to use.

    Returns:
        np.ndarray: (H, W, 3), C-contiguous, the dtype of ``img``; grayscale
        repeated to 3 channels, the alpha channel dropped.

    Raises:
        TypeError: ``img`` is not a numpy array.
        ValueError: The shape, size, dtype or a value is not acceptable; the
            message names ``name`` and the problem.
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f'{name} must be {IMAGE_CONTRACT}; got {type(img).__name__}')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f'{name} must be {IMAGE_CONTRACT}; got shape {tuple(img.shape)}')
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(
            f'{name} is empty: shape {tuple(img.shape)}, a detector needs H and W >= 1'
        )
    if img.dtype.kind == 'f':
        bad = int(np.count_nonzero(~np.isfinite(img)))
        if bad:
            raise ValueError(
                f'{name} has {bad} non-finite values (NaN or inf) of {img.size}; detections '
                'of such an image would be NaN. Fix or drop the image.'
            )
        if not allow_float:
            raise ValueError(
                f'{name} has dtype {img.dtype}: float images are ambiguous ([0, 1] or 0-255) and '
                f'not accepted; pass uint8 0-255, e.g. (img * 255).round().clip(0, 255)'
                '.astype(np.uint8) for an image in [0, 1]'
            )
    elif img.dtype != np.uint8:
        raise ValueError(f'{name} must be {IMAGE_CONTRACT}; got dtype {img.dtype}')
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


@TRANSFORMS.register_module()
class CheckImage(BaseTransform):
    """Check the loaded image of a pipeline (:func:`check_image_array`).

    Put right after the loading step (:func:`add_image_check` does). A 2-D
    or (H, W, 1) image becomes 3-channel, an RGBA one loses its alpha; an
    empty image, non-finite values or a dtype other than uint8 / float (read
    as 0-255) raise ``ValueError`` naming the file.

    Required keys: ``img``. Modified keys: ``img``, ``img_shape``.
    """

    def transform(self, results: dict) -> dict:
        source = results.get('img_path')
        name = f'image {source!r}' if source else 'the input image'
        img = check_image_array(results['img'], name=name, allow_float=True)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        return results


def add_image_check(pipeline: Optional[List[dict]]) -> Optional[List[dict]]:
    """``pipeline`` (a list of transform configs) with ``CheckImage`` right
    after its loading step; unchanged if it has one already or no loading step."""
    if not pipeline:
        return pipeline
    types = [str(step.get('type', '')) for step in pipeline]
    if any(t.split('.')[-1] == 'CheckImage' for t in types):
        return pipeline
    for i, t in enumerate(types):
        if t.split('.')[-1] in _LOADERS:
            return [*pipeline[: i + 1], dict(type='mmdet_deform.CheckImage'), *pipeline[i + 1 :]]
    return pipeline
