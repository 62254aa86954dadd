"""Hooks of mmdet_deform, registered in the ``mmdet_deform`` scope."""

from .nonfinite_check_hook import NonFiniteCheckHook, NonFiniteLossError

__all__ = ['NonFiniteCheckHook', 'NonFiniteLossError']
