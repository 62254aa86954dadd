"""Loading checkpoints as data: no code runs, no arbitrary object is built.

Every checkpoint this package reads (``--resume``, ``load_from``,
``tools/test.py``, the inference helpers of :mod:`mmdet_deform.apis`) goes
through :func:`load_checkpoint_file`:

* ``torch.load(..., weights_only=True)``, whose unpickler builds tensors and
  plain Python data only;
* the few extra names that checkpoints of mmengine 0.10 / mmdet 3.3 hold (the
  message hub's :class:`~mmengine.logging.HistoryBuffer`, numpy arrays,
  scalars and dtypes) are allowed only for the duration of that one call
  (``torch.serialization.safe_globals``), never process-wide, and they do not
  reach numpy or mmengine while unpickling: each name is bound to an inert
  record class of this module, and the records are turned into numpy
  arrays and ``HistoryBuffer`` objects afterwards, from checked numeric
  dtypes, shapes and byte counts (an object array, a structured dtype or a
  size that does not add up is refused). ``HistoryBuffer.__setstate__``,
  which would merge a file's "statistics methods" into a class-level dict
  shared by every buffer of the process, never runs;
* a file that is not a complete ``torch.save`` archive (empty, text,
  truncated, a record missing) raises :class:`CheckpointError` naming the
  file and the problem.

The config text a checkpoint carries (``meta['cfg']``, the legacy
``meta['config']`` that mmengine's ``Runner.resume`` would execute) stays a
string; :class:`mmdet_deform.engine.SafeRunner` drops ``meta['config']``
before mmengine sees it. Checkpoints written by this package hold plain data
only (:class:`mmdet_deform.engine.PlainCheckpointHook`), so any weights-only
loader reads them without an allow-list.
"""

import contextlib
import logging
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging import print_log

__all__ = [
    'CheckpointError',
    'HISTORY_BUFFER_KEY',
    'check_checkpoint_file',
    'checkpoint_header_problem',
    'find_latest_checkpoint',
    'load_checkpoint_file',
]

#: Marker of a ``HistoryBuffer`` stored as plain data (see PlainCheckpointHook).
HISTORY_BUFFER_KEY = '__mmengine_history_buffer__'

#: numpy dtypes a checkpoint may hold (as ``np.dtype.__reduce__`` names them).
_NUMERIC_DTYPES = frozenset(
    ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16')
)
_MAX_NDIM = 32


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded; the message names the file and why."""


# --------------------------------------------------------------- records
# What the names of numpy and mmengine in a pickle are bound to while this
# module unpickles: inert holders of the pickled arguments and state.


class _DTypeRecord:
    """``numpy.dtype(spec, align, copy)`` and its pickled state, unchecked."""

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        self.spec = spec
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ArrayRecord:
    """A pickled ``numpy.ndarray``: its ``__setstate__`` tuple, unchecked."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ScalarRecord:
    """A pickled numpy scalar: ``(dtype, raw bytes)``, unchecked."""

    def __init__(self, dtype: Any, raw: Any = None) -> None:
        self.dtype = dtype
        self.raw = raw


class _HistoryBufferRecord:
    """A pickled ``mmengine.logging.HistoryBuffer``: its ``__dict__``, unchecked."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstruct(cls: Any, shape: Any = None, dtype_code: Any = None) -> _ArrayRecord:
    """Stands for ``numpy.core.multiarray._reconstruct``."""
    return _ArrayRecord()


def _getattr(obj: Any, name: Any) -> str:
    """Stands for ``builtins.getattr``: mmengine pickles a ``HistoryBuffer``'s
    statistics methods as ``getattr(HistoryBuffer, 'mean')``. Only that form
    is accepted, and it yields the method's name (which is never used)."""
    if obj is not _HistoryBufferRecord or not isinstance(name, str) or name.startswith('_'):
        owner = 'HistoryBuffer' if obj is _HistoryBufferRecord else getattr(obj, '__name__', obj)
        raise pickle.UnpicklingError(
            f'getattr({owner}, {name!r}) is not allowed '
            '(only getattr(HistoryBuffer, <public method>) as mmengine writes it)'
        )
    return name


def _numeric_dtype_classes() -> List[type]:
    """numpy's DType classes of the numeric dtypes (``numpy.dtypes.Float64DType``...)."""
    return sorted({type(np.dtype(spec)) for spec in _NUMERIC_DTYPES}, key=lambda c: c.__name__)


