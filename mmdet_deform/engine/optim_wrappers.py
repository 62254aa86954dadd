"""Mixed precision where mmengine's ``AmpOptimWrapper`` does not go: the CPU.

mmengine's ``AmpOptimWrapper`` asserts a GPU (it needs ``GradScaler``'s fp16
loss scaling). bfloat16 has float32's exponent range, so it needs no loss
scaling at all: autocast alone is the whole of bf16 mixed precision. This is
what ``tools/train.py --amp`` uses on a machine without CUDA.
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from mmengine.optim import OptimWrapper
from torch import nn

from ..registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` that runs the forward pass under ``torch.autocast``.

    Args:
        dtype (str): The autocast dtype; only ``'bfloat16'``, which needs no
            loss scaling (for float16 on a GPU use mmengine's
            ``AmpOptimWrapper``).
        **kwargs: Passed to :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: str = 'bfloat16', **kwargs) -> None:
        if dtype != 'bfloat16':
            raise ValueError(
                f"AutocastOptimWrapper: dtype must be 'bfloat16' (no loss scaling), got {dtype!r}; "
                "for float16 use type='AmpOptimWrapper' on a GPU"
            )
        super().__init__(**kwargs)
        self.cast_dtype = torch.bfloat16

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Gradient-accumulation context of ``OptimWrapper`` plus autocast on
        the device of the model's parameters."""
        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else 'cpu'
        with super().optim_context(model), torch.autocast(device_type, dtype=self.cast_dtype):
            yield
