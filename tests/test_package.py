"""The package imports, registers its op and scope, and says how to build a
missing extension."""

import os
import os.path as osp
import shutil
import subprocess
import sys

import torch

import mmdet_deform


def test_version():
    assert isinstance(mmdet_deform.__version__, str)
    assert mmdet_deform.version_info[0] >= 0


def test_extension_loads_and_registers_ops():
    from mmdet_deform import _C  # noqa: F401

    assert mmdet_deform.ops.has_extension()
    assert hasattr(torch.ops.mmdet_deform, 'ms_deform_attn')
    assert hasattr(torch.ops.mmdet_deform, '_ms_deform_attn_backward')
    assert torch._C._dispatch_has_kernel_for_dispatch_key('mmdet_deform::ms_deform_attn', 'CPU')


def test_missing_extension_says_how_to_build(tmp_path, repo_root):
    """A source checkout without a built ``_C``: a clear ImportError from
    ``require_extension`` and a warning + reference fallback from the op."""
    copy = tmp_path / 'mmdet_deform'
    shutil.copytree(
        osp.join(repo_root, 'mmdet_deform'),
        copy,
        ignore=shutil.ignore_patterns('*.so', '__pycache__'),
    )
    script = r"""
import sys, warnings, torch
# Hide the editable install's finder too, which would still find the built _C.
sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__ + str(f)]
import mmdet_deform
from mmdet_deform.ops import has_extension, require_extension, ms_deform_attn
assert mmdet_deform.__file__.startswith(COPY_ROOT), mmdet_deform.__file__
assert not has_extension()
try:
    require_extension()
except ImportError as e:
    assert 'pip install --no-build-isolation -e .' in str(e), str(e)
else:
    raise AssertionError('require_extension did not raise')
value = torch.rand(1, 6, 1, 2)
shapes = torch.tensor([[2, 3]])
starts = torch.tensor([0])
loc = torch.rand(1, 4, 1, 1, 2, 2)
attn = torch.rand(1, 4, 1, 1, 2)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out = ms_deform_attn(value, shapes, starts, loc, attn)
assert out.shape == (1, 4, 2)
assert any('not built' in str(w.message) for w in caught), [str(w.message) for w in caught]
print('OK')
""".replace('COPY_ROOT', repr(str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, '-c', script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert 'OK' in proc.stdout


def test_extension_loads_without_importing_torch_first():
    """``import mmdet_deform`` as the first import still loads ``_C`` (which
    needs libtorch loaded first) rather than falling back to the reference."""
    script = 'import mmdet_deform; assert mmdet_deform.ops.has_extension(); print("OK")'
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'OK' in proc.stdout