def _restricted_globals() -> List[Tuple[Callable, str]]:
    """Pickle names bound to this module's records during one load."""
    bound: List[Tuple[Callable, str]] = [
        (_getattr, 'builtins.getattr'),
        (_HistoryBufferRecord, 'mmengine.logging.history_buffer.HistoryBuffer'),
        (_ArrayRecord, 'numpy.ndarray'),
        (_DTypeRecord, 'numpy.dtype'),
    ]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        bound += [(_reconstruct, f'{module}._reconstruct'), (_ScalarRecord, f'{module}.scalar')]
    for cls in _numeric_dtype_classes():
        bound.append((_DTypeRecord, f'{cls.__module__}.{cls.__qualname__}'))
    return bound


@contextlib.contextmanager
def _only_restricted_globals() -> Iterator[None]:
    """Allow this module's bindings, and nothing a caller allow-listed, for one load.

    ``torch.serialization``'s allow-list is process state: the caller's
    entries are set aside and put back afterwards, so the load sees exactly
    the bindings above and the process afterwards exactly what it had.
    """
    serialization = torch.serialization
    saved = serialization.get_safe_globals()
    serialization.clear_safe_globals()
    try:
        with serialization.safe_globals(_restricted_globals()):
            yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(saved)


# ------------------------------------------------------- records -> data
class _BadRecord(ValueError):
    pass


def _checked_dtype(record: Any) -> np.dtype:
    if not isinstance(record, _DTypeRecord):
        raise _BadRecord(f'expected a numpy dtype, got {type(record).__name__}')
    spec, state = record.spec, record.state
    if not isinstance(spec, str) or spec not in _NUMERIC_DTYPES:
        raise _BadRecord(f'numpy dtype {spec!r} is not a plain numeric dtype')
    plain = isinstance(state, tuple) and len(state) == 8 and state[0] == 3
    if not plain or state[1] not in ('<', '>', '|', '=') or state[2:] != (None,) * 3 + (-1, -1, 0):
        raise _BadRecord(f'numpy dtype {spec!r} has an unexpected state {state!r}')
    dtype = np.dtype(spec)
    return dtype.newbyteorder(state[1]) if state[1] in '<>' else dtype


def _as_bytes(raw: Any, nbytes: int, what: str) -> bytes:
    if not isinstance(raw, (bytes, bytearray)):
        raise _BadRecord(f'{what}: data is {type(raw).__name__}, expected bytes')
    if len(raw) != nbytes:
        raise _BadRecord(f'{what}: {len(raw)} bytes of data, expected {nbytes}')
    return bytes(raw)


def _array(record: _ArrayRecord) -> np.ndarray:
    state = record.state
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise _BadRecord(f'numpy array with an unexpected state of type {type(state).__name__}')
    _, shape, dtype_record, fortran, raw = state
    dtype = _checked_dtype(dtype_record)
    valid_shape = isinstance(shape, tuple) and len(shape) <= _MAX_NDIM
    if not valid_shape or not all(type(n) is int and n >= 0 for n in shape):
        raise _BadRecord(f'numpy array with an invalid shape {shape!r}')
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    data = _as_bytes(raw, count * dtype.itemsize, f'numpy array {shape} {dtype}')
    return np.frombuffer(data, dtype=dtype).reshape(shape, order='F' if fortran else 'C').copy()


def _scalar(record: _ScalarRecord) -> np.generic:
    dtype = _checked_dtype(record.dtype)
    return np.frombuffer(_as_bytes(record.raw, dtype.itemsize, f'numpy {dtype} scalar'), dtype)[0]


def _history_buffer(log: Any, count: Any, max_length: Any) -> Any:
    from mmengine.logging import HistoryBuffer

    log, count = np.asarray(log), np.asarray(count)
    if log.ndim != 1 or count.ndim != 1 or len(log) != len(count):
        raise _BadRecord('HistoryBuffer: log and count histories must be 1-D of one length')
    if log.dtype.kind not in 'biuf' or count.dtype.kind not in 'biuf':
        raise _BadRecord('HistoryBuffer: histories must be numeric')
    if type(max_length) is not int or max_length < 1:
        raise _BadRecord(f'HistoryBuffer: max_length must be an int >= 1, got {max_length!r}')
    return HistoryBuffer(log, count, max_length)


