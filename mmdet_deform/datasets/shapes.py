"""The embedded synthetic shapes dataset, generated on first use."""

import os.path as osp
from typing import List, Optional

from mmdet.datasets import CocoDataset

from ..registry import DATASETS
from .shapes_drawing import SHAPE_CLASSES
from .shapes_generator import GENERATE_HINT, ann_file_of, ensure_shapes_split, img_dir_of


@DATASETS.register_module()
class ShapesDataset(CocoDataset):
    """COCO-format dataset of the synthetic shapes (circle, square, ...).

    With ``generate`` set, the split is generated into ``data_root`` when it
    is missing, partial or was generated with other parameters (see
    :func:`~mmdet_deform.datasets.shapes_generator.ensure_shapes_split`), so a
    config trains on a fresh machine without any download. Every rank of a
    distributed run may build the dataset at once: generation is serialized
    by a file lock and done once.

    Args:
        *args: Passed to :class:`mmdet.datasets.CocoDataset`.
        generate (dict, optional): Arguments of ``ensure_shapes_split`` except
            ``root``: ``split`` (``'train'`` or ``'val'``), ``num_images``,
            ``seed`` and rendering parameters. ``ann_file`` and
            ``data_prefix.img`` must then be the split's
            (``annotations/<split>.json`` and ``<split>/``). None: the data
            must exist already.
        **kwargs: Passed to :class:`mmdet.datasets.CocoDataset`.
    """

    METAINFO = dict(
        classes=SHAPE_CLASSES,
        palette=[(220, 20, 60), (0, 130, 200), (255, 165, 0), (60, 180, 75), (145, 30, 180),
                 (0, 190, 190)],
    )  # fmt: skip

    def __init__(self, *args, generate: Optional[dict] = None, **kwargs) -> None:
        if generate is not None and not isinstance(generate, dict):
            raise TypeError(f'generate must be a dict or None, got {type(generate).__name__}')
        self.generate = None if generate is None else dict(generate)
        super().__init__(*args, **kwargs)

    def _check_generated_paths(self) -> None:
        """The split's files must be the ones the config reads."""
        split = self.generate.get('split')
        if not self.data_root:
            raise ValueError('ShapesDataset: generate needs data_root (where to generate)')
        expected = dict(
            ann_file=ann_file_of(self.data_root, str(split)),
            img=img_dir_of(self.data_root, str(split)),
        )
        actual = dict(ann_file=self.ann_file, img=self.data_prefix.get('img', ''))
        for key in expected:
            if osp.normpath(actual[key]) != osp.normpath(expected[key]):
                name = 'ann_file' if key == 'ann_file' else "data_prefix['img']"
                raise ValueError(
                    f'ShapesDataset: {name} is {actual[key]!r} but the generated {split!r} split '
                    f'is at {expected[key]!r}; make them agree'
                )

    def load_data_list(self) -> List[dict]:
        """Generate the split if needed, then load it as COCO."""
        if self.generate is not None:
            self._check_generated_paths()
            ensure_shapes_split(self.data_root, **self.generate)
        elif not osp.isfile(self.ann_file):
            raise FileNotFoundError(
                f'ShapesDataset: annotation file {self.ann_file!r} not found. Generate the '
                f'shapes data with `{GENERATE_HINT}`, or set `generate=dict(split=..., '
                'num_images=...)` on the dataset to generate it on first use.'
            )
        return super().load_data_list()
