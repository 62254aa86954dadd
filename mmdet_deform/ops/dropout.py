"""Dropout with a counter-based mask, fast on the CPU.

ATen's CPU dropout draws its mask element by element from one Mersenne
Twister stream (``bernoulli_``, serially): in a
Deformable DETR training step on the CPU, the 48 dropouts over the encoder's
(tokens, 1024) FFN activations cost more than the deformable attention. The
op here decides each element with a hash of (seed, element index)
(splitmix64; see ``csrc/cpu/dropout_cpu.cpp``), which all threads evaluate at
once, and keeps a bool mask (1 byte per element rather than ATen's float
noise) for the backward. Timings: ``docs/benchmarks.md``, "Dropout (CPU)".

In the order every op file of this package follows:

1. :func:`dropout_pytorch` (and :func:`relu_dropout_pytorch`): the
   pure-PyTorch reference, reproducing the kernel's mask bit for bit from
   the same seed;
2. :func:`dropout`: the functional form, drawing the seed from a torch
   generator (so ``torch.manual_seed`` makes it reproducible) and calling
   ``torch.ops.mmdet_deform.dropout``;
3. fake (meta) kernels for ``torch.compile``;
4. autograd, wiring ``torch.ops.mmdet_deform._dropout_backward``;
5. :class:`Dropout`, an ``nn.Dropout`` that uses the op where it helps
   (and ``torch.ops.mmdet_deform.relu_dropout``, ReLU and dropout in one
   pass, for the FFN's ``dropout(relu(fc1(x)))``).

The masks differ from ``nn.Dropout``'s under the same ``torch.manual_seed``
(another generator), with the same distribution: every element is kept
independently with probability ``1 - p`` and scaled by ``1 / (1 - p)``.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._extension import has_extension

__all__ = ['Dropout', 'dropout', 'dropout_pytorch', 'relu_dropout_pytorch']

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_LOW_32 = 0xFFFFFFFF


# --------------------------------------------------------------------------
# 1. Reference implementation
# --------------------------------------------------------------------------
def _as_int64(value: int) -> int:
    """The int64 with the bits of the uint64 ``value``."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_logical(z: Tensor, shift: int) -> Tensor:
    """``z >> shift`` on the uint64 bits of the int64 tensor ``z`` (torch's
    ``>>`` on int64 is arithmetic: clear the copies of the sign bit)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def dropout_mask_pytorch(numel: int, p: float, seed: int) -> Tensor:
    """The keep mask of the op for a tensor of ``numel`` elements (flattened
    in row-major order), in plain int64 tensor arithmetic (which wraps
    modulo 2^64 like the kernel's uint64).

    Returns:
        Tensor: bool, has shape (numel,).
    """
    pairs = (numel + 1) // 2
    counter = torch.arange(1, pairs + 1, dtype=torch.int64)
    z = _as_int64(seed) + counter * _as_int64(_GOLDEN_GAMMA)
    z = (z ^ _shift_right_logical(z, 30)) * _as_int64(_MIX_1)
    z = (z ^ _shift_right_logical(z, 27)) * _as_int64(_MIX_2)
    z = z ^ _shift_right_logical(z, 31)
    # element 2k takes the low 32 bits of pair k, element 2k + 1 the high ones
    bits = torch.stack([z & _LOW_32, _shift_right_logical(z, 32)], dim=1).flatten()[:numel]
    threshold = round(p * 2**32)
    return bits >= threshold


def dropout_pytorch(input: Tensor, p: float, seed: int) -> Tuple[Tensor, Tensor]:
    """Dropout of ``input`` with the mask of ``torch.ops.mmdet_deform.dropout``
    for ``seed`` (bit for bit), in plain PyTorch.

    Args:
        input (Tensor): Any shape, floating point.
        p (float): Probability of zeroing an element, in [0, 1).
        seed (int): Seed of the mask (int64).

    Returns:
        tuple[Tensor, Tensor]: The output, shaped and typed like ``input``
        (kept elements times ``1 / (1 - p)``, computed in float32 for
        float16/bfloat16), and the bool keep mask of the same shape.
    """
    mask = dropout_mask_pytorch(input.numel(), p, seed).view(input.shape)
    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float64).to(compute_dtype)
    factor = torch.where(mask, scale, torch.zeros((), dtype=compute_dtype))
    return (input.to(compute_dtype) * factor).to(input.dtype), mask


def relu_dropout_pytorch(input: Tensor, p: float, seed: int) -> Tensor:
    """``dropout_pytorch(relu(input), p, seed)[0]``: the reference of
    ``torch.ops.mmdet_deform.relu_dropout`` (bit for bit)."""
    return dropout_pytorch(torch.relu(input), p, seed)[0]


# --------------------------------------------------------------------------
# 2. Functional form
# --------------------------------------------------------------------------
def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f'dropout probability p must be in [0, 1), got {p}')


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A seed in [0, 2^63) from ``generator`` (default: torch's default CPU
    generator, so ``torch.manual_seed`` fixes it)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


def dropout(input: Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> Tensor:
    """Training-mode dropout of a CPU tensor with the counter-based kernel.

    Zeroes every element independently with probability ``p`` and scales the
    others by ``1 / (1 - p)``; differentiable (the backward multiplies by
    the saved bool mask). The mask depends only on the seed drawn from
    ``generator`` and the element's index, not on the thread count.

    Args:
        input (Tensor): Any shape, floating point, on the CPU.
        p (float): Probability of zeroing an element, in [0, 1).
            Defaults to 0.5.
        generator (torch.Generator, optional): CPU generator the seed is
            drawn from. Defaults to torch's default generator.

    Returns:
        Tensor: Shaped and typed like ``input`` (contiguous).
    """
    _check_p(p)
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(
            'dropout: input must be a floating point tensor, got '
            f'{input.dtype if isinstance(input, Tensor) else type(input).__name__}'
        )
    if not has_extension():
        return dropout_pytorch(input, p, draw_seed(generator))[0]
    output, _ = torch.ops.mmdet_deform.dropout(input, p, draw_seed(generator))
    return output


# --------------------------------------------------------------------------
# 3. Fake kernels and 4. autograd (only where the schema exists)
# --------------------------------------------------------------------------
if has_extension():

    @torch.library.register_fake('mmdet_deform::dropout')
    def _dropout_fake(input: Tensor, p: float, seed: int) -> Tuple[Tensor, Tensor]:
        return (
            input.new_empty(input.shape),
            input.new_empty(input.shape, dtype=torch.bool),
        )

    @torch.library.register_fake('mmdet_deform::_dropout_backward')
    def _dropout_backward_fake(grad_output: Tensor, mask: Tensor, scale: float) -> Tensor:
        return grad_output.new_empty(grad_output.shape)

    @torch.library.register_fake('mmdet_deform::relu_dropout')
    def _relu_dropout_fake(input: Tensor, p: float, seed: int) -> Tensor:
        return input.new_empty(input.shape)

    @torch.library.register_fake('mmdet_deform::_relu_dropout_backward')
    def _relu_dropout_backward_fake(grad_output: Tensor, output: Tensor, scale: float) -> Tensor:
        return grad_output.new_empty(grad_output.shape)

    def _register_gated_autograd(op: str, backward_op: str, saved_of) -> None:
        """Autograd of a dropout-like ``op(input, p, seed)`` whose gradient
        is ``backward_op(grad_output, saved, 1 / (1 - p))`` with ``saved =
        saved_of(output)``, and of ``backward_op`` itself: linear in
        grad_output and piecewise constant in ``saved``, so its derivative
        is ``backward_op`` again."""
        run_backward = getattr(torch.ops.mmdet_deform, backward_op.split('::')[1])

        def setup_context(ctx, inputs, output) -> None:
            ctx.save_for_backward(saved_of(output))
            ctx.scale = 1.0 / (1.0 - inputs[1])

        def backward(ctx, grad_output: Tensor, *unused_grads):
            (saved,) = ctx.saved_tensors
            return run_backward(grad_output, saved, ctx.scale), None, None

        def backward_setup_context(ctx, inputs, output) -> None:
            _, saved, scale = inputs
            ctx.save_for_backward(saved)
            ctx.scale = scale

        torch.library.register_autograd(op, backward, setup_context=setup_context)
        torch.library.register_autograd(backward_op, backward, setup_context=backward_setup_context)

    _register_gated_autograd(
        'mmdet_deform::dropout',
        'mmdet_deform::_dropout_backward',
        saved_of=lambda output: output[1],  # the keep mask
    )
    _register_gated_autograd(
        'mmdet_deform::relu_dropout',
        'mmdet_deform::_relu_dropout_backward',
        saved_of=lambda output: output,  # > 0 exactly where kept and input > 0
    )


# --------------------------------------------------------------------------
# 5. Module
# --------------------------------------------------------------------------
class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, semantics and switches: ``p=0`` or
    ``eval()`` turn it off) that, in training on a CPU floating point tensor,
    draws its mask with :func:`dropout`'s counter-based kernel.

    Elsewhere (CUDA tensors, where ATen's fused dropout is already fast;
    ``inplace=True``; under ``torch.compile``, which generates its own
    dropout; without the compiled extension) it is ``nn.Dropout``. The
    masks differ from ``nn.Dropout``'s under the same seed, not their
    distribution.
    """

    def uses_kernel(self, input: Tensor) -> bool:
        """Whether a forward on ``input`` runs the counter-based kernel."""
        return (
            self.training
            and 0.0 < self.p < 1.0
            and not self.inplace
            and input.device.type == 'cpu'
            and input.is_floating_point()
            and has_extension()
            and not torch.compiler.is_compiling()
        )

    def forward(self, input: Tensor) -> Tensor:
        if self.uses_kernel(input):
            output, _ = torch.ops.mmdet_deform.dropout(input, self.p, draw_seed())
            return output
        return super().forward(input)

    def relu_forward(self, input: Tensor, inplace_relu: bool = False) -> Tensor:
        """``self(relu(input))``.

        Where the kernel applies, ReLU and dropout run as one pass
        (``torch.ops.mmdet_deform.relu_dropout``) that keeps neither a mask
        nor the ReLU's input for the backward (it reads the output, which
        the next layer keeps anyway), with the mask :meth:`forward` would
        draw. Otherwise ``F.relu`` (in place on ``input`` if
        ``inplace_relu``) and then :meth:`forward`.
        """
        if self.uses_kernel(input):
            return torch.ops.mmdet_deform.relu_dropout(input, self.p, draw_seed())
        return self(F.relu(input, inplace=inplace_relu))
