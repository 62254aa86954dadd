"""Generation of the synthetic shapes dataset in COCO format.

Layout under the dataset root (``data/shapes/`` by default)::

    .shapes_manifest.json     what was generated, with which parameters
    train/000000.jpg ...      the images of each split
    val/000000.jpg ...
    annotations/train.json    COCO detection annotations of each split
    annotations/val.json

Every image is rendered from its own random generator seeded with
``(seed, split, index)`` (:func:`image_rng`), so a split is a pure function of
its parameters. Rendering runs in the calling process (generating the default
dataset takes seconds, see README): a process pool would have to fork a process that may hold
torch/OpenCV thread pools (a known deadlock) or spawn fresh interpreters that
re-import torch, which costs about as much as it saves on a 2-core machine.

:func:`ensure_shapes_split` is idempotent and safe to call from several
processes at once (every rank of a distributed run builds its datasets): under
a file lock (opened with ``O_NOFOLLOW``: a symlink in its place is refused) it
skips a split whose manifest entry is complete with the same parameters, and
generates a split that is missing or partial (a run was killed during
generation, or one of its files was deleted). What it never does:

* write into a directory that it did not create: a non-empty root without
  the manifest is refused with a clear error;
* delete or overwrite a file it did not write: the manifest lists every file
  of a split (before the first one is written), and a split folder holding
  anything else stops a regeneration with an error naming the files (a
  complete split with an extra file is left as it is, the file too);
* rebuild a complete split with other parameters (another ``num_images``,
  seed, size...): a job may be reading it. That is refused with an error
  naming the differences; generate the variant into its own ``data_root``.

Images and annotation files are written atomically (temp file, rename), so a
reader never sees a partial file.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import os.path as osp
import secrets
import stat
import time
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
from mmengine.logging import print_log

from .shapes_drawing import SHAPE_CLASSES, ShapesRenderParams, render_shapes_image

#: Bumped whenever the rendering changes, so stale data is regenerated.
GENERATOR_VERSION = 1
GENERATOR_NAME = 'mmdet_deform.shapes'
MANIFEST_NAME = '.shapes_manifest.json'
LOCK_NAME = '.shapes.lock'
_TMP_PREFIX = '.shapes_tmp_'  # atomic writes of the manifest (in the root) go through these
SPLITS = ('train', 'val')
_SPLIT_CODE = {'train': 0, 'val': 1}
_JPEG_QUALITY = 90
GENERATE_HINT = 'python tools/dataset_converters/generate_shapes.py --out <data_root>'


class ShapesDirError(RuntimeError):
    """The output directory exists and does not belong to the shapes generator."""


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator that renders image ``index`` of ``split``."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def split_params(split: str, num_images: int, seed: int, render: ShapesRenderParams) -> dict:
    """Everything a split depends on, as stored in the manifest."""
    return dict(
        version=GENERATOR_VERSION,
        split=split,
        num_images=num_images,
        seed=seed,
        jpeg_quality=_JPEG_QUALITY,
        **render.to_dict(),
    )


def params_hash(params: dict) -> str:
    """A short stable hash of a split's parameters."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def ann_file_of(root: str, split: str) -> str:
    """Path of the annotation file of ``split`` under ``root``."""
    return osp.join(root, 'annotations', f'{split}.json')


def img_dir_of(root: str, split: str) -> str:
    """Path of the image folder of ``split`` under ``root``."""
    return osp.join(root, split)


def _check_split(split: str, num_images: int, seed: int) -> None:
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f'num_images must be an int >= 1, got {num_images!r}')
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be an int >= 0, got {seed!r}')


def read_manifest(root: str) -> Optional[dict]:
    """The manifest of ``root``, or None if there is none.

    Raises:
        ShapesDirError: ``root`` holds a manifest file that is not ours.
    """
    path = osp.join(root, MANIFEST_NAME)
    if not osp.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ShapesDirError(f'unreadable shapes manifest {path}: {e}') from e
    if not isinstance(manifest, dict) or manifest.get('generator') != GENERATOR_NAME:
        raise ShapesDirError(f'{path} was not written by the shapes generator ({GENERATOR_NAME})')
    return manifest


