"""Config and launch plumbing shared by ``tools/train.py`` and ``tools/test.py``.

They follow mmdet 3.x's tools (same flags, same priorities), plus what a
machine without CUDA needs:

* distributed runs use the ``gloo`` backend (``env_cfg.dist_cfg.backend``)
  and a ``DistributedDataParallel`` without ``device_ids``; the process group
  is initialised here because mmengine's ``init_dist`` calls
  ``torch.cuda.set_device``, which a CPU build of torch does not have;
* ``--amp`` means bfloat16 autocast (:class:`AutocastOptimWrapper`), since
  mmengine's ``AmpOptimWrapper`` (fp16 with loss scaling) needs a GPU.
"""

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import os.path as osp
import re
import stat
import subprocess
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def load_config(
    config: str,
    cfg_options: Optional[dict] = None,
    work_dir: Optional[str] = None,
    launcher: str = 'none',
) -> Config:
    """Load ``config``, apply ``--cfg-options`` and choose the work dir.

    Args:
        config (str): Path of the config file.
        cfg_options (dict, optional): ``--cfg-options`` as parsed by
            mmengine's ``DictAction``; dotted keys reach nested dicts and list
            items (``model.backbone.out_indices=(1,2,3)``,
            ``train_dataloader.dataset.pipeline.2.scale=(256,256)``).
        work_dir (str, optional): ``--work-dir``; else the config's
            ``work_dir``; else ``work_dirs/<config name>``.
        launcher (str): One of ``none``, ``pytorch``, ``slurm``, ``mpi``.

    Returns:
        Config: The config, ready for :func:`build_runner`.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher must be one of {LAUNCHERS}, got {launcher!r}')
    if not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config!r}')
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    if launcher != 'none' and not torch.cuda.is_available():
        _use_cpu_distributed(cfg)
    return cfg


def _use_cpu_distributed(cfg: Config) -> None:
    """gloo and a device-less DistributedDataParallel, for CPU processes."""
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False),
    )
    wrapper['device_ids'] = None  # DDP on CPU modules takes no device ids
    cfg.model_wrapper_cfg = wrapper


def enable_amp(cfg: Config) -> None:
    """``--amp``: fp16 with dynamic loss scaling on CUDA (as mmdet), bf16
    autocast elsewhere."""
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    else:
        cfg.optim_wrapper.type = 'mmdet_deform.AutocastOptimWrapper'
        cfg.optim_wrapper.dtype = 'bfloat16'
        cfg.optim_wrapper.pop('loss_scale', None)


def enable_auto_scale_lr(cfg: Config) -> None:
    """``--auto-scale-lr``: scale the lr by (total batch) / ``auto_scale_lr.base_batch_size``."""
    auto = cfg.get('auto_scale_lr', None)
    if not auto or 'base_batch_size' not in auto:
        raise RuntimeError(
            '--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=...)` in the config '
            '(the total batch size its lr was tuned for)'
        )
    cfg.auto_scale_lr.enable = True


def set_resume(cfg: Config, resume: Optional[str]) -> Optional[str]:
    """``--resume``: without a path (``'auto'``) resume from the work dir's
    latest *complete* checkpoint, with a path from that checkpoint; None does
    not resume.

    The latest checkpoint is found by
    :func:`mmdet_deform.engine.find_latest_checkpoint`, which follows the
    ``last_checkpoint`` pointer only if it names a complete checkpoint inside
    the work dir (a run killed during a save may leave it stale; one that
    leads out of the work dir is not followed, with a warning), else takes
    the newest complete ``epoch_*.pth`` / ``iter_*.pth``, logging each one it
    skips and why. With none there, training starts as configured
    (``load_from`` included) and says so. A config with ``resume = True`` and
    no ``load_from`` counts as ``--resume``. A checkpoint given by path may
    lie elsewhere: the log says so, and the run leaves that folder alone
    (:class:`~mmdet_deform.engine.AtomicCheckpointHook`).

    Returns:
        str or None: The checkpoint training will resume from.
    """
    if resume is None and cfg.get('resume', False) and cfg.get('load_from') is None:
        resume = 'auto'
    if resume is None:
        return None
    if resume != 'auto':
        if not osp.isfile(resume):
            raise FileNotFoundError(f'--resume: checkpoint not found: {resume!r}')
        cfg.resume = True
        cfg.load_from = resume
        if _inside(resume, cfg.work_dir):
            print_log(f'--resume: resuming from {resume}', 'current')
        else:
            print_log(
                f'--resume: resuming from {resume}, which is outside the work dir '
                f'{cfg.work_dir}: this run writes its checkpoints to {cfg.work_dir} and '
                f'leaves {osp.dirname(osp.abspath(resume))} as it is',
                logger='current',
                level=logging.WARNING,
            )
        return resume
    from mmdet_deform.engine import find_latest_checkpoint

    found = find_latest_checkpoint(cfg.work_dir)
    if found is None:
        # mmengine's own search would trust a stale pointer: don't let it run
        cfg.resume = False
        print_log(
            f'--resume: no complete checkpoint in {cfg.work_dir}; starting a new run',
            logger='current',
            level=logging.WARNING,
        )
        return None
    cfg.resume = True
    cfg.load_from = found
    print_log(f'--resume: resuming from {found}, the latest complete checkpoint', 'current')
    return found


#: Files of a work dir that a new run (without ``--resume``) would overwrite.
_RUN_OUTPUTS = re.compile(r'(epoch|iter)_\d+\.pth|best_.*\.pth|last_checkpoint')


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` (symlinks resolved)."""
    path, folder = osp.realpath(path), osp.realpath(folder)
    return osp.commonpath([path, folder]) == folder


