"""The synthetic shapes dataset: deterministic, valid COCO, idempotent, safe."""

import hashlib
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch  # noqa: F401  (first: mmdet_deform._C needs libtorch loaded)
from mmengine.config import Config
from mmengine.registry import init_default_scope
from pycocotools.coco import COCO

from mmdet_deform.datasets import (
    SHAPE_CLASSES,
    ShapesDataset,
    ShapesDirError,
    ShapesRenderParams,
    ensure_shapes_split,
    generate_shapes,
    render_shapes_image,
)
from mmdet_deform.datasets.shapes_generator import MANIFEST_NAME, image_rng
from mmdet_deform.registry import DATASETS

from ..conftest import CONFIG_DIR

# Tiny images keep every test here well under a second or two.
TINY = dict(img_size=96, min_size=8.0, max_size=60.0)


def _digest(root: str) -> dict:
    """md5 of every file under ``root`` except the lock, by relative path."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == '.shapes.lock':
                continue
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = hashlib.md5(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('shapes') / 'shapes')
    generate_shapes(root, num_train=24, num_val=8, seed=3, **TINY)
    return root


def test_generation_is_deterministic(tiny_root, tmp_path):
    other = str(tmp_path / 'again')
    generate_shapes(other, num_train=24, num_val=8, seed=3, **TINY)
    assert _digest(other) == _digest(tiny_root)
    different = str(tmp_path / 'seed4')
    generate_shapes(different, num_train=24, num_val=8, seed=4, **TINY)
    a, b = _digest(different), _digest(tiny_root)
    assert a.keys() == b.keys()
    assert a['annotations/train.json'] != b['annotations/train.json']


def test_image_rendering_is_a_function_of_its_seed():
    params = ShapesRenderParams(**TINY)
    img1, objs1 = render_shapes_image(image_rng(0, 'train', 5), params)
    img2, objs2 = render_shapes_image(image_rng(0, 'train', 5), params)
    img3, _ = render_shapes_image(image_rng(0, 'val', 5), params)
    assert np.array_equal(img1, img2) and objs1 == objs2
    assert not np.array_equal(img1, img3)
    assert img1.shape == (96, 96, 3) and img1.dtype == np.uint8


@pytest.mark.parametrize('split,num', [('train', 24), ('val', 8)])
def test_annotations_are_valid_coco(tiny_root, split, num):
    coco = COCO(osp.join(tiny_root, 'annotations', f'{split}.json'))
    cats = coco.loadCats(coco.getCatIds())
    assert [c['name'] for c in cats] == list(SHAPE_CLASSES)
    assert [c['id'] for c in cats] == list(range(1, len(SHAPE_CLASSES) + 1))
    assert len(coco.getImgIds()) == num
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= num  # 2..8 objects per image, a few may not fit
    assert len({a['id'] for a in anns}) == len(anns)
    for img in coco.loadImgs(coco.getImgIds()):
        path = osp.join(tiny_root, split, img['file_name'])
        pixels = cv2.imread(path)
        assert pixels is not None, path
        assert pixels.shape[:2] == (img['height'], img['width']) == (96, 96)
        img_anns = coco.loadAnns(coco.getAnnIds(imgIds=img['id']))
        assert len(img_anns) <= 8
        for a in img_anns:
            x, y, w, h = a['bbox']
            assert w >= 1 and h >= 1, a
            assert x >= 0 and y >= 0 and x + w <= img['width'] and y + h <= img['height'], a
            assert a['area'] == w * h and a['iscrowd'] == 0
            assert a['category_id'] in coco.getCatIds()
    # every class occurs
    assert {a['category_id'] for a in coco.loadAnns(coco.getAnnIds())} == set(coco.getCatIds())


def test_default_sizes_span_small_to_large():
    params = ShapesRenderParams()
    areas = [
        o['bbox'][2] * o['bbox'][3]
        for i in range(40)
        for o in render_shapes_image(image_rng(0, 'train', i), params)[1]
    ]
    areas = np.array(areas)
    # COCO's small (< 32^2), medium and large (> 96^2) objects are all frequent
    for frac in ((areas < 32**2).mean(), ((areas >= 32**2) & (areas < 96**2)).mean()):
        assert frac > 0.15
    assert (areas >= 96**2).mean() > 0.1


def test_boxes_are_tight_around_visible_pixels_and_occlusion_is_bounded():
    params = ShapesRenderParams(img_size=128, max_size=100.0, max_occlusion=0.4)
    occluded = 0
    for i in range(30):
        img, objs, owner = render_shapes_image(image_rng(0, 'train', i), params, True)
        assert owner.shape == img.shape[:2]
        assert set(np.unique(owner)) <= set(range(-1, len(objs)))
        for k, obj in enumerate(objs):
            ys, xs = np.nonzero(owner == k)
            x, y, w, h = obj['bbox']
            assert [x, y, w, h] == [xs.min(), ys.min(), xs.ptp() + 1, ys.ptp() + 1]
            assert 1 - params.max_occlusion - 1e-9 <= obj['visible'] <= 1
            occluded += obj['visible'] < 1
    assert occluded > 0  # partial occlusion does happen


def test_second_call_skips_and_keeps_files(tiny_root):
    before = _digest(tiny_root)
    mtimes = {p: os.stat(osp.join(tiny_root, p)).st_mtime_ns for p in before}
    assert generate_shapes(tiny_root, 24, 8, seed=3, **TINY) == {'train': False, 'val': False}
    assert _digest(tiny_root) == before
    assert {p: os.stat(osp.join(tiny_root, p)).st_mtime_ns for p in before} == mtimes


def _corrupt_in_progress(root: str, split: str = 'train') -> None:
    """What a kill during generation leaves: manifest says in_progress, files partial."""
    path = osp.join(root, MANIFEST_NAME)
    with open(path) as f:
        manifest = json.load(f)
    manifest['splits'][split]['status'] = 'in_progress'
    with open(path, 'w') as f:
        json.dump(manifest, f)
    os.unlink(osp.join(root, 'annotations', f'{split}.json'))


def test_partial_split_is_regenerated(tiny_root, tmp_path):
    root = str(tmp_path / 'shapes')
    generate_shapes(root, 24, 8, seed=3, **TINY)
    _corrupt_in_progress(root)
    os.unlink(osp.join(root, 'train', '000003.jpg'))
    assert generate_shapes(root, 24, 8, seed=3, **TINY) == {'train': True, 'val': False}
    assert _digest(root) == _digest(tiny_root)
    # a missing image alone also makes the split incomplete
    os.unlink(osp.join(root, 'train', '000004.jpg'))
    assert ensure_shapes_split(root, 'train', 24, seed=3, **TINY) is True
    assert _digest(root) == _digest(tiny_root)


def test_changed_parameters_of_a_complete_split_are_refused(tmp_path):
    """Another job may be reading the complete split: it is not rebuilt in place."""
    root = str(tmp_path / 'shapes')
    ensure_shapes_split(root, 'val', 6, seed=0, **TINY)
    before = _digest(root)
    with pytest.raises(ShapesDirError, match=r"'val' split .* other parameters \(num_images: 6 "):
        ensure_shapes_split(root, 'val', 4, seed=0, **TINY)
    assert _digest(root) == before
    with pytest.raises(ShapesDirError, match='seed: 0 there, 1 asked'):
        ensure_shapes_split(root, 'val', 6, seed=1, **TINY)
    assert _digest(root) == before
    # the variant goes to a directory of its own; train joins val's root freely
    assert ensure_shapes_split(root + '_4', 'val', 4, seed=0, **TINY) is True
    assert ensure_shapes_split(root, 'train', 3, seed=0, **TINY) is True


def test_interrupted_split_with_other_parameters_is_replaced(tmp_path):
    """No job reads a split whose generation was killed: the new parameters
    take it over, and the images only the old ones had go (they were ours)."""
    root = str(tmp_path / 'shapes')
    ensure_shapes_split(root, 'val', 6, seed=0, **TINY)
    _corrupt_in_progress(root, 'val')
    assert ensure_shapes_split(root, 'val', 4, seed=0, **TINY) is True
    assert sorted(os.listdir(osp.join(root, 'val'))) == [f'{i:06d}.jpg' for i in range(4)]
    with open(osp.join(root, MANIFEST_NAME)) as f:
        entry = json.load(f)['splits']['val']
    assert entry['status'] == 'complete' and len(entry['files']) == 5  # 4 images, 1 json


def test_a_users_file_in_a_split_is_never_deleted(tmp_path):
    root = tmp_path / 'shapes'
    generate_shapes(str(root), 4, 2, seed=0, **TINY)
    (root / 'train' / 'notes.txt').write_text('keep me')
    # a complete split stays complete with an extra file, which stays
    assert ensure_shapes_split(str(root), 'train', 4, seed=0, **TINY) is False
    os.unlink(root / 'train' / '000002.jpg')  # now incomplete: regenerating would touch train/
    before = _digest(str(root))
    with pytest.raises(ShapesDirError, match=r'did not write \(.*train/notes\.txt\)'):
        ensure_shapes_split(str(root), 'train', 4, seed=0, **TINY)
    assert _digest(str(root)) == before
    os.unlink(root / 'train' / 'notes.txt')  # moved away: regenerated
    assert ensure_shapes_split(str(root), 'train', 4, seed=0, **TINY) is True
    assert sorted(os.listdir(root / 'train')) == [f'{i:06d}.jpg' for i in range(4)]


def test_the_lock_file_is_never_a_followed_symlink(tmp_path):
    root = tmp_path / 'shapes'
    root.mkdir()
    target = tmp_path / 'elsewhere' / 'created_by_the_lock'
    (tmp_path / 'elsewhere').mkdir()
    os.symlink(target, root / '.shapes.lock')
    with pytest.raises(ShapesDirError, match='lock file .* is a symbolic link'):
        ensure_shapes_split(str(root), 'val', 2, **TINY)
    assert not target.exists()
    assert os.listdir(root) == ['.shapes.lock']


def test_refuses_a_directory_it_did_not_write(tmp_path):
    root = tmp_path / 'mine'
    root.mkdir()
    (root / 'notes.txt').write_text('keep me')
    with pytest.raises(ShapesDirError, match='not written by the shapes generator'):
        generate_shapes(str(root), 4, 2, **TINY)
    assert sorted(os.listdir(root)) == ['notes.txt']
    assert (root / 'notes.txt').read_text() == 'keep me'
    (root / MANIFEST_NAME).write_text('{"generator": "someone-else"}')
    with pytest.raises(ShapesDirError, match='not written by the shapes generator'):
        generate_shapes(str(root), 4, 2, **TINY)
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    with pytest.raises(ShapesDirError, match='not a directory'):
        generate_shapes(str(a_file), 4, 2, **TINY)


def test_lock_and_temp_files_of_another_generator_are_not_foreign(tmp_path):
    # What a second process sees while the first one is writing its manifest.
    root = tmp_path / 'shapes'
    root.mkdir()
    (root / '.shapes.lock').touch()
    (root / '.shapes_tmp_abc.json').write_text('{')
    assert ensure_shapes_split(str(root), 'val', 2, **TINY) is True


def test_empty_existing_directory_is_used(tmp_path):
    root = tmp_path / 'empty'
    root.mkdir()
    assert ensure_shapes_split(str(root), 'val', 2, **TINY) is True


@pytest.mark.parametrize(
    'kwargs,name',
    [
        (dict(split='test', num_images=2), 'split'),
        (dict(split='val', num_images=0), 'num_images'),
        (dict(split='val', num_images=2, seed=-1), 'seed'),
        (dict(split='val', num_images=2, img_size=8), 'img_size'),
        (dict(split='val', num_images=2, max_size=500.0), 'max_size'),
        (dict(split='val', num_images=2, max_occlusion=1.0), 'max_occlusion'),
        (dict(split='val', num_images=2, min_objects=5, max_objects=3), 'max_objects'),
    ],
)
def test_bad_parameters_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        ensure_shapes_split(str(tmp_path / 'x'), **kwargs)
    assert not (tmp_path / 'x').exists()


def test_unknown_parameter_is_rejected(tmp_path):
    with pytest.raises(TypeError, match='colour'):
        ensure_shapes_split(str(tmp_path / 'x'), 'val', 2, colour='red')


@pytest.mark.slow
def test_concurrent_processes_generate_once(tmp_path, repo_root):
    # Fresh interpreters, as the ranks of a distributed run are.
    root = str(tmp_path / 'shapes')
    code = (
        'from mmdet_deform.datasets import ensure_shapes_split; '
        f'print("generated", ensure_shapes_split({root!r}, "train", 16, seed=1, **{TINY!r}))'
    )
    pythonpath = os.pathsep.join([repo_root, os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs, errs = zip(*(p.communicate(timeout=300) for p in procs))
    assert [p.returncode for p in procs] == [0, 0], '\n'.join(e[-2000:] for e in errs)
    results = sorted(line for out in outs for line in out.splitlines() if 'generated' in line)
    assert results == ['generated False', 'generated True']
    assert len(COCO(osp.join(root, 'annotations', 'train.json')).getImgIds()) == 16


def _shapes_cfg(split: str) -> dict:
    init_default_scope('mmdet_deform')  # as the Runner does: pipeline types are unscoped
    cfg = Config.fromfile(osp.join(CONFIG_DIR, 'deformable_detr', 'two_stage_shapes.py'))
    return cfg[f'{split}_dataloader'].dataset.to_dict()


def test_dataset_generates_on_first_use(tmp_path):
    cfg = _shapes_cfg('train')
    cfg.update(data_root=str(tmp_path / 'shapes'), indices=5)
    cfg['generate'].update(num_images=12, **TINY)
    ds = DATASETS.build(cfg)
    assert isinstance(ds, ShapesDataset)
    assert len(ds) == 5
    assert ds.metainfo['classes'] == SHAPE_CLASSES
    assert len(ds.metainfo['palette']) == len(SHAPE_CLASSES)
    sample = ds[0]
    boxes = sample['data_samples'].gt_instances.bboxes.tensor
    assert boxes.shape[0] >= 1 and boxes.shape[1] == 4
    # the val dataset of the same root adds its split next to train's
    val = _shapes_cfg('val')
    val.update(data_root=str(tmp_path / 'shapes'))
    val['generate'].update(num_images=4, **TINY)
    assert len(DATASETS.build(val)) == 4
    assert sorted(os.listdir(tmp_path / 'shapes' / 'annotations')) == ['train.json', 'val.json']


def test_dataset_without_generate_names_the_missing_file(tmp_path):
    cfg = _shapes_cfg('val')
    cfg.update(data_root=str(tmp_path / 'nothing'), generate=None)
    with pytest.raises(FileNotFoundError, match=r'annotations/val\.json.*generate_shapes\.py'):
        DATASETS.build(cfg)


def test_dataset_rejects_paths_that_do_not_match_the_split(tmp_path):
    cfg = _shapes_cfg('val')
    cfg.update(data_root=str(tmp_path / 'shapes'), ann_file='annotations/train.json')
    with pytest.raises(ValueError, match='ann_file'):
        DATASETS.build(cfg)
    assert not (tmp_path / 'shapes').exists()


def test_dataset_never_overwrites_a_users_data_root(tmp_path):
    """A user's own COCO data at the config's data_root (same layout, same
    file names as the generator's, but no manifest) is refused, not
    regenerated over."""
    root = tmp_path / 'shapes'
    generate_shapes(str(root), num_train=3, num_val=2, seed=9, **TINY)
    os.unlink(root / MANIFEST_NAME)  # now it is the user's: same names, not ours
    os.unlink(root / '.shapes.lock')
    with open(root / 'annotations' / 'train.json') as f:
        coco = json.load(f)
    coco['info'] = {'description': 'my own labels'}
    with open(root / 'annotations' / 'train.json', 'w') as f:
        json.dump(coco, f)
    before = _digest(str(root))
    cfg = _shapes_cfg('train')
    cfg.update(data_root=str(root))
    cfg['generate'].update(num_images=12, **TINY)  # would regenerate a split of ours
    with pytest.raises(ShapesDirError, match=rf'{root}.*not written by the shapes generator'):
        DATASETS.build(cfg)
    assert _digest(str(root)) == before
    assert sorted(os.listdir(root)) == ['annotations', 'train', 'val']  # no lock left behind
