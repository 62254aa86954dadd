"""The transformer feed-forward network, with a leaner forward pass.

:class:`FastFFN` is mmcv's ``FFN`` (same arguments, submodules and parameter
names, same math) whose forward, for the usual two-layer ReLU network:

* works on 2-D (tokens, channels) tensors, so the in-place ReLU acts on the
  Linear's own output rather than on a 3-D view of it (an in-place op on a
  view makes autograd record a costly ``CopySlices`` node);
* drops out with :class:`~mmdet_deform.ops.Dropout` modules in place of
  mmcv's ``nn.Dropout`` ones (same positions, same ``p``; dropout is
  switched off as in mmdet, with ``ffn_drop=0`` or ``eval()``): in CPU
  training they draw their masks faster than ``nn.Dropout`` (docs/benchmarks.md), which
  matters over the encoder's (tokens, feedforward_channels) activations;
  the hidden ReLU and dropout run as one pass that keeps no mask
  (:meth:`~mmdet_deform.ops.Dropout.relu_forward`).
  The masks differ from mmcv's under the same seed, not their distribution.
"""

from typing import Optional

from mmcv.cnn.bricks.transformer import FFN
from torch import Tensor, nn

from mmdet_deform.ops import Dropout

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
        if self._fast:
            self.layers[0][2] = Dropout(self.layers[0][2].p)
            self.layers[2] = Dropout(self.layers[2].p)

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
        hidden = fc1(x)
        # (ReLU + dropout in one pass in CPU training)
        hidden = drop1.relu_forward(hidden, inplace_relu=True)
        out = drop2(fc2(hidden))
        identity = x if identity is None else identity.reshape(-1, shape[-1])
        return (identity + out).view(shape)
