"""Write checkpoints that hold plain data only (no numpy or mmengine objects)."""

from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer

from mmdet_deform.registry import HOOKS

from ..checkpoint import HISTORY_BUFFER_KEY


def history_buffer_to_plain(buffer: HistoryBuffer) -> dict:
    """A ``HistoryBuffer`` as a dict of tensors and an int.

    Returns:
        dict: ``{HISTORY_BUFFER_KEY: True, 'log_history': Tensor (n,),
        'count_history': Tensor (n,), 'max_length': int}``, which
        :func:`mmdet_deform.engine.load_checkpoint_file` turns back into a
        ``HistoryBuffer``.
    """
    log, count = buffer.data
    return {
        HISTORY_BUFFER_KEY: True,
        'log_history': torch.from_numpy(np.array(log)),
        'count_history': torch.from_numpy(np.array(count)),
        'max_length': int(buffer.max_length),
    }


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers, numpy arrays as lists and
    ``HistoryBuffer`` objects as :func:`history_buffer_to_plain` dicts
    (containers are rebuilt, tensors and other values returned as they are)."""
    if isinstance(obj, HistoryBuffer):
        return history_buffer_to_plain(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        out = obj.copy()  # same type (dict, OrderedDict) and order
        for key, value in obj.items():
            out[key] = to_plain(value)
        return out
    if isinstance(obj, list):
        return [to_plain(value) for value in obj]
    if isinstance(obj, tuple) and not hasattr(obj, '_fields'):
        return tuple(to_plain(value) for value in obj)
    return obj


@HOOKS.register_module()
class PlainCheckpointHook(Hook):
    """Turn the numpy and mmengine objects of a checkpoint into plain data.

    mmengine 0.10 stores the message hub's ``HistoryBuffer`` objects (with
    numpy arrays inside) and numpy scalars (e.g. a best score) in every
    checkpoint; reading them back needs numpy's and mmengine's classes on the
    unpickler's allow-list. Right before a checkpoint is written, this hook
    replaces them in ``meta`` and ``message_hub`` by tensors, Python numbers
    and lists, so the file loads with a bare ``torch.load(f)`` (weights only,
    no allow-list). :func:`mmdet_deform.engine.load_checkpoint_file` turns
    the buffers back into ``HistoryBuffer`` objects, so a resumed run logs
    the same smoothed values.

    :class:`mmdet_deform.engine.SafeRunner` registers it; with mmengine's
    ``Runner``, add ``dict(type='mmdet_deform.PlainCheckpointHook')`` to
    ``custom_hooks``.
    """

    priority = 'LOWEST'  # after every hook that adds to the checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in ('meta', 'message_hub'):
            if key in checkpoint:
                checkpoint[key] = to_plain(checkpoint[key])