def _history_buffer_from_record(record: _HistoryBufferRecord) -> Any:
    state = record.state
    if not isinstance(state, dict):
        raise _BadRecord('HistoryBuffer with a state that is not a dict')
    missing = {'_log_history', '_count_history', 'max_length'} - set(state)
    if missing:
        raise _BadRecord(f'HistoryBuffer state lacks {sorted(missing)}')
    log, count = (_to_data(state[k], set()) for k in ('_log_history', '_count_history'))
    return _history_buffer(log, count, state['max_length'])


def _history_buffer_from_plain(value: dict) -> Any:
    log, count = value.get('log_history'), value.get('count_history')
    if not isinstance(log, torch.Tensor) or not isinstance(count, torch.Tensor):
        raise _BadRecord('plain HistoryBuffer: histories must be tensors')
    return _history_buffer(log.numpy(), count.numpy(), value.get('max_length'))


def _to_data(obj: Any, active: set) -> Any:
    """``obj`` with every record replaced by the checked numpy / mmengine object."""
    if isinstance(obj, _ArrayRecord):
        return _array(obj)
    if isinstance(obj, _ScalarRecord):
        return _scalar(obj)
    if isinstance(obj, _DTypeRecord):
        return _checked_dtype(obj)
    if isinstance(obj, _HistoryBufferRecord):
        return _history_buffer_from_record(obj)
    if not isinstance(obj, (dict, list, tuple)) or id(obj) in active:
        return obj  # tensors, plain values; a container that holds itself
    active.add(id(obj))
    try:
        if isinstance(obj, dict):
            for key, value in obj.items():
                new = _to_data(value, active)
                if new is not value:
                    obj[key] = new
            return obj
        if isinstance(obj, list):
            for i, value in enumerate(obj):
                obj[i] = _to_data(value, active)
            return obj
        items = [_to_data(value, active) for value in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, '_fields') else type(obj)(items)
    finally:
        active.discard(id(obj))


def _restore_plain_history_buffers(checkpoint: Any) -> None:
    """Turn the message hub's plain-data buffers (PlainCheckpointHook) back
    into ``HistoryBuffer`` objects, which ``MessageHub.load_state_dict`` wants."""
    hub = checkpoint.get('message_hub') if isinstance(checkpoint, dict) else None
    scalars = hub.get('log_scalars') if isinstance(hub, dict) else None
    if not isinstance(scalars, dict):
        return
    for key, value in list(scalars.items()):
        if isinstance(value, dict) and value.get(HISTORY_BUFFER_KEY):
            scalars[key] = _history_buffer_from_plain(value)


# ----------------------------------------------------------------- files
#: The pickle that opens a checkpoint of ``torch.save(..., _use_new_zipfile_serialization=False)``.
_LEGACY_MAGIC = b'\x80\x02\x8a\x0a'


