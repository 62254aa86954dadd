"""Plot loss and mAP curves of mmengine work dirs, and summarise training time.

    python tools/analysis_tools/analyze_logs.py plot_curve RUN [RUN ...] \\
        [--keys loss coco/bbox_mAP] [--legend A B] [--x-axis step|time] [--out curves.png]
    python tools/analysis_tools/analyze_logs.py cal_train_time RUN [RUN ...]
    python tools/analysis_tools/analyze_logs.py val_table RUN [RUN ...] \\
        [--keys coco/bbox_mAP coco/bbox_mAP_50] [--legend A B] [--all-epochs]

A RUN is a work dir (all its ``<timestamp>/vis_data/scalars.json`` are read in
time order, so a resumed run is one curve), one timestamp dir, or a
``scalars.json`` file. Every key gets its own panel and every run its own
colour, so several runs compare in one PNG. Training keys (``loss``, ``lr``...)
are plotted against the iteration, validation keys (``coco/bbox_mAP``...)
against the epoch; ``--x-axis time`` plots both against the training time in
minutes (the sum of the logged iteration times, validation excluded).
``val_table`` prints the validation metrics of each run's last epoch (or of
every epoch) as a Markdown table.
"""

import argparse
import glob
import json
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np


@dataclass
class RunLog:
    """The scalars of one run.

    Attributes:
        name (str): Label of the run.
        train (list[dict]): Training records (with ``iter`` and ``step``, the
            global iteration), in order.
        val (list[dict]): Validation records (``step`` is the epoch), in order.
    """

    name: str
    train: List[dict] = field(default_factory=list)
    val: List[dict] = field(default_factory=list)

    def train_minutes(self) -> np.ndarray:
        """Training time in minutes at each training record."""
        steps = np.array([r['step'] for r in self.train], dtype=float)
        times = np.array([r.get('time', 0.0) for r in self.train], dtype=float)
        return np.cumsum(np.diff(steps, prepend=0.0) * times) / 60.0

    def val_minutes(self) -> np.ndarray:
        """Training time in minutes at the end of each validated epoch."""
        if not self.train:
            return np.full(len(self.val), np.nan)
        epochs = np.array([r.get('epoch', 0) for r in self.train])
        minutes = self.train_minutes()
        out = []
        for rec in self.val:
            done = np.flatnonzero(epochs <= rec['step'])
            out.append(minutes[done[-1]] if len(done) else 0.0)
        return np.array(out)


def scalar_files(run: str) -> List[str]:
    """The ``scalars.json`` files of ``run``, oldest first."""
    if osp.isfile(run):
        return [run]
    if not osp.isdir(run):
        raise FileNotFoundError(f'no such work dir or scalars file: {run!r}')
    own = osp.join(run, 'vis_data', 'scalars.json')
    if osp.isfile(own):
        return [own]
    files = sorted(glob.glob(osp.join(run, '*', 'vis_data', 'scalars.json')))
    if not files:
        raise FileNotFoundError(
            f'no */vis_data/scalars.json under {run!r}: is it an mmengine work dir of a '
            'training run (LocalVisBackend)?'
        )
    return files


def load_run(run: str, name: Optional[str] = None) -> RunLog:
    """Read the scalars of a run; later files win for repeated steps (resume)."""
    train: Dict[int, dict] = {}
    val: Dict[int, dict] = {}
    for path in scalar_files(run):
        with open(path, encoding='utf-8') as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                if 'step' not in rec:
                    continue
                if 'iter' in rec:
                    train[rec['step']] = rec
                elif any('/' in k for k in rec):
                    val[rec['step']] = rec
    label = name or osp.basename(osp.normpath(run if osp.isdir(run) else osp.dirname(run)))
    return RunLog(label, [train[k] for k in sorted(train)], [val[k] for k in sorted(val)])


