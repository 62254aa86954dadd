"""Build script for mmdet_deform (extension-cpp / detectron2 style).

``install_requires`` states the ranges the package supports
(``requirements/runtime.txt``: torch >= 2.4, mmcv >= 2.0.0rc4 and < 2.2,
mmdet 3.0-3.3, mmengine >= 0.7.1), so ``pip install -e .`` leaves an
environment that satisfies them as it is (``--no-deps`` skips the check).
``pip install --no-build-isolation -e .`` compiles ``mmdet_deform._C``
against the installed torch:

* the C++ CPU kernel of multi-scale deformable attention is always built
  (``-O3``, ATen's ``at::parallel_for`` for threading, hence ``-fopenmp``
  where torch uses OpenMP);
* the CUDA kernel is added, with ``-DWITH_CUDA``, when torch has CUDA and
  ``nvcc`` is found, or when ``FORCE_CUDA=1`` (``TORCH_CUDA_ARCH_LIST`` is
  honoured by torch's ``BuildExtension``); ``FORCE_CUDA=0`` disables it;
* ``DEBUG=1`` builds without optimisation and with debug symbols.
"""

import glob
import os
import os.path as osp
import sys
from typing import Dict, List

from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))
CSRC = osp.join('mmdet_deform', 'ops', 'csrc')


def get_version() -> str:
    """Read ``__version__`` from ``mmdet_deform/version.py`` without
    importing the package."""
    scope: dict = {}
    with open(osp.join(ROOT, 'mmdet_deform', 'version.py')) as f:
        exec(compile(f.read(), 'version.py', 'exec'), scope)
    return scope['__version__']


def parse_requirements(name: str) -> List[str]:
    """Requirement lines of ``requirements/<name>.txt`` (comments, blank lines
    and pip options such as ``-c`` dropped)."""
    lines = []
    with open(osp.join(ROOT, 'requirements', f'{name}.txt')) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line and not line.startswith('-'):
                lines.append(line)
    return lines


def get_install_requires() -> List[str]:
    """The ranges the package supports (``requirements/runtime.txt``); the
    exact versions of the development environment are pinned separately in
    ``requirements/constraints.txt``, which only ``tools/setup_env.sh`` uses."""
    return parse_requirements('runtime')


def get_extras_require() -> Dict[str, List[str]]:
    """``tests``, and ``deploy`` when ``requirements/deploy.txt`` exists."""
    extras = {'tests': parse_requirements('tests')}
    if osp.isfile(osp.join(ROOT, 'requirements', 'deploy.txt')):
        extras['deploy'] = parse_requirements('deploy')
    return extras


def read_readme() -> str:
    with open(osp.join(ROOT, 'README.md'), encoding='utf-8') as f:
        return f.read()


def with_cuda() -> bool:
    """Whether to compile the CUDA kernel (see module docstring)."""
    force = os.getenv('FORCE_CUDA')
    if force is not None:
        return force == '1'
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and CUDA_HOME is not None


def use_openmp() -> bool:
    """Whether to compile with OpenMP: when torch's own intra-op parallelism is
    OpenMP (the Linux wheels) and the compiler is GCC or Clang. The extension
    then links libgomp.so.1, which resolves to the copy torch already loaded."""
    import torch

    return sys.platform.startswith('linux') and torch.backends.openmp.is_available()


def get_extensions() -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.getenv('DEBUG', '0') == '1'
    sources = sorted(
        glob.glob(osp.join(CSRC, '*.cpp'))
        + glob.glob(osp.join(CSRC, 'cpu', '*.cpp'))
        + glob.glob(osp.join(CSRC, 'autocast', '*.cpp'))
    )
    opt = ['-O0', '-g'] if debug else ['-O3']
    # No -std flag: BuildExtension adds the C++ standard the installed torch
    # needs (C++17 up to torch 2.13, C++20 from torch 2.14). As torch's own
    # build: no errno, no FP traps (lets the compiler if-convert and vectorise
    # the kernels' branch-free loops).
    extra_compile_args = {
        'cxx': opt + ['-fvisibility=hidden', '-fno-math-errno', '-fno-trapping-math']
    }
    extra_link_args = ['-g'] if debug else []
    if use_openmp():
        # at::parallel_for is an inline template: without -fopenmp it runs serially.
        extra_compile_args['cxx'].append('-fopenmp')
        extra_link_args.append('-fopenmp')
    define_macros = []
    extension = CppExtension
    if with_cuda():
        extension = CUDAExtension
        sources += sorted(glob.glob(osp.join(CSRC, 'cuda', '*.cu')))
        define_macros.append(('WITH_CUDA', None))
        # -lineinfo maps ncu / compute-sanitizer reports to source lines at no
        # runtime cost; ptxas warns if a kernel spills registers.
        nvcc_opt = ['-O0', '-g', '-G']
        if not debug:
            nvcc_opt = ['-O3', '-lineinfo', '-Xptxas=--warn-on-spills']
        extra_compile_args['nvcc'] = nvcc_opt + [
            '--expt-relaxed-constexpr',
            '-D__CUDA_NO_HALF_OPERATORS__',
            '-D__CUDA_NO_HALF_CONVERSIONS__',
            '-D__CUDA_NO_BFLOAT16_CONVERSIONS__',
            '-D__CUDA_NO_HALF2_OPERATORS__',
        ]
    return [
        extension(
            'mmdet_deform._C',
            sources,
            include_dirs=[osp.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


if __name__ == '__main__':
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name='mmdet_deform',
        version=get_version(),
        description='Deformable DETR for the OpenMMLab stack, with a fast compiled '
        'multi-scale deformable attention op',
        long_description=read_readme(),
        long_description_content_type='text/markdown',
        license='Apache-2.0',
        python_requires='>=3.9',
        packages=find_packages(include=('mmdet_deform', 'mmdet_deform.*')),
        package_data={
            'mmdet_deform.ops': [
                'csrc/*.h',
                'csrc/*.cpp',
                'csrc/*/*.cpp',
                'csrc/*/*.cu',
                'csrc/*/*.cuh',
            ]
        },
        install_requires=get_install_requires(),
        extras_require=get_extras_require(),
        ext_modules=get_extensions(),
        cmdclass={'build_ext': BuildExtension.with_options(no_python_abi_suffix=False)},
        zip_safe=False,
    )