def check_work_dir(cfg: Config, resume: Optional[str] = None) -> None:
    """Refuse to start a run over the checkpoints of another one.

    mmengine keeps each run's logs in a timestamped subfolder of the work
    dir, but writes checkpoints (``epoch_N.pth``, ``last_checkpoint``) into
    the work dir itself, so a second run there would overwrite (and, with
    ``max_keep_ckpts``, delete) the first one's. Call this before building the
    runner (and after :func:`lock_work_dir`, so that two runs started at once
    cannot both pass).

    Args:
        cfg (Config): The config (its ``work_dir``).
        resume (str, optional): ``--resume``: ``'auto'`` or a checkpoint in
            the work dir continues the run there, which is allowed; a
            checkpoint from another folder starts a new run from its state,
            which needs a work dir without checkpoints.

    Raises:
        FileExistsError: The work dir holds checkpoints and the run does not
            continue them; the message names the work dir and the ways out.
    """
    work_dir = cfg.work_dir
    if resume is None and cfg.get('resume', False):
        resume = cfg.get('load_from') or 'auto'
    continues = resume == 'auto' or (resume is not None and _inside(resume, work_dir))
    if continues or not osp.isdir(work_dir):
        return
    found = sorted(n for n in os.listdir(work_dir) if _RUN_OUTPUTS.fullmatch(n))
    if not found:
        return
    shown = ', '.join(found[:4]) + (', ...' if len(found) > 4 else '')
    if resume is not None:
        raise FileExistsError(
            f'work dir {work_dir!r} holds the checkpoints of another run ({shown}), and '
            f'--resume {resume} is a checkpoint from elsewhere: resuming it here would '
            'overwrite or remove them. Resume it into an empty --work-dir (or its own folder). '
            'Nothing was changed.'
        )
    raise FileExistsError(
        f'work dir {work_dir!r} already holds the checkpoints of an earlier run ({shown}); '
        'a new run would overwrite them. Continue that run with --resume (its latest '
        'complete checkpoint) or --resume CKPT, or start a new run with another '
        '--work-dir. Nothing was changed.'
    )


#: Name of the lock file a training run holds in its work dir.
WORK_DIR_LOCK = '.mmdet_deform_run.lock'


class WorkDirBusyError(RuntimeError):
    """Another training run holds the work dir."""


