"""Detect non-finite losses and gradients, skip those steps, stop on a streak."""

from typing import Dict, List, Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper

from mmdet_deform.registry import HOOKS


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive training steps were non-finite."""


@HOOKS.register_module()
class NonFiniteCheckHook(Hook):
    """Skip optimizer steps whose loss or gradient norm is not finite.

    At ``before_train`` the hook guards every optimizer wrapper of the runner
    (``OptimWrapper``, its AMP variants, or each member of an
    ``OptimWrapperDict``): its ``update_params`` skips backward and step when
    the loss is NaN/inf, and its ``step`` skips the optimizer step when the
    total gradient norm is NaN/inf (with a GradScaler, fp16 overflow is left to
    the scaler, which already skips such steps and lowers its scale). The
    weights therefore never take a non-finite update.

    After each iteration a skipped step is logged with the iteration, the loss
    terms and the image ids of the batch; after ``max_consecutive`` skipped
    steps in a row the run stops with :class:`NonFiniteLossError`, leaving the
    checkpoints written so far intact (the last one was taken before the
    trouble and holds finite weights).

    Args:
        max_consecutive (int): Consecutive skipped steps that stop the run.
            Defaults to 10.
        check_grad_norm (bool): Also check the gradient norm, not only the
            loss. Costs one norm over all gradients per step. Defaults to True.
    """

    priority = 'VERY_HIGH'

    def __init__(self, max_consecutive: int = 10, check_grad_norm: bool = True) -> None:
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f'max_consecutive must be a positive int, got {max_consecutive!r}')
        self.max_consecutive = max_consecutive
        self.check_grad_norm = check_grad_norm
        self.consecutive = 0
        self.total_skipped = 0
        self._bad_reason: Optional[str] = None

    # ------------------------------------------------------------- guards
    def before_train(self, runner) -> None:
        wrappers = getattr(runner.optim_wrapper, 'optim_wrappers', None)
        for wrapper in wrappers.values() if wrappers else [runner.optim_wrapper]:
            self._guard(wrapper)

    def _guard(self, wrapper: OptimWrapper) -> None:
        if getattr(wrapper, '_nonfinite_guarded', False):
            return
        update_params = wrapper.update_params
        step = wrapper.step
        uses_scaler = getattr(wrapper, 'loss_scaler', None) is not None

        def guarded_update_params(
            loss: torch.Tensor,
            step_kwargs: Optional[Dict] = None,
            zero_kwargs: Optional[Dict] = None,
        ) -> None:
            if not bool(torch.isfinite(loss.detach()).all()):
                self._bad_reason = f'loss is {loss.detach().float().item()}'
                wrapper.zero_grad()
                return
            update_params(loss, step_kwargs=step_kwargs, zero_kwargs=zero_kwargs)

        def guarded_step(**kwargs) -> None:
            if self.check_grad_norm and not uses_scaler:
                grads = [
                    p.grad
                    for group in wrapper.optimizer.param_groups
                    for p in group['params']
                    if p.grad is not None
                ]
                if grads:
                    norm = torch.nn.utils.get_total_norm(grads)
                    if not bool(torch.isfinite(norm)):
                        self._bad_reason = f'gradient norm is {norm.item()}'
                        return
            step(**kwargs)

        wrapper.update_params = guarded_update_params
        wrapper.step = guarded_step
        wrapper._nonfinite_guarded = True

    # ------------------------------------------------------------ logging
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._bad_reason = None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._bad_reason is None:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total_skipped += 1
        runner.message_hub.update_info('nonfinite_skipped_steps', self.total_skipped)
        terms = ', '.join(f'{k}={_as_float(v):.4g}' for k, v in (outputs or {}).items())
        runner.logger.warning(
            f'Non-finite training step at iteration {runner.iter + 1} (epoch '
            f'{runner.epoch + 1}): {self._bad_reason}; skipped the optimizer step '
            f'({self.consecutive} in a row, {self.total_skipped} in total). '
            f'Loss terms: {terms or "n/a"}. Images: {_image_ids(data_batch)}'
        )
        if self.consecutive >= self.max_consecutive:
            last = runner.message_hub.get_info('last_ckpt')
            raise NonFiniteLossError(
                f'{self.consecutive} consecutive training steps had a non-finite loss or '
                f'gradient (last: {self._bad_reason}) at iteration {runner.iter + 1}; '
                'stopping. The weights never took a non-finite update'
                + (f'; the last checkpoint is {last}' if last else '')
                + '. Try a lower learning rate, gradient clipping '
                '(optim_wrapper.clip_grad), or check the images listed in the warnings above.'
            )


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


def _image_ids(data_batch) -> List:
    """Image ids (or paths) of a batch, for the log."""
    samples: Sequence = []
    if isinstance(data_batch, dict):
        samples = data_batch.get('data_samples') or []
    ids = []
    for sample in samples:
        meta = getattr(sample, 'metainfo', sample if isinstance(sample, dict) else {})
        ids.append(meta.get('img_id', meta.get('img_path', '?')))
    return ids
