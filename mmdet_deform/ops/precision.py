"""Precision helper shared by the op, the head and the exportable module."""

from typing import Any

import torch
from torch import Tensor

__all__ = ['at_least_float32']

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def at_least_float32(data: Any) -> Any:
    """``data`` with its float16 and bfloat16 tensors cast to float32.

    Tensors of any other dtype (float32, float64, integers, bool) and
    non-tensors are returned as they are; dicts, lists and tuples are
    converted element by element (a new container of the same type).

    Used where a result of a bf16/fp16 autocast region must keep float32
    precision: sampling locations of the op, box coordinates of the head (a
    bf16 coordinate of ~600 px is off by up to 2 px), detections handed to
    metrics that go through numpy (which has no bfloat16).
    """
    if isinstance(data, Tensor):
        return data.float() if data.dtype in _HALF_DTYPES else data
    if isinstance(data, dict):
        return {key: at_least_float32(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(at_least_float32(value) for value in data)
    return data
