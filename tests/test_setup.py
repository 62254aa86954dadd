"""setup.py compiles the CUDA kernel exactly when asked to (FORCE_CUDA=1) or
when torch has CUDA and nvcc is found; never on a CPU-only machine otherwise.
Its install_requires states ranges (never another torch for an environment
that satisfies them); the exact versions of the development environment are
pinned in requirements/constraints.txt, which tools/setup_env.sh installs under.

setup.py is imported as a module (its ``setup()`` call is guarded by
``__main__``), so nothing is built here.
"""

import importlib.util
import json
import os
import os.path as osp
import re
import subprocess
import sys
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


# --------------------------------------------------------------------------
# Requirements: ranges in install_requires, exact versions in constraints.txt
# --------------------------------------------------------------------------
def requirements_by_name(lines) -> dict:
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in lines]
    return {canonical(req.name): req for req in reqs}


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def installed_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


@pytest.mark.parametrize(
    ('name', 'inside', 'outside'),
    [
        ('torch', ['2.4.0', '2.5.1', '2.13.0', '3.0.0'], ['2.3.1', '2.1.0']),
        ('mmcv', ['2.0.0rc4', '2.0.1', '2.1.0'], ['2.0.0rc3', '1.7.2', '2.2.0']),
        ('mmdet', ['3.0.0', '3.1.0', '3.3.0'], ['2.28.2', '3.4.0']),
        ('mmengine', ['0.7.1', '0.10.7'], ['0.7.0', '1.0.0']),
    ],
)
def test_install_requires_states_the_supported_ranges(setup_module, name, inside, outside):
    """A user's torch 2.5 / mmcv 2.1 / mmdet 3.3 environment satisfies
    install_requires, so ``pip install -e .`` keeps it."""
    req = requirements_by_name(setup_module.get_install_requires())[name]
    for version in inside:
        assert req.specifier.contains(version, prereleases=True), (req, version)
    for version in outside:
        assert not req.specifier.contains(version, prereleases=True), (req, version)


def test_install_requires_pins_nothing_exactly(setup_module):
    for line in setup_module.get_install_requires():
        req = requirements_by_name([line])
        (spec,) = req.values()
        assert not any(s.operator in ('==', '===') for s in spec.specifier), line


def test_installed_environment_satisfies_install_requires(setup_module):
    for name, req in requirements_by_name(setup_module.get_install_requires()).items():
        assert req.specifier.contains(installed_version(name), prereleases=True), name


def test_egg_info_metadata_carries_the_ranges(tmp_path):
    """The metadata setuptools writes (what pip reads) has the same ranges."""
    proc = subprocess.run(
        [sys.executable, 'setup.py', '--quiet', 'egg_info', '--egg-base', str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, FORCE_CUDA='0'),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (requires,) = tmp_path.glob('*.egg-info/requires.txt')
    lines = requires.read_text().split('\n[', 1)[0].split()
    reqs = requirements_by_name(lines)
    assert str(reqs['torch'].specifier) == '>=2.4'
    assert reqs['mmcv'].specifier.contains('2.1.0') and not reqs['mmcv'].specifier.contains('2.2.0')
    assert '==' not in requires.read_text().split('\n[', 1)[0]


def test_deploy_extra_follows_requirements_deploy_txt(setup_module, monkeypatch, tmp_path):
    (tmp_path / 'requirements').mkdir()
    (tmp_path / 'requirements' / 'tests.txt').write_text('pytest>=8\n')
    monkeypatch.setattr(setup_module, 'ROOT', str(tmp_path))
    assert set(setup_module.get_extras_require()) == {'tests'}  # no deploy.txt: no extra
    (tmp_path / 'requirements' / 'deploy.txt').write_text(
        '# exporting\nonnx>=1.14\n-c constraints.txt\nonnxruntime  # runner\n'
    )
    extras = setup_module.get_extras_require()
    assert extras['deploy'] == ['onnx>=1.14', 'onnxruntime']
    assert extras['tests'] == ['pytest>=8']


CONSTRAINTS = osp.join(REPO_ROOT, 'requirements', 'constraints.txt')
SETUP_ENV = osp.join(REPO_ROOT, 'tools', 'setup_env.sh')


def constraint_pins() -> dict:
    from packaging.requirements import Requirement

    pins = {}
    with open(CONSTRAINTS) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                assert spec.operator == '==', f'constraints.txt must pin exactly: {line}'
                pins[canonical(req.name)] = spec.version
    return pins


@pytest.mark.parametrize('name', ['torch', 'mmcv', 'mmdet', 'mmengine', 'numpy'])
def test_constraints_pin_the_installed_versions(name):
    from packaging.version import Version

    assert Version(constraint_pins()[name]) == Version(installed_version(name))


def test_constraints_satisfy_install_requires(setup_module):
    pins = constraint_pins()
    for name, req in requirements_by_name(setup_module.get_install_requires()).items():
        assert name in pins, f'{name} is not pinned in constraints.txt'
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_setup_env_installs_under_the_constraints():
    with open(SETUP_ENV) as f:
        script = f.read()
    assert 'requirements/constraints.txt' in script
    installs = [
        line
        for line in script.splitlines()
        if ' install ' in line and 'PIP' in line and not line.lstrip().startswith('#')
    ]
    assert installs
    for line in installs:
        assert '-c "$CONSTRAINTS"' in line or '--no-deps' in line, line
    # the versions of the development environment live in constraints.txt only
    assert not re.search(r'(torch|mmcv|mmengine|mmdet)==[0-9]', script)


@pytest.mark.slow
def test_pip_install_plans_no_torch(tmp_path):
    """``pip install -e .`` in an environment that has everything installs
    mmdet_deform only: never another torch (no index is consulted)."""
    report = tmp_path / 'report.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index']
        + ['--no-build-isolation', '--quiet', '--report', str(report), '-e', '.'],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, FORCE_CUDA='0', PIP_DISABLE_PIP_VERSION_CHECK='1'),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    planned = [item['metadata']['name'] for item in json.loads(report.read_text())['install']]
    assert 'torch' not in planned
    assert planned == ['mmdet_deform'], planned
