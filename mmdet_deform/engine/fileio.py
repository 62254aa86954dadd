"""A local file backend whose writes are atomic.

mmengine's ``LocalBackend.put`` opens the target with ``'wb'`` and writes into
it, so a process killed mid-save leaves a truncated checkpoint under the
final name. :class:`AtomicLocalBackend` writes to a temporary file in the same
folder, ``fsync``s it, renames it over the target (``os.replace`` is atomic on
POSIX) and ``fsync``s the folder: a reader sees the old file or the complete
new one, never a partial one. The temp file is created with ``O_EXCL`` and
``O_NOFOLLOW`` under a name that carries :data:`TEMP_MARKER` and a random
token, so a clean-up of interrupted saves (:func:`is_own_temp_file`) never
matches a file of anyone else; its mode is 0666 less the umask, as for any
other file (mkstemp's 0600 is not used).

Configs select it for checkpoints with
``default_hooks.checkpoint.backend_args = dict(backend='atomic_local')``.
"""

import os
import os.path as osp
import re
import secrets
from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend

__all__ = ['TEMP_MARKER', 'AtomicLocalBackend', 'atomic_write_bytes', 'is_own_temp_file']

#: In the name of every temp file :func:`atomic_write_bytes` creates:
#: ``.<name>.mmdet-deform-tmp-<16 hex digits>.tmp``.
TEMP_MARKER = 'mmdet-deform-tmp'
_TEMP_NAME = re.compile(rf'\..+\.{TEMP_MARKER}-[0-9a-f]{{16}}\.tmp')


def is_own_temp_file(name: str) -> bool:
    """Whether the file name ``name`` is that of a temp file of :func:`atomic_write_bytes`."""
    return _TEMP_NAME.fullmatch(name) is not None


def _create_temp(folder: str, basename: str):
    """A new temp file next to the target: its fd and path.

    ``O_EXCL | O_NOFOLLOW``: never an existing file or a symlink; mode 0666
    before the umask, so the final file has the same mode as any other file
    the process creates (0644 under umask 022).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, 'O_CLOEXEC', 0)
    for _ in range(100):
        path = osp.join(folder, f'.{basename}.{TEMP_MARKER}-{secrets.token_hex(8)}.tmp')
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f'could not create a temp file for {basename!r} in {folder!r}')


def atomic_write_bytes(data: bytes, filepath: Union[str, Path]) -> None:
    """Write ``data`` to ``filepath`` atomically (temp file, fsync, rename)."""
    filepath = os.fspath(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = _create_temp(folder, osp.basename(filepath))
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, filepath)
    except BaseException:
        if osp.lexists(tmp_path):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@register_backend('atomic_local')
class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` with atomic ``put`` and ``put_text``."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write_bytes(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write_bytes(obj.encode(encoding), filepath)
