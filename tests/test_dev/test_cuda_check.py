"""dev/cuda_check.sh runs the steps asked for and refuses unknown ones."""

import os
import os.path as osp
import subprocess
import sys

from ..conftest import REPO_ROOT

SCRIPT = osp.join(REPO_ROOT, 'dev', 'cuda_check.sh')


def run_script(*steps: str, log_dir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=log_dir)
    return subprocess.run(
        ['bash', SCRIPT, *steps], capture_output=True, text=True, env=env, timeout=120
    )


def test_unknown_step_is_refused_before_any_step_runs(tmp_path):
    proc = run_script('env', 'bogus', log_dir=str(tmp_path / 'logs'))
    assert proc.returncode == 2
    assert 'unknown step: bogus' in proc.stderr
    assert 'env|build|test|sanitize|bench|ncu|compile' in proc.stderr
    assert '=== env' not in proc.stdout  # nothing ran
    assert not (tmp_path / 'logs').exists()


def test_env_step_reports_the_interpreter_and_torch(tmp_path):
    import torch

    proc = run_script('env', log_dir=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert '=== env' in proc.stdout
    assert f'torch {torch.__version__}' in proc.stdout
