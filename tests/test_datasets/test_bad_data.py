"""Bad data: degenerate boxes are dropped with one warning per dataset,
missing / corrupt image files raise an error naming the file (or are skipped
when asked), a missing annotation file is named, and images without boxes
train as negatives end to end (the model-level check is
tests/test_models/test_deformable_detr.py::test_empty_ground_truth)."""

import json
import logging
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
from mmdet.datasets import CocoDataset
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope

from mmdet_deform.datasets import CheckedCocoDataset, CorruptImageError, ShapesDataset
from mmdet_deform.registry import MODELS

from ..conftest import CONFIG_DIR

SIZE = 96
CLASSES = ('circle', 'square')
PIPELINE = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True),
    dict(type='PackDetInputs'),
]
GOOD_BOX = [10.0, 12.0, 30.0, 20.0]
DEGENERATE = {  # name -> bbox (x, y, w, h) of a 96x96 image
    'zero width': [40.0, 40.0, 0.0, 10.0],
    'sub-pixel height': [40.0, 40.0, 10.0, 0.5],
    'outside': [120.0, 10.0, 20.0, 20.0],
    'nan': [float('nan'), 10.0, 20.0, 20.0],
}


def _write_coco(root, images, annotations) -> str:
    """COCO json of ``images`` (file names) with ``annotations`` {file: [bbox, ...]}."""
    coco = dict(images=[], annotations=[], categories=[])
    for i, name in enumerate(CLASSES):
        coco['categories'].append(dict(id=i + 1, name=name))
    for img_id, file_name in enumerate(images, 1):
        coco['images'].append(dict(id=img_id, file_name=file_name, width=SIZE, height=SIZE))
        for bbox in annotations.get(file_name, []):
            coco['annotations'].append(
                dict(
                    id=len(coco['annotations']) + 1,
                    image_id=img_id,
                    category_id=1,
                    bbox=bbox,
                    area=bbox[2] * bbox[3],
                    iscrowd=0,
                )
            )
    (root / 'annotations').mkdir(exist_ok=True)
    path = root / 'annotations' / 'train.json'
    path.write_text(json.dumps(coco))  # NaN is written as NaN, which json (and pycocotools) read
    return str(path)


