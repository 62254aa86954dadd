"""The README's quick start stays true: two commands, and CI runs the test one."""

import os.path as osp
import re

from .conftest import REPO_ROOT


def _quick_start_commands() -> list:
    with open(osp.join(REPO_ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    section = readme.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
    return [line.split('#', 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands():
    assert _quick_start_commands() == ['make demo', 'make test']


def test_ci_runs_the_readme_test_command():
    test_command = _quick_start_commands()[1]
    with open(osp.join(REPO_ROOT, '.ci', 'run'), encoding='utf-8') as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    assert test_command in ci_lines


def test_makefile_targets_exist():
    with open(osp.join(REPO_ROOT, 'Makefile'), encoding='utf-8') as f:
        makefile = f.read()
    for target in ('demo', 'test', 'lint'):
        assert re.search(rf'^{target}:', makefile, re.M), target
