import pytest
import torch

from mmdet_deform.ops import at_least_float32


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_tensors_become_float32(dtype):
    x = torch.tensor([1.5, -2.25], dtype=dtype)
    out = at_least_float32(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, x.float())


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.int64, torch.bool])
def test_other_dtypes_are_returned_unchanged(dtype):
    x = torch.ones(3, dtype=dtype)
    assert at_least_float32(x) is x


def test_containers_are_converted_element_by_element():
    half = torch.ones(2, dtype=torch.bfloat16)
    ints = torch.arange(3)
    data = {'a': [half, ints], 'b': (half, 'name'), 'c': 4}
    out = at_least_float32(data)
    assert out['a'][0].dtype == torch.float32
    assert out['a'][1] is ints
    assert isinstance(out['b'], tuple) and out['b'][0].dtype == torch.float32
    assert out['b'][1] == 'name' and out['c'] == 4
    assert data['a'][0].dtype == torch.bfloat16  # the input is not modified
