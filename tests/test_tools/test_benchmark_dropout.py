"""tools/analysis_tools/benchmark_dropout.py times both dropouts side by side."""

import importlib.util
import os.path as osp

import pytest

from ..conftest import REPO_ROOT


def load_tool():
    path = osp.join(REPO_ROOT, 'tools', 'analysis_tools', 'benchmark_dropout.py')
    spec = importlib.util.spec_from_file_location('benchmark_dropout', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_both_passes(capsys):
    rows = load_tool().main(['--repeat', '1', '--shapes', 'attention/ffn output'])
    assert [(name, label) for name, label, _, _ in rows] == [
        ('attention/ffn output', 'forward'),
        ('attention/ffn output', 'forward+backward'),
    ]
    assert all(theirs > 0 and ours > 0 for _, _, theirs, ours in rows)
    assert '| attention/ffn output | 2x7144x256 | forward |' in capsys.readouterr().out


@pytest.mark.parametrize('argv', [['--p', '1.0'], ['--p', '0'], ['--repeat', '0']])
def test_benchmark_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        load_tool().parse_args(argv)
