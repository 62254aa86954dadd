"""mmengine's ``CheckpointHook`` with an order of operations that survives a kill."""

import os
import os.path as osp
import re

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook

from mmdet_deform.registry import HOOKS

from ..fileio import atomic_write_bytes


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` that never leaves the work dir without a complete checkpoint.

    mmengine 0.10's hook, with ``max_keep_ckpts`` set, removes the oldest
    checkpoint *before* writing the new one, and writes the
    ``last_checkpoint`` pointer with a plain ``open``. Killed during the save
    with ``max_keep_ckpts=1``, a run has deleted its only checkpoint and not
    finished the next. This hook saves first, then updates the pointer
    atomically, and only then removes outdated checkpoints, so at every
    moment the work dir holds at least one complete checkpoint (while saving,
    ``max_keep_ckpts + 1`` for a moment). Combine it with
    ``backend_args=dict(backend='atomic_local')`` (temp file, fsync, rename),
    so a checkpoint never exists under its final name half-written; the
    temp files of saves that a kill interrupted are removed when the next run
    starts training in that folder.

    Takes the arguments of :class:`mmengine.hooks.CheckpointHook`.
    """

    #: Temp files of ``atomic_write_bytes`` for checkpoints: ``.<name>.pth.<random>.tmp``.
    _STALE_TEMP = re.compile(r'\..+\.pth\.[A-Za-z0-9_]+\.tmp')

    def before_train(self, runner) -> None:
        super().before_train(runner)
        out_dir = str(self.out_dir)
        if not is_main_process() or not osp.isdir(out_dir):
            return  # remote storage keeps no local temp files
        stale = sorted(n for n in os.listdir(out_dir) if self._STALE_TEMP.fullmatch(n))
        for name in stale:
            os.remove(osp.join(out_dir, name))
        if stale:
            runner.logger.info(
                f'Removed {len(stale)} temp file(s) of interrupted checkpoint saves in '
                f'{out_dir}: {", ".join(stale)}'
            )

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            # _save_checkpoint and _save_best_checkpoint may both save at one step
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir,
            ckpt_filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args,
        )
        if not is_main_process():
            return
        atomic_write_bytes(
            str(self.last_ckpt).encode('utf-8'), osp.join(runner.work_dir, 'last_checkpoint')
        )
        if outdated is not None and outdated != step:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(outdated))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # checkpoints saved by deepspeed are folders
                self.file_backend.rmtree(path)
