"""Opt-in inference optimisation: :func:`optimize_for_inference`.

Nothing here runs unless it is called: the detector's own ``forward`` has no
hidden state. The function returns a *new* model in which every known
(convolution, eval-mode BatchNorm) pair of the backbone and neck is replaced
by one :class:`FoldedConv2d` (the BatchNorm becomes ``nn.Identity``), which
saves one elementwise pass over every activation of the ResNet. The model it
was made from is left untouched.

The result is an ordinary ``nn.Module``: forward hooks fire, ``.to()`` moves
everything, ``load_state_dict()`` takes the state dict of an optimised model
(folded weights, no BatchNorm entries; load a training checkpoint into the
original model and optimise again), and ``train()`` raises a clear error,
since a folded BatchNorm cannot be trained.

Only pairs known to run in sequence are folded: adjacent children of an
``nn.Sequential`` (ResNet's deep stem and downsample branches) and, by their
names, the stem and the ``conv<i>`` / ``norm<i>`` pairs of mmdet's ResNet
blocks. A convolution is folded only if its type is exactly ``nn.Conv2d``:
subclasses such as weight-standardised or switchable-atrous convolutions
compute something else from their weights.
"""

import copy
from typing import Iterator, List, Tuple

import torch
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ['FoldedConv2d', 'conv_bn_pairs', 'optimize_for_inference']

_BatchNorm = nn.modules.batchnorm._BatchNorm


class FoldedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weights include a folded eval-mode BatchNorm
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``). Inference only:
    ``train(True)`` raises a ``RuntimeError``."""

    @classmethod
    def fold(cls, conv: nn.Conv2d, bn: nn.Module) -> 'FoldedConv2d':
        """The convolution ``bn(conv(x))`` as one module."""
        fused = fuse_conv_bn_eval(conv, bn)
        folded = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            # keep the layout of the original weight (channels-last backbones)
            memory_format = (
                torch.channels_last
                if conv.weight.is_contiguous(memory_format=torch.channels_last)
                and not conv.weight.is_contiguous()
                else torch.contiguous_format
            )
            folded.weight = nn.Parameter(
                fused.weight.detach().contiguous(memory_format=memory_format),
                requires_grad=False,
            )
            folded.bias = nn.Parameter(fused.bias.detach().clone(), requires_grad=False)
        return folded.eval()

    def train(self, mode: bool = True) -> 'FoldedConv2d':
        if mode:
            raise RuntimeError(
                'this model was made by mmdet_deform.apis.optimize_for_inference: its '
                'BatchNorms are folded into the convolutions and cannot be trained; train '
                'the original model and optimise it again'
            )
        return super().train(False)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain 2-D convolution followed by an eval-mode BatchNorm with
    running statistics over the same channels."""
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, _BatchNorm)
        and not bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


def conv_bn_pairs(module: nn.Module) -> Iterator[Tuple[nn.Module, str, str]]:
    """The (convolution, BatchNorm) pairs of ``module`` whose BatchNorm is
    applied right to the convolution's output (see the module docstring).

    Yields:
        tuple: ``(parent, conv_name, bn_name)``, the two children's names in
        ``parent``.
    """
    for parent in module.modules():
        names: List[Tuple[str, str]] = []
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            names = [(a, b) for (a, _), (b, _) in zip(children, children[1:])]
        elif isinstance(parent, ResNet) and not parent.deep_stem:
            names = [('conv1', parent.norm1_name)]
        elif isinstance(parent, Bottleneck):
            names = [(f'conv{i}', getattr(parent, f'norm{i}_name')) for i in (1, 2, 3)]
        elif isinstance(parent, BasicBlock):
            names = [(f'conv{i}', getattr(parent, f'norm{i}_name')) for i in (1, 2)]
        for conv_name, bn_name in names:
            conv = getattr(parent, conv_name, None)
            bn = getattr(parent, bn_name, None)
            if conv is not None and bn is not None and _foldable(conv, bn):
                yield parent, conv_name, bn_name


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference, with its BatchNorms folded.

    Args:
        model (nn.Module): A detector (or any module); unchanged.

    Returns:
        nn.Module: A new model in eval mode without gradients, whose
        foldable (convolution, BatchNorm) pairs are :class:`FoldedConv2d`
        followed by ``nn.Identity``. Same predictions up to float rounding.
    """
    optimized = copy.deepcopy(model)
    optimized.eval()
    optimized.requires_grad_(False)
    for parent, conv_name, bn_name in list(conv_bn_pairs(optimized)):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, FoldedConv2d.fold(conv, bn))
        setattr(parent, bn_name, nn.Identity())
    return optimized
