"""mmengine's ``Runner``, loading checkpoints as data and saving plain data."""

import re
from typing import Callable, List, Tuple, Union

from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model

from mmdet_deform.registry import RUNNERS

from .checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint_file
from .hooks import PlainCheckpointHook

__all__ = ['SafeRunner']


@RUNNERS.register_module()
class SafeRunner(Runner):
    """mmengine's ``Runner`` whose checkpoint loading runs no code.

    Differences from mmengine 0.10's ``Runner`` (``tools/train.py``,
    ``tools/test.py`` and the main job build this one):

    * ``load_from``, ``--resume`` and testing read a local checkpoint with
      :func:`~mmdet_deform.engine.load_checkpoint_file` (weights only, the
      numpy / ``HistoryBuffer`` names allowed for that one call, clear errors
      for empty, truncated or incomplete files); URLs go through mmengine's
      loader, which is weights-only without extra names.
    * The config embedded in a checkpoint is never executed: mmengine's
      ``resume`` passes ``meta['config']`` (a string, which any weights-only
      loader accepts) to ``Config.fromstring(..., '.py')``, which runs it.
      Here it is dropped with a warning before mmengine sees it; the config
      the run was started with is the config.
    * ``resume=True`` without ``load_from`` resumes from
      :func:`~mmdet_deform.engine.find_latest_checkpoint` of the work dir
      (a complete checkpoint inside it) instead of trusting
      ``last_checkpoint`` wherever it points.
    * Resuming from a file without training state (a weights file) says so
      instead of failing with ``KeyError: 'meta'``.
    * :class:`~mmdet_deform.engine.PlainCheckpointHook` is registered, so the
      checkpoints it writes hold plain data only.

    Takes the arguments of :class:`mmengine.runner.Runner`.
    """

    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        super().register_hooks(default_hooks, custom_hooks)
        if not any(isinstance(hook, PlainCheckpointHook) for hook in self._hooks):
            self.register_hook(PlainCheckpointHook())

    def load_or_resume(self) -> None:
        if not self._has_loaded and self._resume and self._load_from is None:
            found = find_latest_checkpoint(self.work_dir)
            if found is None:
                self.logger.info(f'No complete checkpoint to resume from in {self.work_dir}.')
                return
            self._load_from = found
            self.logger.info(f'Resuming from {found}, the latest complete checkpoint.')
        super().load_or_resume()

    def load_checkpoint(
        self,
        filename: str,
        map_location: Union[str, Callable] = 'cpu',
        strict: bool = False,
        revise_keys: List[Tuple[str, str]] = [(r'^module.', '')],  # noqa: B006  (mmengine's)
    ) -> dict:
        """Load ``filename`` into the model (see the class docstring).

        Args:
            filename (str): A local checkpoint file or a URL.
            map_location (str or callable): As for :func:`torch.load`.
            strict (bool): Whether the model and the checkpoint must have the
                same keys.
            revise_keys (list[tuple[str, str]]): ``(pattern, replacement)``
                applied to the keys of the state dict.

        Returns:
            dict: The checkpoint.

        Raises:
            CheckpointError: The file cannot be read as a checkpoint, or a
                resume gets one without training state.
        """
        if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', str(filename)):
            checkpoint = _load_checkpoint(filename, map_location=map_location)
        else:
            checkpoint = load_checkpoint_file(filename, map_location)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(
                f'checkpoint {filename!r} holds a {type(checkpoint).__name__}, not a dict'
            )
        meta = checkpoint.get('meta')
        if isinstance(meta, dict) and 'config' in meta:
            meta.pop('config')
            self.logger.warning(
                f"Ignored the config text embedded in {filename} (meta['config']): it is not "
                'executed; this run uses the config it was started with.'
            )
        if self._resume and not (isinstance(meta, dict) and {'epoch', 'iter'} <= set(meta)):
            raise CheckpointError(
                f'cannot resume from {filename!r}: it holds no training state (meta.epoch, '
                'meta.iter); it looks like a weights file. Start from its weights with '
                f'--cfg-options load_from={filename} (without --resume).'
            )
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        checkpoint = _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint
