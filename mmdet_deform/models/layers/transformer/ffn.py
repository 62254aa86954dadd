"""The transformer feed-forward network, with a leaner forward pass.

:class:`FastFFN` is mmcv's ``FFN`` (same arguments, submodules and parameter
names, same math) whose forward, for the usual two-layer ReLU network:

* works on 2-D (tokens, channels) tensors, so the in-place ReLU acts on the
  Linear's own output rather than on a 3-D view of it (an in-place op on a
  view makes autograd record a costly ``CopySlices`` node);
* calls the same ``nn.Dropout`` modules in the same order as mmcv's
  forward, so dropout is switched off as in mmdet (``ffn_drop=0`` or
  ``eval()``) and, under one seed, draws the same masks.
"""

from typing import Optional

import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import FFN
from torch import Tensor, nn

__all__ = ['FastFFN']


class FastFFN(FFN):
    """mmcv's ``FFN`` (see its arguments) with a leaner forward for the
    standard configuration: two Linear layers, ReLU, identity connection, no
    extra dropout layer or layer scale. Other configurations run mmcv's
    forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fast = (
            self.num_fcs == 2
            and self.add_identity
            and isinstance(self.layers[0][1], nn.ReLU)
            and isinstance(self.dropout_layer, nn.Identity)
            and isinstance(self.gamma2, nn.Identity)
        )

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        """``identity + fc2(drop(relu(fc1(x))))`` with dropout after fc2.

        Args:
            x (Tensor): has shape (..., embed_dims).
            identity (Tensor, optional): Residual, shaped like ``x``.
                Defaults to ``x``.

        Returns:
            Tensor: Shaped like ``x``.
        """
        if not self._fast:
            return super().forward(x, identity)
        fc1, _, drop1 = self.layers[0]
        fc2, drop2 = self.layers[1], self.layers[2]
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (..., c) -> (n, c)
        hidden = F.relu(F.linear(x, fc1.weight, fc1.bias), inplace=True)
        out = drop2(F.linear(drop1(hidden), fc2.weight, fc2.bias))
        identity = x if identity is None else identity.reshape(-1, shape[-1])
        return (identity + out).view(shape)
