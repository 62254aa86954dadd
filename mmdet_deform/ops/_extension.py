"""Loading of the compiled extension ``mmdet_deform._C``.

Importing ``mmdet_deform._C`` runs its static initialisers, which register the
``torch.ops.mmdet_deform.*`` schemas (``TORCH_LIBRARY``) and their CPU (and,
when compiled, CUDA) kernels. A source checkout that was never built has no
``_C``: the ops then fall back to the pure-PyTorch reference with a warning,
and :func:`require_extension` raises an ``ImportError`` that says how to build.
"""

import glob
import os.path as osp
import warnings
from typing import Optional

import torch  # loads libtorch/libc10, which _C links against

BUILD_HINT = (
    'mmdet_deform._C, the compiled multi-scale deformable attention op, is not '
    'built. Build it from the repository root with '
    '`pip install --no-build-isolation -e .` (or `python setup.py build_ext '
    '--inplace`; `make test` does it for you), with FORCE_CUDA=1 on a CUDA machine.'
)

_import_error: Optional[BaseException] = None
try:
    from mmdet_deform import _C  # noqa: F401  (registers torch.ops.mmdet_deform.*)
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    built = glob.glob(osp.join(osp.dirname(osp.dirname(__file__)), '_C*.so'))
    if built:
        # Built but unloadable (e.g. compiled against another torch): never
        # fall back silently to the slow reference.
        raise ImportError(
            f'mmdet_deform._C exists ({built[0]}) but failed to load: {e}. Rebuild it against '
            'the installed torch with `pip install --no-build-isolation -e .`.'
        ) from e
    _import_error = e

_warned = False


def has_extension() -> bool:
    """Whether ``mmdet_deform._C`` was imported (the compiled op is usable)."""
    return _import_error is None


def has_cuda_kernel() -> bool:
    """Whether the extension was compiled with its CUDA kernel."""
    if not has_extension():
        return False

    return torch._C._dispatch_has_kernel_for_dispatch_key('mmdet_deform::ms_deform_attn', 'CUDA')


def require_extension() -> None:
    """Raise an ``ImportError`` saying how to build ``_C`` if it is missing."""
    if _import_error is not None:
        raise ImportError(f'{BUILD_HINT} (import failed with: {_import_error})') from _import_error


def warn_missing_extension() -> None:
    """Warn once that the slow pure-PyTorch fallback is in use."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f'{BUILD_HINT} Falling back to the slow pure-PyTorch reference.',
            RuntimeWarning,
            stacklevel=3,
        )