def _write_image(path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    cv2.rectangle(img, (10, 12), (40, 32), (0, 0, 255), -1)
    assert cv2.imwrite(str(path), img)


@pytest.fixture
def coco_root(tmp_path):
    """Four images with good boxes (one also with every kind of degenerate
    box), and two images without any box."""
    (tmp_path / 'img').mkdir()
    names = ['a.jpg', 'b.jpg', 'c.png', 'd.jpg', 'empty1.jpg', 'empty2.jpg']
    for seed, name in enumerate(names):
        _write_image(tmp_path / 'img' / name, seed)
    annotations = {name: [GOOD_BOX] for name in names[:4]}
    annotations['a.jpg'] = [GOOD_BOX, *DEGENERATE.values()]
    _write_coco(tmp_path, names, annotations)
    return tmp_path


def _dataset(root, cls=CheckedCocoDataset, **kwargs):
    init_default_scope('mmdet_deform')
    args = dict(
        data_root=str(root),
        ann_file='annotations/train.json',
        data_prefix=dict(img='img/'),
        metainfo=dict(classes=CLASSES),
        filter_cfg=dict(filter_empty_gt=False),
        pipeline=PIPELINE,
    )
    args.update(kwargs)
    return cls(**args)


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings():
    handler = Captured()
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_degenerate_boxes_are_dropped_with_one_warning_per_dataset(coco_root, warnings):
    ds = _dataset(coco_root)
    dropped = [m for m in warnings if 'degenerate boxes' in m]
    assert len(dropped) == 1
    message = dropped[0]
    assert 'dropped 4 degenerate boxes' in message and 'in 1 of 6 images' in message
    for kind in ('1 with non-finite coordinates', '1 with outside the image',
                 '2 with width or height below 1 px'):  # fmt: skip
        assert kind in message
    assert 'a.jpg' in message
    # what is kept is exactly what mmdet's CocoDataset keeps
    mmdet_ds = _dataset(coco_root, cls=CocoDataset)
    assert len(ds) == len(mmdet_ds) == 6
    for i in range(len(ds)):
        ours, theirs = ds.get_data_info(i)['instances'], mmdet_ds.get_data_info(i)['instances']
        assert [b['bbox'] for b in ours] == [b['bbox'] for b in theirs]
    assert [b['bbox'] for b in ds.get_data_info(0)['instances']] == [[10.0, 12.0, 40.0, 32.0]]
    for _ in range(2):  # iterating (every epoch) adds no warning
        for i in range(len(ds)):
            boxes = ds[i]['data_samples'].gt_instances.bboxes.tensor
            assert torch.isfinite(boxes).all()
    assert len([m for m in warnings if 'degenerate boxes' in m]) == 1


@pytest.mark.parametrize(
    'damage,problem,error',
    [
        ('remove', 'does not exist', FileNotFoundError),
        ('empty', r'is empty \(0 bytes\)', CorruptImageError),
        ('truncate', 'is truncated', CorruptImageError),  # OpenCV would decode it silently
        ('garbage', 'could not be decoded', CorruptImageError),
    ],
)
def test_bad_image_file_raises_naming_the_file(coco_root, damage, problem, error):
    path = coco_root / 'img' / 'b.jpg'
    data = path.read_bytes()
    if damage == 'remove':
        path.unlink()
    else:
        path.write_bytes({'empty': b'', 'truncate': data[: len(data) // 2]}.get(damage, b'x' * 500))
    ds = _dataset(coco_root)
    ds[0]  # a good image loads
    with pytest.raises(error, match=rf'{path} {problem}.*image id 2.*skip_bad_images=True'):
        ds[1]


def test_truncated_png_and_a_good_png(coco_root):
    ds = _dataset(coco_root)
    assert ds[2]['inputs'].shape[0] == 3  # c.png loads
    path = coco_root / 'img' / 'c.png'
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CorruptImageError, match=r'c\.png is truncated \(a PNG'):
        ds[2]


def test_bad_images_are_skipped_when_the_dataset_says_so(coco_root, warnings):
    (coco_root / 'img' / 'b.jpg').unlink()
    (coco_root / 'img' / 'd.jpg').write_bytes(b'')
    ds = _dataset(coco_root, skip_bad_images=True)
    good = {'a.jpg', 'c.png', 'empty1.jpg', 'empty2.jpg'}
    for _ in range(3):
        for idx in (1, 3):
            sample = ds[idx]  # another, good image is drawn instead
            assert osp.basename(sample['data_samples'].img_path) in good
    skipped = [m for m in warnings if m.startswith('Skipping image')]
    assert len(skipped) == 2  # once per file, not per fetch
    assert any('b.jpg' in m and 'does not exist' in m for m in skipped)
    assert any('d.jpg' in m and 'is empty' in m for m in skipped)
    # evaluation never skips: every image must be scored
    test_ds = _dataset(coco_root, skip_bad_images=True, test_mode=True)
    with pytest.raises(FileNotFoundError, match='b.jpg'):
        test_ds[1]


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'annotations/train\.json.*not found'):
        _dataset(tmp_path / 'nowhere')
    # the shapes dataset also says how to generate its data (see also
    # tests/test_datasets/test_shapes.py::test_dataset_without_generate_names_the_missing_file)
    with pytest.raises(FileNotFoundError, match=r'generate_shapes\.py --out'):
        _dataset(tmp_path / 'nowhere', cls=ShapesDataset, metainfo=None)


def test_images_without_boxes_train_as_negatives(coco_root):
    """Dataset -> pipeline -> collate -> data preprocessor -> loss of the shapes model."""
    ds = _dataset(coco_root)
    assert len(ds) == 6  # filter_empty_gt=False keeps the images without boxes
    batch = pseudo_collate([ds[4], ds[5]])
    assert all(len(s.gt_instances) == 0 for s in batch['data_samples'])
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'deformable_detr', 'two_stage_shapes.py'))
    cfg.model.bbox_head.num_classes = len(CLASSES)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()  # level_embed is uninitialised memory until then (as in mmdet)
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model.loss(data['inputs'], data['data_samples'])
    cls_losses = {k: v for k, v in losses.items() if k.endswith('loss_cls')}
    box_losses = {k: v for k, v in losses.items() if k.endswith(('loss_bbox', 'loss_iou'))}
    assert len(cls_losses) == 4 and len(box_losses) == 8  # 3 decoder layers + encoder
    assert all(v.item() > 0 for v in cls_losses.values())
    assert all(v.item() == 0 for v in box_losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
