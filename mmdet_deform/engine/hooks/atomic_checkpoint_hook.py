"""mmengine's ``CheckpointHook`` with an order of operations that survives a kill."""

import os
import os.path as osp
import stat
from typing import Optional, Set

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook

from mmdet_deform.registry import HOOKS

from ..fileio import atomic_write_bytes, is_own_temp_file


def _resumed_from(runner) -> Optional[str]:
    """The checkpoint the runner resumed from (None: it did not resume, or
    resumed by mmengine's own search in its work dir)."""
    if not getattr(runner, '_resume', False):
        return None
    return getattr(runner, '_load_from', None)


def _out_dir(configured: Optional[str], work_dir: str) -> str:
    """Where mmengine's ``CheckpointHook.before_train`` will put the checkpoints."""
    if configured is None or configured == work_dir:
        return work_dir
    return osp.join(str(configured), osp.basename(work_dir.rstrip(osp.sep)))


def _same_folder(a: str, b: str) -> bool:
    if '://' in a or '://' in b:
        return a.rstrip('/') == b.rstrip('/')
    return osp.realpath(a or '.') == osp.realpath(b or '.')


def _is_stale_temp(path: str) -> bool:
    """A regular file (not a link, not a folder) named as our temp files are."""
    if not is_own_temp_file(osp.basename(path)):
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


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
    starts training in that folder (only regular files whose name carries
    the marker of :func:`~mmdet_deform.engine.atomic_write_bytes`, never a
    user's file or folder).

    Outdated checkpoints are removed only if this run wrote them, or if the
    run resumed from a checkpoint in its own checkpoint folder (it continues
    the run that wrote them). A run resumed from a checkpoint elsewhere
    (``--work-dir A --resume B/epoch_2.pth``) logs where it resumed from,
    drops the restored lists of checkpoints to keep and of the best one
    (they name B's files), and never removes a file it did not write.

    Takes the arguments of :class:`mmengine.hooks.CheckpointHook`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._written: Set[str] = set()
        self._continues_out_dir = True

    def before_train(self, runner) -> None:
        resumed_from = _resumed_from(runner)
        out_dir = _out_dir(self.out_dir, runner.work_dir)
        self._written = set()
        self._continues_out_dir = resumed_from is None or _same_folder(
            osp.dirname(resumed_from), out_dir
        )
        if not self._continues_out_dir:
            # the restored lists name the other run's checkpoints: forget them
            # before mmengine's before_train prunes by them in this out_dir
            info = runner.message_hub.runtime_info
            dropped = [k for k in list(info) if k == 'keep_ckpt_ids' or k.startswith('best_ckpt')]
            for key in dropped:
                info.pop(key)
            runner.logger.warning(
                f'Resumed from {resumed_from}, which is not in the checkpoint folder {out_dir}: '
                'this run writes its checkpoints to that folder, keeps its own list of them, '
                f'and removes none of {osp.dirname(resumed_from) or "."} or any file it did not '
                'write itself.'
            )
        super().before_train(runner)
        out_dir = str(self.out_dir)
        if not is_main_process() or not osp.isdir(out_dir):
            return  # remote storage keeps no local temp files
        stale = sorted(n for n in os.listdir(out_dir) if _is_stale_temp(osp.join(out_dir, n)))
        for name in stale:
            os.remove(osp.join(out_dir, name))
        if stale:
            runner.logger.info(
                f'Removed {len(stale)} temp file(s) of interrupted checkpoint saves in '
                f'{out_dir}: {", ".join(stale)}'
            )

    def _may_remove(self, path: str) -> bool:
        """Outdated checkpoints are removed if this run wrote them, or the run
        it continues wrote them into this same folder."""
        return path in self._written or self._continues_out_dir

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
        self._written.add(self.last_ckpt)
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
            if not self._may_remove(path):
                return
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # checkpoints saved by deepspeed are folders
                self.file_backend.rmtree(path)
