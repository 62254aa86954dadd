"""Loading mmengine checkpoints on torch >= 2.6.

mmengine 0.10.7 calls ``torch.load(path, map_location=...)`` without
``weights_only``; since torch 2.6 that means ``weights_only=True``, whose
unpickler refuses every global that is not allow-listed, so ``--resume`` and
``load_from`` of a checkpoint written by mmengine's ``Runner`` fail.

Rather than switching ``weights_only`` off for every file, this allow-lists
exactly the extra types such a checkpoint holds (the message hub's
:class:`~mmengine.logging.HistoryBuffer` with its numpy arrays, numpy scalars
and dtypes) through ``torch.serialization.add_safe_globals``. Anything else in
a file is still refused.

One more global needs care: ``HistoryBuffer.__getstate__`` stores its
statistics methods, which pickle (protocol 2) writes as
``getattr(HistoryBuffer, 'min')``. Allow-listing ``builtins.getattr`` itself
would let a file fetch any attribute of any allowed object, so the name
``builtins.getattr`` is bound to :func:`_history_buffer_getattr` instead,
which only returns the public methods of ``HistoryBuffer``.
"""

import inspect
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import List, Optional

import numpy as np
import torch


def _numpy_globals() -> List[object]:
    """The numpy functions and classes pickled by arrays, scalars and dtypes."""
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    found: List[object] = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    # dtype instances pickle as their class (numpy.dtypes.Float64DType, ...)
    for name in ('bool_', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
                 'uint64', 'float16', 'float32', 'float64', 'complex64', 'complex128'):  # fmt: skip
        found.append(type(np.dtype(getattr(np, name))))
    return found


def _history_buffer_getattr(obj: object, name: str) -> object:
    """``getattr`` restricted to the public methods of ``HistoryBuffer``."""
    from mmengine.logging import HistoryBuffer

    attr = vars(HistoryBuffer).get(name) if obj is HistoryBuffer else None
    if not isinstance(name, str) or name.startswith('_') or not inspect.isfunction(attr):
        raise pickle.UnpicklingError(
            f'weights_only load: getattr({obj!r}, {name!r}) is not allowed; mmdet_deform only '
            'allows getattr(HistoryBuffer, <statistics method>) as written by mmengine'
        )
    return attr


def allow_mmengine_checkpoint_globals() -> None:
    """Allow-list the types of mmengine checkpoints for ``weights_only`` loads.

    Idempotent; a no-op on torch < 2.4, which has no safe-globals list.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        return
    from mmengine.logging import HistoryBuffer

    add_safe_globals(
        [HistoryBuffer, *_numpy_globals(), (_history_buffer_getattr, 'builtins.getattr')]
    )


def find_latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint to resume from in ``work_dir``, robust to interrupted saves.

    mmengine's version returns whatever ``last_checkpoint`` holds. Here the
    pointer is followed only if it names an existing, complete checkpoint (a
    readable zip archive, which a truncated ``torch.save`` file is not);
    otherwise the newest complete ``epoch_*.pth`` / ``iter_*.pth`` in
    ``work_dir`` is used. Leftover temporary files of an interrupted atomic
    save are ignored.

    Returns:
        str or None: Path of the checkpoint, or None if there is none.
    """
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer, encoding='utf-8') as f:
            target = f.read().strip()
        if target and _is_complete_checkpoint(target):
            return target
    candidates = []
    for name in os.listdir(work_dir) if osp.isdir(work_dir) else []:
        match = re.fullmatch(r'(epoch|iter)_(\d+)\.pth', name)
        if match:
            candidates.append((int(match.group(2)), osp.join(work_dir, name)))
    for _, path in sorted(candidates, reverse=True):
        if _is_complete_checkpoint(path):
            return path
    return None


def _is_complete_checkpoint(path: str) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive (zip with a
    readable central directory)."""
    if not osp.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith('data.pkl') for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