def plot_curves(
    runs: Sequence[RunLog],
    out: str,
    keys: Optional[Sequence[str]] = None,
    x_axis: str = 'step',
    title: Optional[str] = None,
) -> str:
    """Draw one panel per key with one line per run and save a PNG.

    Args:
        runs (Sequence[RunLog]): The runs.
        out (str): Path of the PNG.
        keys (Sequence[str], optional): Scalars to plot; default ``loss`` and
            ``coco/bbox_mAP`` (those present).
        x_axis (str): ``'step'`` (iteration / epoch) or ``'time'`` (minutes).
        title (str, optional): Figure title.

    Returns:
        str: ``out``.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    if x_axis not in ('step', 'time'):
        raise ValueError(f"x_axis must be 'step' or 'time', got {x_axis!r}")
    if not runs:
        raise ValueError('no runs to plot')
    present = {k for r in runs for rec in r.train + r.val for k in rec}
    if keys is None:
        keys = [k for k in ('loss', 'coco/bbox_mAP') if k in present]
    missing = [k for k in keys if k not in present]
    if missing or not keys:
        raise KeyError(
            f'keys {missing or keys} not found in the logs; available: {sorted(present)}'
        )
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        is_val = any(key in rec for r in runs for rec in r.val)
        for run in runs:
            recs = run.val if is_val else run.train
            idx = [i for i, rec in enumerate(recs) if key in rec]
            if not idx:
                continue
            if x_axis == 'time':
                xs = (run.val_minutes() if is_val else run.train_minutes())[idx]
            else:
                xs = np.array([recs[i]['step'] for i in idx])
            ys = np.array([recs[i][key] for i in idx], dtype=float)
            ax.plot(xs, ys, marker='o' if is_val else None, markersize=4, label=run.name)
        ax.set_title(key)
        if x_axis == 'time':
            ax.set_xlabel('training time (min)')
        else:
            ax.set_xlabel('epoch' if is_val else 'iteration')
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def train_time_summary(run: RunLog) -> str:
    """Average iteration time per epoch and overall."""
    if not run.train:
        return f'{run.name}: no training records'
    by_epoch: Dict[int, List[float]] = {}
    for rec in run.train:
        by_epoch.setdefault(rec.get('epoch', 0), []).append(rec.get('time', float('nan')))
    means = {e: float(np.mean(t)) for e, t in by_epoch.items()}
    slowest, fastest = max(means, key=means.get), min(means, key=means.get)
    lines = [
        f'{run.name}:',
        f'  average iter time: {np.mean([r["time"] for r in run.train]):.4f} s',
        f'  slowest epoch {slowest}: {means[slowest]:.4f} s/iter',
        f'  fastest epoch {fastest}: {means[fastest]:.4f} s/iter',
        f'  training time (iterations only): {run.train_minutes()[-1]:.2f} min',
    ]
    return '\n'.join(lines)


DEFAULT_TABLE_KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75', 'coco/bbox_mAP_s')


def val_table(
    runs: Sequence[RunLog], keys: Optional[Sequence[str]] = None, all_epochs: bool = False
) -> str:
    """A Markdown table of the validation metrics of ``runs``: one row per run
    (its last validated epoch) or, with ``all_epochs``, per validated epoch.
    Missing metrics print as ``-``."""
    keys = list(keys or DEFAULT_TABLE_KEYS)
    lines = [
        '| run | epoch | ' + ' | '.join(k.rsplit('/', 1)[-1] for k in keys) + ' |',
        '| --- | --- |' + ' --- |' * len(keys),
    ]
    for run in runs:
        records = run.val if all_epochs else run.val[-1:]
        if not records:
            lines.append(f'| {run.name} | - |' + ' - |' * len(keys))
        for rec in records:
            values = [f'{rec[k]:.3f}' if k in rec else '-' for k in keys]
            lines.append(f'| {run.name} | {rec["step"]} | ' + ' | '.join(values) + ' |')
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Analyze mmengine training logs')
    sub = parser.add_subparsers(dest='task', required=True)
    plot = sub.add_parser('plot_curve', help='plot curves of one or more runs into a PNG')
    plot.add_argument('runs', nargs='+', help='work dirs, timestamp dirs or scalars.json files')
    plot.add_argument('--keys', nargs='+', help='scalars to plot (default: loss coco/bbox_mAP)')
    plot.add_argument('--legend', nargs='+', help='one label per run (default: dir names)')
    plot.add_argument('--x-axis', choices=['step', 'time'], default='step')
    plot.add_argument('--title', help='figure title')
    plot.add_argument('--out', default='curves.png', help='output PNG (default: %(default)s)')
    timing = sub.add_parser('cal_train_time', help='iteration time statistics of runs')
    timing.add_argument('runs', nargs='+')
    table = sub.add_parser('val_table', help='validation metrics of runs as a Markdown table')
    table.add_argument('runs', nargs='+', help='work dirs, timestamp dirs or scalars.json files')
    table.add_argument(
        '--keys', nargs='+', help=f'metrics (default: {" ".join(DEFAULT_TABLE_KEYS)})'
    )
    table.add_argument('--legend', nargs='+', help='one label per run (default: dir names)')
    table.add_argument('--all-epochs', action='store_true', help='a row per validated epoch')
    args = parser.parse_args(argv)
    legend = getattr(args, 'legend', None)
    if legend and len(legend) != len(args.runs):
        parser.error(f'--legend needs one label per run: {len(args.runs)}, got {len(args.legend)}')
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.task == 'plot_curve':
        names = args.legend or [None] * len(args.runs)
        runs = [load_run(r, n) for r, n in zip(args.runs, names)]
        out = plot_curves(runs, args.out, args.keys, args.x_axis, args.title)
        print(f'saved {out}')
    elif args.task == 'val_table':
        names = args.legend or [None] * len(args.runs)
        runs = [load_run(r, n) for r, n in zip(args.runs, names)]
        print(val_table(runs, args.keys, args.all_epochs))
    else:
        for run in args.runs:
            print(train_time_summary(load_run(run)))


if __name__ == '__main__':
    main()