def _write_bytes_atomic(path: str, data: bytes, sync: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file.

    A new temp file next to ``path`` (``O_EXCL | O_NOFOLLOW``, mode 0666
    less the umask), then a rename over ``path`` (which replaces a symlink
    there, never its target).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, 'O_CLOEXEC', 0)
    while True:
        tmp = osp.join(osp.dirname(path), f'{_TMP_PREFIX}{secrets.token_hex(8)}.tmp')
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json_atomic(path: str, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers never see a partial file."""
    _write_bytes_atomic(path, json.dumps(obj).encode('utf-8'), sync=True)


def check_owned(root: str) -> None:
    """Raise unless ``root`` is missing, empty or written by the shapes generator.

    Raises:
        ShapesDirError: ``root`` is a file, or a non-empty directory without
            the generator's manifest.
    """
    if not osp.exists(root):
        return
    if not osp.isdir(root):
        raise ShapesDirError(f'shapes data root {root!r} exists and is not a directory')
    if read_manifest(root) is not None:
        return
    # Our lock file and temp files may be there without a manifest yet (another
    # process is starting to generate, or a run was killed): they are ours.
    others = sorted(n for n in os.listdir(root) if n != LOCK_NAME and not n.startswith(_TMP_PREFIX))
    if others:
        shown = ', '.join(others[:5]) + (', ...' if len(others) > 5 else '')
        raise ShapesDirError(
            f'refusing to generate the shapes dataset into {root!r}: the directory is not empty '
            f'({shown}) and was not written by the shapes generator (it has no {MANIFEST_NAME}). '
            'Move it away, or choose another directory (the `data_root` of the config, or '
            '--out of tools/dataset_converters/generate_shapes.py).'
        )


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    """An exclusive lock on ``root`` across processes (``flock`` on a lock file).

    The lock file is opened with ``O_NOFOLLOW``: a symlink in its place (which
    ``open(path, 'a')`` would follow, creating its target) is refused.
    """
    os.makedirs(root, exist_ok=True)
    path = osp.join(root, LOCK_NAME)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, 'O_CLOEXEC', 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ShapesDirError(
                f'the lock file {path} of the shapes generator is a symbolic link; refusing to '
                'follow it. Remove it.'
            ) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ShapesDirError(f'the lock file {path} is not a regular file; remove it')
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def split_files(split: str, num_images: int) -> List[str]:
    """The files of a split, relative to the root: its images, then its annotations."""
    return [f'{split}/{i:06d}.jpg' for i in range(num_images)] + [f'annotations/{split}.json']


def _listed_files(split: str, entry: Optional[dict]) -> List[str]:
    """The files a manifest entry says the generator wrote (or was writing)."""
    if not entry:
        return []
    if isinstance(entry.get('files'), list):
        return [str(f) for f in entry['files']]
    num = (entry.get('params') or {}).get('num_images')  # manifests before 'files'
    return split_files(split, num) if isinstance(num, int) and num > 0 else []


def _param_changes(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ', '.join(
        f'{k}: {old.get(k)!r} there, {new.get(k)!r} asked' for k in keys if old.get(k) != new.get(k)
    )


def split_is_complete(root: str, split: str, params: dict) -> bool:
    """Whether ``split`` under ``root`` was fully generated with ``params``
    and every file it lists is there (other files do not count)."""
    manifest = read_manifest(root)
    entry = (manifest or {}).get('splits', {}).get(split)
    if not entry or entry.get('status') != 'complete':
        return False
    if entry.get('hash') != params_hash(params):
        return False
    img_dir = img_dir_of(root, split)
    if not osp.isfile(ann_file_of(root, split)) or not osp.isdir(img_dir):
        return False
    present = set(os.listdir(img_dir))
    images = [f for f in _listed_files(split, entry) if f.startswith(f'{split}/')]
    return len(images) == params['num_images'] and all(osp.basename(f) in present for f in images)


def _render_to_file(task: Tuple[str, str, int, int, ShapesRenderParams]) -> List[dict]:
    """Render one image, write it as JPEG and return its objects."""
    img_dir, split, seed, index, render = task
    img, objects = render_shapes_image(image_rng(seed, split, index), render)
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f'cv2 could not encode image {index} of split {split}')
    _write_bytes_atomic(osp.join(img_dir, f'{index:06d}.jpg'), buf.tobytes())
    return objects


def _coco_json(split: str, num_images: int, size: int, objects: List[List[dict]]) -> dict:
    """The COCO detection dict of a split from the objects of every image."""
    images, annotations = [], []
    for index, objs in enumerate(objects):
        img_id = index + 1
        images.append(dict(id=img_id, file_name=f'{index:06d}.jpg', height=size, width=size))
        for obj in objs:
            x, y, w, h = obj['bbox']
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=img_id,
                    category_id=obj['label'] + 1,
                    bbox=[x, y, w, h],
                    area=w * h,  # box area: COCO's small/medium/large split by box size
                    iscrowd=0,
                )
            )
    categories = [
        dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(SHAPE_CLASSES)
    ]
    return dict(
        info=dict(description=f'mmdet_deform synthetic shapes, {split} split'),
        images=images,
        annotations=annotations,
        categories=categories,
    )


def _check_may_generate(root: str, split: str, params: dict, entry: Optional[dict]) -> None:
    """Raise unless regenerating ``split`` touches only files the generator wrote.

    Raises:
        ShapesDirError: The split is complete with other parameters, or its
            folder / annotation file holds files the manifest does not list.
    """
    if entry and entry.get('status') == 'complete' and entry.get('hash') != params_hash(params):
        changes = _param_changes(entry.get('params') or {}, params)
        raise ShapesDirError(
            f'the {split!r} split in {root!r} was generated with other parameters ({changes}). '
            'It is not rebuilt in place, since another job may be reading it: generate this '
            'variant into its own directory (set data_root, e.g. '
            f'{osp.normpath(root)}_{params["num_images"]}), or remove {root!r} to regenerate it.'
        )
    listed = set(_listed_files(split, entry))
    img_dir, ann_file = img_dir_of(root, split), ann_file_of(root, split)
    found = []
    if osp.lexists(ann_file) and f'annotations/{split}.json' not in listed:
        found.append(ann_file)
    if osp.isdir(img_dir):
        for name in sorted(os.listdir(img_dir)):
            path = osp.join(img_dir, name)
            if name.startswith(_TMP_PREFIX) and stat.S_ISREG(os.lstat(path).st_mode):
                continue  # a temp file of an interrupted write: ours
            if f'{split}/{name}' not in listed:
                found.append(path)
    elif osp.lexists(img_dir):
        found.append(img_dir)
    if found:
        shown = ', '.join(found[:5]) + (f', ... ({len(found)} in all)' if len(found) > 5 else '')
        raise ShapesDirError(
            f'refusing to (re)generate the {split!r} split in {root!r}: it holds files the '
            f'shapes generator did not write ({shown}), which it would have to delete or '
            'overwrite. Move them away, or choose another data_root.'
        )


def _generate_split(root: str, split: str, params: dict) -> dict:
    """Generate ``split`` under ``root`` (the caller holds the lock); returns its manifest entry."""
    manifest = read_manifest(root) or dict(generator=GENERATOR_NAME, splits={})
    old_entry = manifest['splits'].get(split)
    _check_may_generate(root, split, params, old_entry)
    files = split_files(split, params['num_images'])
    old_files = _listed_files(split, old_entry)
    # Claim the split before touching any file, listing every file that is or
    # may become ours: a kill from here on leaves an 'in_progress' entry that
    # names them, and the next call regenerates the split.
    manifest['splits'][split] = dict(
        status='in_progress',
        hash=params_hash(params),
        params=params,
        files=sorted(set(old_files) | set(files)),
    )
    _write_json_atomic(osp.join(root, MANIFEST_NAME), manifest)

    img_dir, ann_file = img_dir_of(root, split), ann_file_of(root, split)
    for name in os.listdir(img_dir) if osp.isdir(img_dir) else []:
        path = osp.join(img_dir, name)
        if name.startswith(_TMP_PREFIX) and stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)  # left by an interrupted write
    for stale in sorted(set(old_files) - set(files)):  # ours, of other parameters
        with contextlib.suppress(FileNotFoundError):
            os.unlink(osp.join(root, stale))
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(osp.dirname(ann_file), exist_ok=True)

    render = ShapesRenderParams(**{k: params[k] for k in ShapesRenderParams().to_dict()})
    tasks = [(img_dir, split, params['seed'], i, render) for i in range(params['num_images'])]
    objects = [_render_to_file(task) for task in tasks]
    coco = _coco_json(split, params['num_images'], render.img_size, objects)
    _write_json_atomic(ann_file, coco)

    entry = dict(
        status='complete',
        hash=params_hash(params),
        params=params,
        num_images=len(coco['images']),
        num_annotations=len(coco['annotations']),
        files=files,
    )
    manifest['splits'][split] = entry
    _write_json_atomic(osp.join(root, MANIFEST_NAME), manifest)
    return entry


def ensure_shapes_split(
    root: str,
    split: str,
    num_images: int,
    seed: int = 0,
    **render_kwargs,
) -> bool:
    """Make sure ``split`` of the shapes dataset exists under ``root``.

    Args:
        root (str): The dataset root, e.g. ``data/shapes``.
        split (str): ``'train'`` or ``'val'``.
        num_images (int): Number of images of the split.
        seed (int): Seed of the dataset; each split and image derives its own.
        **render_kwargs: Fields of :class:`ShapesRenderParams` (``img_size``,
            ``min_objects``, ``max_objects``, ``min_size``, ``max_size``,
            ``max_occlusion``, ``noise_std``).

    Returns:
        bool: True if the split was generated now, False if it was complete.

    Raises:
        ShapesDirError: ``root`` exists, is not empty and is not ours; the
            split is complete with other parameters; or the split's files
            would have to replace files the generator did not write.
        ValueError: A parameter is out of range (the message names it).
    """
    _check_split(split, num_images, seed)
    unknown = set(render_kwargs) - set(ShapesRenderParams().to_dict())
    if unknown:
        raise TypeError(
            f'unknown shapes parameters {sorted(unknown)}; expected some of '
            f'{sorted(ShapesRenderParams().to_dict())}'
        )
    render = ShapesRenderParams(**render_kwargs)
    params = split_params(split, num_images, seed, render)
    check_owned(root)  # before creating anything in it
    if split_is_complete(root, split, params):
        return False
    with _locked(root):
        check_owned(root)
        if split_is_complete(root, split, params):  # another process made it meanwhile
            return False
        entry = ((read_manifest(root) or {}).get('splits') or {}).get(split)
        _check_may_generate(root, split, params, entry)
        print_log(
            f'Generating the shapes dataset, {split} split ({num_images} images of '
            f'{render.img_size}x{render.img_size}, seed {seed}) into {root} ...',
            logger='current',
        )
        start = time.perf_counter()
        entry = _generate_split(root, split, params)
        print_log(
            f'Generated {entry["num_images"]} {split} images with {entry["num_annotations"]} '
            f'objects in {time.perf_counter() - start:.1f} s',
            logger='current',
        )
    return True


def generate_shapes(
    root: str,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    **render_kwargs,
) -> Dict[str, bool]:
    """Make sure both splits of the shapes dataset exist under ``root``.

    Args:
        root (str): The dataset root.
        num_train (int): Number of training images.
        num_val (int): Number of validation images.
        seed (int): Seed of the dataset.
        **render_kwargs: See :func:`ensure_shapes_split`.

    Returns:
        dict[str, bool]: For each split, whether it was generated now.
    """
    return {
        split: ensure_shapes_split(root, split, num, seed, **render_kwargs)
        for split, num in (('train', num_train), ('val', num_val))
    }
