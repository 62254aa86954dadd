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

import datetime
import os
import os.path as osp
import subprocess
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
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


def set_resume(cfg: Config, resume: Optional[str]) -> None:
    """``--resume``: ``'auto'`` resumes from the work dir's latest checkpoint,
    a path from that checkpoint, None does not resume."""
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume


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
    """Initialise a CPU process group if needed, then build the runner
    (``runner_type`` from the config, else mmengine's ``Runner``)."""
    init_cpu_distributed(cfg.get('launcher', 'none'), cfg)
    if 'runner_type' in cfg:
        from mmdet_deform.registry import RUNNERS

        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)