class WorkDirLock:
    """An exclusive lock of a work dir, held by one training run at a time.

    ``flock`` on ``<work_dir>/.mmdet_deform_run.lock`` (created with
    ``O_NOFOLLOW``, never through a symlink), which the kernel releases when
    the process ends however it ends, so a killed run leaves no stale lock.
    The file holds the pid of the holder and is removed on release. Use as a
    context manager, or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir
        self.path = osp.join(work_dir, WORK_DIR_LOCK)
        self._fd: Optional[int] = None

    def acquire(self) -> 'WorkDirLock':
        """Take the lock.

        Raises:
            WorkDirBusyError: Another process holds it (the message names the
                work dir and that process' pid).
            FileExistsError: The lock path is a symlink or not a file.
        """
        os.makedirs(self.work_dir, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, 'O_CLOEXEC', 0)
        for _ in range(10):
            try:
                fd = os.open(self.path, flags, 0o666)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise FileExistsError(
                        f'{self.path} is a symbolic link; refusing to use it as the lock of '
                        f'the work dir {self.work_dir!r}. Remove it.'
                    ) from e
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise FileExistsError(f'{self.path} is not a regular file; remove it')
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise WorkDirBusyError(
                    f'work dir {self.work_dir!r} is in use by another training run'
                    + (f' (pid {holder})' if holder else '')
                    + f' (it holds {self.path}). Two runs in one work dir would overwrite each '
                    "other's checkpoints: wait for it to end, or choose another --work-dir."
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # the holder before us may have removed the file after we opened it
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f'{os.getpid()}\n'.encode())
                self._fd = fd
                return self
            os.close(fd)
        raise WorkDirBusyError(f'could not lock {self.path}: it keeps being replaced')

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking: a waiter then sees a new inode
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> 'WorkDirLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> Optional[int]:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    return None


def _rank() -> int:
    """The process' rank from the launcher's environment (0 without one)."""
    for key in ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'):
        if os.environ.get(key, '').isdigit():
            return int(os.environ[key])
    return 0


def lock_work_dir(cfg: Config) -> contextlib.AbstractContextManager:
    """The lock of ``cfg.work_dir`` for a training run (:class:`WorkDirLock`);
    on ranks other than 0 of a distributed run a no-op (rank 0 holds it)."""
    if _rank() != 0 or '://' in str(cfg.work_dir):
        return contextlib.nullcontext()
    return WorkDirLock(cfg.work_dir)


def init_cpu_distributed(launcher: str, cfg: Config) -> None:
    """Initialise the process group of a CPU run (a no-op with CUDA, where
    mmengine's ``init_dist`` does it, or when it is initialised already).

    Reads the environment of the launcher as mmengine does: ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (torchrun), ``SLURM_*``
    or ``OMPI_COMM_WORLD_*``.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.pop('backend', 'gloo')
    timeout = dist_cfg.pop('timeout', None)
    if timeout is not None:
        dist_cfg['timeout'] = datetime.timedelta(seconds=timeout)
    if launcher == 'slurm':
        proc_id = int(os.environ['SLURM_PROCID'])
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            nodes = os.environ['SLURM_NODELIST']
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {nodes} | head -n1'
            )
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
        os.environ['RANK'] = str(proc_id)
    elif launcher == 'mpi':
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            raise KeyError('the mpi launcher needs the environment variable MASTER_ADDR')
        os.environ['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
        os.environ['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
        os.environ['LOCAL_RANK'] = os.environ['OMPI_COMM_WORLD_LOCAL_RANK']
    torch_dist.init_process_group(backend=backend, **dist_cfg)


def build_runner(cfg: Config) -> Runner:
    """Initialise a CPU process group if needed, then build the runner:
    ``runner_type`` from the config, else
    :class:`mmdet_deform.engine.SafeRunner` (mmengine's ``Runner`` with
    checkpoint loading that runs no code, see its docstring)."""
    from mmdet_deform.engine import SafeRunner

    init_cpu_distributed(cfg.get('launcher', 'none'), cfg)
    if 'runner_type' not in cfg:
        return SafeRunner.from_cfg(cfg)
    from mmdet_deform.registry import RUNNERS

    runner = RUNNERS.build(cfg)
    if not isinstance(runner, SafeRunner):
        print_log(
            f'runner_type={cfg.runner_type!r} is not a mmdet_deform.SafeRunner: checkpoints are '
            "loaded by mmengine's loader",
            logger='current',
            level=logging.WARNING,
        )
    return runner
