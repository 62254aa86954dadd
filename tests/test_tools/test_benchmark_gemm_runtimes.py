"""tools/analysis_tools/benchmark_gemm_runtimes.py times torch's and ONNX
Runtime's float32 Linear on the same data (a tiny shape here) and prints
their ratio."""

import pytest

from .conftest import load_tool


def test_gemm_runtimes_agree_and_table():
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    tool = load_tool('tools/analysis_tools/benchmark_gemm_runtimes.py')
    results = tool.main(
        ['--threads', '1', '--iters', '2', '--rounds', '2', '--shape', '37', '24', '16']
    )
    result = results[(37, 24, 16)]
    assert result['torch'] > 0 and result['onnxruntime'] > 0
    # the same product in both runtimes: float32 rounding only
    assert result['max_abs_difference'] < 1e-4
    table = tool.format_table(results, 1)
    ratio = result['onnxruntime'] / result['torch']
    assert f'| 37 x 24 -> 16 | {result["torch"]:.2f} |' in table
    assert f'| {ratio:.2f}x |' in table
    assert tool.parse_args([]).shape is None  # the encoder's shapes by default
    with pytest.raises(SystemExit):
        tool.parse_args(['--shape', '0', '4', '4'])
    with pytest.raises(SystemExit):
        tool.parse_args(['--iters', '0'])
    with pytest.raises(SystemExit):
        tool.parse_args(['--rounds', '0'])
