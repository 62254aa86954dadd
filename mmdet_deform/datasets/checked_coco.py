"""mmdet's ``CocoDataset`` with checks that turn bad data into clear messages.

What :class:`CheckedCocoDataset` adds to mmdet's COCO loading:

* A missing annotation file raises ``FileNotFoundError`` naming the path
  (mmdet fails inside pycocotools).
* Degenerate boxes (non-finite coordinates, width or height below one pixel,
  no overlap with the image) are dropped by mmdet silently; here they are
  counted while the annotations are parsed, and one warning per dataset says
  how many of each kind were dropped, with examples (never one per
  iteration).
* Every image file is checked before the pipeline reads it: a missing, empty,
  truncated (JPEG without its end marker, PNG without its IEND chunk; OpenCV
  decodes a truncated JPEG without any error, grey where the data is missing)
  or undecodable file raises an error naming the file, the dataset and the
  image id, or with ``skip_bad_images=True`` is skipped with a warning (once
  per file and process) and another image is drawn (training only).
"""

import logging
import math
import os
import os.path as osp
from collections import Counter
from typing import List, Optional, Set, Union

from mmdet.datasets import CocoDataset
from mmengine.logging import print_log

from ..registry import DATASETS

__all__ = ['CheckedCocoDataset', 'CorruptImageError', 'image_file_problem']

_TAIL = 1024  # the end markers are searched in the last bytes (some files pad after them)


class CorruptImageError(OSError):
    """An image file exists but is empty, truncated or cannot be decoded."""


def image_file_problem(path: str) -> Optional[str]:
    """What is wrong with an image file, cheaply (no decoding).

    Args:
        path (str): A local path.

    Returns:
        str or None: ``'does not exist'``, ``'is empty (0 bytes)'``,
        ``'is truncated (...)'``, ``'cannot be read (...)'``, or None when the
        file looks whole (its decoding may still fail).
    """
    if not osp.exists(path):
        return 'does not exist'
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 'is empty (0 bytes)'
        with open(path, 'rb') as f:
            head = f.read(8)
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as e:
        return f'cannot be read ({e})'
    if head.startswith(b'\xff\xd8\xff') and b'\xff\xd9' not in tail:
        return 'is truncated (a JPEG without its end-of-image marker)'
    if head.startswith(b'\x89PNG\r\n\x1a\n') and b'IEND' not in tail:
        return 'is truncated (a PNG without its IEND chunk)'
    return None


def _box_problem(ann: dict, width: float, height: float) -> Optional[str]:
    """Why mmdet's ``CocoDataset`` drops the box of ``ann`` (None: it keeps it)."""
    x, y, w, h = ann['bbox']
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return 'non-finite coordinates'
    if ann.get('area', w * h) <= 0 or w < 1 or h < 1:
        return 'width or height below 1 px'
    inter_w = max(0, min(x + w, width) - max(x, 0))
    inter_h = max(0, min(y + h, height) - max(y, 0))
    if inter_w * inter_h == 0:
        return 'outside the image'
    return None