def checkpoint_header_problem(path: str) -> Optional[str]:
    """What the first and last bytes of ``path`` say is wrong with it as a
    checkpoint (None: looks like a ``torch.save`` file). Cheap: reads the
    header and the zip directory, no tensors.
    """
    if not osp.exists(path):
        return 'does not exist'
    if not osp.isfile(path):
        return 'is not a file'
    size = osp.getsize(path)
    if size == 0:
        return 'is empty (0 bytes): its save was interrupted or it was truncated'
    with open(path, 'rb') as f:
        head = f.read(64)
    if head.startswith(_LEGACY_MAGIC):
        return None  # the pre-1.6 format: no index to check, torch.load tells
    if not head.startswith(b'PK\x03\x04'):
        return (
            f'is not a torch checkpoint (neither a zip archive written by torch.save nor the '
            f'legacy format); it starts with {head[:16]!r}'
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f'is truncated or corrupt ({size} bytes, not a complete zip archive: {e})'
    if not any(name.endswith('/data.pkl') or name == 'data.pkl' for name in names):
        return 'is a zip archive but not a torch checkpoint (it has no data.pkl)'
    return None


def _explain(path: str, error: BaseException) -> str:
    """The message of a failed ``torch.load`` of ``path``."""
    full = str(error).strip()
    text = full.splitlines()[0] if full else type(error).__name__
    if isinstance(error, pickle.UnpicklingError) or 'weights_only' in full:
        # torch's message advises weights_only=False or an allow-list: keep its reason only
        reason = re.search(
            r'WeightsUnpickler error:\s*(.*?)(?: Please use `torch|\n\n|$)', full, re.S
        )
        text = reason.group(1).strip() if reason else text
        return (
            f'checkpoint {path!r} holds objects that mmdet_deform does not load: checkpoints '
            'are read as data (tensors, plain Python values, numeric numpy arrays and '
            f"mmengine's HistoryBuffer), and nothing else is built. {text}"
        )
    missing = re.search(r'failed (?:finding|locating) (?:central directory|file) ?(\S*)', text)
    if missing:
        record = missing.group(1).rstrip(':')
        return (
            f'checkpoint {path!r} is incomplete: the record {record or "(central directory)"} '
            'is missing from the archive'
        )
    if isinstance(error, (EOFError, zipfile.BadZipFile)):
        return f'checkpoint {path!r} is truncated: {type(error).__name__}: {text}'
    if isinstance(error, _BadRecord):
        return f'checkpoint {path!r} holds malformed data: {text}'
    return f'checkpoint {path!r} cannot be read: {type(error).__name__}: {text}'


def load_checkpoint_file(
    path: str, map_location: Union[str, torch.device, Callable, Dict, None] = 'cpu'
) -> Any:
    """Load a checkpoint as data (see the module docstring).

    Args:
        path (str): A local checkpoint file.
        map_location: As for :func:`torch.load`. Defaults to ``'cpu'``.

    Returns:
        The checkpoint (usually a dict with ``meta``, ``state_dict``,
        ``message_hub``...), with numpy arrays and ``HistoryBuffer`` objects
        rebuilt from checked plain data.

    Raises:
        CheckpointError: The file is missing, empty, not a checkpoint,
            truncated, lacks a record, or holds objects other than data.
    """
    return _load(os.fspath(path), map_location, mmap=False)


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` loads as a whole.

    Reads the pickle and maps (``mmap``) the tensor records without copying
    them, so a missing record is found without reading gigabytes.
    """
    _load(os.fspath(path), 'cpu', mmap=True)


def _load(path: str, map_location: Any, mmap: bool) -> Any:
    problem = checkpoint_header_problem(path)
    if problem is not None:
        raise CheckpointError(f'checkpoint {path!r} {problem}')
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with _only_restricted_globals():
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        checkpoint = _to_data(checkpoint, set())
        _restore_plain_history_buffers(checkpoint)
    except Exception as e:  # noqa: BLE001  (every failure names the file)
        raise CheckpointError(_explain(path, e)) from e
    return checkpoint


# ----------------------------------------------------------- work dirs
def _inside(path: str, folder: str) -> bool:
    path, folder = osp.realpath(path), osp.realpath(folder)
    return osp.commonpath([path, folder]) == folder


def find_latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint to resume from in ``work_dir``.

    Candidates, in order: the checkpoint the ``last_checkpoint`` pointer
    names if it lies inside ``work_dir`` (a pointer that leads out of it is
    not followed, with a warning), then ``epoch_*.pth`` / ``iter_*.pth`` of
    ``work_dir`` from the newest. The first that loads as a whole
    (:func:`check_checkpoint_file`: a truncated file, a missing record or
    foreign objects fail) is returned; every one skipped is logged with the
    reason. Temporary files of an interrupted atomic save are not candidates.

    Returns:
        str or None: Path of the checkpoint, or None if there is none.
    """
    candidates: List[str] = []
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer, encoding='utf-8', errors='replace') as f:
            target = f.read().strip()
        if target and not _inside(target, work_dir):
            print_log(
                f'--resume: {pointer} points to {target}, outside the work dir {work_dir}; '
                'not following it. Resume from it explicitly with --resume CKPT if that is '
                'the run to continue.',
                logger='current',
                level=logging.WARNING,
            )
        elif target:
            candidates.append(target)
    numbered = []
    for name in os.listdir(work_dir) if osp.isdir(work_dir) else []:
        match = re.fullmatch(r'(epoch|iter)_(\d+)\.pth', name)
        if match:
            numbered.append((int(match.group(2)), osp.join(work_dir, name)))
    candidates += [path for _, path in sorted(numbered, reverse=True)]
    seen = set()
    for path in candidates:
        if osp.realpath(path) in seen:
            continue
        seen.add(osp.realpath(path))
        try:
            check_checkpoint_file(path)
        except CheckpointError as e:
            print_log(f'--resume: skipping {path}: {e}', logger='current', level=logging.WARNING)
            continue
        return path
    return None
