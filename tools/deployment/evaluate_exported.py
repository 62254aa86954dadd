"""Evaluate an exported Deformable DETR (``tools/deployment/export.py``) on a
config's test set, with the config's ``test_evaluator`` (COCO mAP for ours).

    python tools/deployment/evaluate_exported.py MODEL CONFIG [--runtime openvino]
        [--threads N] [--cfg-options test_dataloader.dataset.indices=50]

Every image of the config's test dataset goes through what
``tools/deployment/run_exported.py`` does (decode, the test ``Resize``, the
model, the boxes mapped back to the image), and the detections go to the
config's evaluator, as ``tools/test.py`` does for a checkpoint: so an
exported file (float32, or ``--precision int8``) is compared with its
checkpoint on the same metric. The runner's model classes run the file; this
tool itself needs mmdet for the dataset and the metric. Prints the metrics and
exits 2 on bad input (missing files, a model that does not match its JSON).
"""

import argparse
import os.path as osp
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import run_exported  # noqa: E402  (the runner beside this file)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='exported model (.onnx or .pt2) with its .json beside it')
    parser.add_argument('config', help='config whose test set and evaluator are used')
    parser.add_argument(
        '--runtime',
        choices=run_exported.RUNTIMES,
        default='onnxruntime',
        help='runtime of a .onnx model (default: %(default)s)',
    )
    parser.add_argument('--threads', type=int, default=None, help='CPU threads of the runtime')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, e.g. test_dataloader.dataset.indices=50',
    )
    args = parser.parse_args(argv)
    if not osp.isfile(args.config):
        parser.error(f'config not found: {args.config!r}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be >= 1, got {args.threads}')
    return args


def evaluate(model, meta: Dict, cfg) -> Dict[str, float]:
    """The metrics of the config's ``test_evaluator`` for ``model`` (a model
    of the runner) over the config's test dataset."""
    from mmengine.registry import init_default_scope

    import mmdet_deform  # noqa: F401  (registers the datasets and the scope)
    from mmdet_deform.registry import DATASETS, METRICS

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    evaluator = cfg.test_evaluator
    if isinstance(evaluator, (list, tuple)):
        raise ValueError('evaluate_exported.py takes a config with one test_evaluator')
    metric = METRICS.build(evaluator)
    metric.dataset_meta = dataset.metainfo
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        preds = run_exported.predict(model, run_exported.read_image(info['img_path']), meta)
        sample = dict(
            img_id=info['img_id'],
            ori_shape=(info['height'], info['width']),
            instances=info.get('instances', []),
            pred_instances={k: torch.from_numpy(v) for k, v in preds.items()},
        )
        metric.process({}, [sample])
    return metric.evaluate(len(dataset))


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    from mmengine.config import Config

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        meta = run_exported.load_metadata(args.model)
        model = run_exported.load_model(args.model, meta, args.threads, runtime=args.runtime)
    except run_exported.InputError as e:
        print(f'evaluate_exported.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    metrics = evaluate(model, meta, cfg)
    print(
        f'{args.model} ({meta["format"]}, {meta.get("precision", "fp32")}, {args.runtime}) on '
        f'the test set of {osp.basename(args.config)} in {time.perf_counter() - start:.0f} s:'
    )
    for name, value in metrics.items():
        print(f'  {name}: {value:.4f}' if isinstance(value, float) else f'  {name}: {value}')
    return metrics


if __name__ == '__main__':
    main()
