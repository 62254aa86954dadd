"""dev/msda_cuda_smoke.py, the compute-sanitizer workload, checks every case
against the reference; on the CPU (float64, float32, bfloat16) it must pass."""

import importlib.util
import os.path as osp

import pytest

from mmdet_deform.ops import has_extension

from ..conftest import REPO_ROOT


def load_smoke():
    path = osp.join(REPO_ROOT, 'dev', 'msda_cuda_smoke.py')
    spec = importlib.util.spec_from_file_location('msda_cuda_smoke', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not has_extension(), reason='mmdet_deform._C is not built')
def test_smoke_cases_pass_on_the_cpu_kernel(capsys):
    assert load_smoke().main(['--device', 'cpu']) == 0
    assert capsys.readouterr().out.strip().endswith('OK')


def test_check_reports_a_mismatch(capsys):
    import torch

    smoke = load_smoke()
    expected = torch.zeros(3, dtype=torch.float64)
    assert smoke.check('case', expected + 1e-12, expected, 1e-9)
    assert not smoke.check('case', expected + 1.0, expected, 1e-9)
    assert not smoke.check('case', expected + float('nan'), expected, 1e-9)
    assert 'MISMATCH case' in capsys.readouterr().out