@DATASETS.register_module()
class CheckedCocoDataset(CocoDataset):
    """``CocoDataset`` that reports bad annotations and image files clearly.

    See the module docstring for the checks. Images without boxes are kept
    (with ``filter_cfg=dict(filter_empty_gt=False)``) and train as negatives:
    the classification loss pushes every query to background, the box losses
    are zero.

    Args:
        *args: Passed to :class:`mmdet.datasets.CocoDataset`.
        skip_bad_images (bool): In training, skip a missing or corrupt image
            file with a warning and draw another image, instead of raising.
            Test mode always raises (every image must be evaluated).
            Defaults to False.
        **kwargs: Passed to :class:`mmdet.datasets.CocoDataset`.
    """

    def __init__(self, *args, skip_bad_images: bool = False, **kwargs) -> None:
        if not isinstance(skip_bad_images, bool):
            raise TypeError(f'skip_bad_images must be a bool, got {skip_bad_images!r}')
        self.skip_bad_images = skip_bad_images
        self._dropped_boxes: List[tuple] = []
        self._reported_images: Set[str] = set()
        super().__init__(*args, **kwargs)

    # ----------------------------------------------------------- annotations
    def _is_local(self) -> bool:
        backend = (self.backend_args or {}).get('backend', 'local')
        return backend in ('local', 'atomic_local')

    def _missing_ann_file_message(self) -> str:
        return (
            f'{type(self).__name__}: annotation file {self.ann_file!r} not found '
            f'(data_root={self.data_root!r}, ann_file is relative to it)'
        )

    def load_data_list(self) -> List[dict]:
        """Load the COCO annotations; then warn once about dropped boxes."""
        if self._is_local() and not osp.isfile(self.ann_file):
            raise FileNotFoundError(self._missing_ann_file_message())
        self._dropped_boxes = []
        data_list = super().load_data_list()
        if self._dropped_boxes:
            self._warn_dropped_boxes(len(data_list))
        return data_list

    def parse_data_info(self, raw_data_info: dict) -> Union[dict, List[dict]]:
        """mmdet's parsing, counting the degenerate boxes it drops."""
        img_info = raw_data_info['raw_img_info']
        for ann in raw_data_info['raw_ann_info']:
            if ann.get('ignore', False):
                continue
            problem = _box_problem(ann, img_info['width'], img_info['height'])
            if problem is not None:
                self._dropped_boxes.append((problem, ann.get('id'), img_info['file_name']))
        return super().parse_data_info(raw_data_info)

    def _warn_dropped_boxes(self, num_images: int) -> None:
        counts = Counter(problem for problem, _, _ in self._dropped_boxes)
        kinds = ', '.join(f'{n} with {problem}' for problem, n in sorted(counts.items()))
        examples = ', '.join(
            f'annotation {ann_id} of {file_name} ({problem})'
            for problem, ann_id, file_name in self._dropped_boxes[:3]
        )
        images = len({file_name for _, _, file_name in self._dropped_boxes})
        print_log(
            f'{type(self).__name__} {self.ann_file}: dropped {len(self._dropped_boxes)} '
            f'degenerate boxes ({kinds}) in {images} of {num_images} images, e.g. {examples}',
            logger='current',
            level=logging.WARNING,
        )

    # ---------------------------------------------------------------- images
    def prepare_data(self, idx: int) -> Optional[dict]:
        """Check the image file, then run the pipeline on it.

        Returns:
            dict or None: The pipeline's output; None for a skipped bad image
            (mmengine's ``BaseDataset`` then draws another index).
        """
        data_info = self.get_data_info(idx)
        path = data_info.get('img_path')
        if not path or not self._is_local():
            return self.pipeline(data_info)
        problem = image_file_problem(path)
        if problem is None:
            try:
                return self.pipeline(data_info)
            except Exception as e:
                if osp.isfile(path) and _is_decode_failure(e):
                    return self._bad_image(data_info, 'could not be decoded as an image', e)
                raise
        return self._bad_image(data_info, problem)

    def _bad_image(
        self, data_info: dict, problem: str, cause: Optional[BaseException] = None
    ) -> None:
        path = data_info['img_path']
        where = f'{type(self).__name__} {self.ann_file}, image id {data_info.get("img_id")}'
        if self.skip_bad_images and not self.test_mode:
            if path not in self._reported_images:
                self._reported_images.add(path)
                print_log(
                    f'Skipping image {path} ({where}): it {problem}',
                    logger='current',
                    level=logging.WARNING,
                )
            return None
        error = FileNotFoundError if problem == 'does not exist' else CorruptImageError
        hint = (
            ''
            if self.test_mode
            else '; or set skip_bad_images=True on the dataset to skip such images'
        )
        raise error(
            f'image file {path} {problem} ({where}). Restore or remove it{hint}.'
        ) from cause


def _is_decode_failure(error: BaseException) -> bool:
    """Whether ``error`` is how mmcv / OpenCV fail on an undecodable file."""
    text = str(error)
    return 'failed to load image' in text or type(error).__name__ == 'error'  # cv2.error
