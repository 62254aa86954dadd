"""setup.py compiles the CUDA kernel exactly when asked to (FORCE_CUDA=1) or
when torch has CUDA and nvcc is found; never on a CPU-only machine otherwise.

setup.py is imported as a module (its ``setup()`` call is guarded by
``__main__``), so nothing is built here.
"""

import importlib.util
import os.path as osp
from types import ModuleType

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CUDA_SOURCE = osp.join('mmdet_deform', 'ops', 'csrc', 'cuda', 'ms_deform_attn_cuda.cu')
CPU_SOURCES = {
    osp.join('mmdet_deform', 'ops', 'csrc', 'ops.cpp'),
    osp.join('mmdet_deform', 'ops', 'csrc', 'cpu', 'ms_deform_attn_cpu.cpp'),
    osp.join('mmdet_deform', 'ops', 'csrc', 'cpu', 'dropout_cpu.cpp'),
    osp.join('mmdet_deform', 'ops', 'csrc', 'autocast', 'ms_deform_attn_autocast.cpp'),
}


@pytest.fixture
def setup_module(monkeypatch, tmp_path) -> ModuleType:
    monkeypatch.chdir(REPO_ROOT)  # setup.py globs its sources from the repository root
    # CUDAExtension only joins paths under CUDA_HOME: any directory will do
    monkeypatch.setattr(cpp_extension, 'CUDA_HOME', str(tmp_path))
    spec = importlib.util.spec_from_file_location(
        'mmdet_deform_setup', osp.join(REPO_ROOT, 'setup.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension(setup_module):
    extensions = setup_module.get_extensions()
    assert len(extensions) == 1 and extensions[0].name == 'mmdet_deform._C'
    return extensions[0]


def test_force_cuda_adds_the_cuda_kernel(setup_module, monkeypatch):
    monkeypatch.setenv('FORCE_CUDA', '1')
    ext = extension(setup_module)
    assert set(ext.sources) == CPU_SOURCES | {CUDA_SOURCE}
    assert ('WITH_CUDA', None) in ext.define_macros
    assert set(ext.extra_compile_args) == {'cxx', 'nvcc'}
    assert 'cudart' in ext.libraries


def test_force_cuda_0_builds_the_cpu_kernel_only(setup_module, monkeypatch):
    monkeypatch.setenv('FORCE_CUDA', '0')
    ext = extension(setup_module)
    assert set(ext.sources) == CPU_SOURCES
    assert not any(name == 'WITH_CUDA' for name, _ in ext.define_macros)
    assert set(ext.extra_compile_args) == {'cxx'}


@pytest.mark.parametrize(
    ('cuda_available', 'cuda_home', 'expected'),
    [
        (False, '/usr/local/cuda', False),
        (True, None, False),
        (True, '/usr/local/cuda', True),
    ],
)
def test_without_force_cuda_follows_torch_and_nvcc(
    setup_module, monkeypatch, cuda_available, cuda_home, expected
):
    monkeypatch.delenv('FORCE_CUDA', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda_available)
    monkeypatch.setattr(cpp_extension, 'CUDA_HOME', cuda_home)
    assert setup_module.with_cuda() is expected


def test_no_fixed_cxx_standard(setup_module, monkeypatch):
    """torch's BuildExtension adds the C++ standard the installed torch needs
    (C++20 from torch 2.14); a fixed -std would break those builds."""
    monkeypatch.setenv('FORCE_CUDA', '1')
    ext = extension(setup_module)
    for flags in ext.extra_compile_args.values():
        assert not any(flag.startswith('-std=') for flag in flags)
