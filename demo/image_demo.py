"""Detect objects in images with mmdet's ``DetInferencer`` and our configs.

    python demo/image_demo.py IMG CONFIG [--weights CKPT] [--out-dir outputs]
        [--score-thr 0.3] [--device cpu]

``IMG`` is an image file or a folder of images. Writes ``OUT_DIR/vis/<name>``
(the image with the detections above ``--score-thr`` drawn) and
``OUT_DIR/preds/<name>.json`` (all detections: labels, scores, boxes in
xyxy pixels). Class names and palette come from the checkpoint's metadata.
"""

import argparse
import os.path as osp
from typing import List, Optional

import torch


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Detect objects in images')
    parser.add_argument('inputs', help='an image file or a folder of images')
    parser.add_argument('model', help='config file of the detector')
    parser.add_argument('--weights', help='checkpoint file (default: random weights)')
    parser.add_argument('--out-dir', default='outputs', help='output folder (default: %(default)s)')
    parser.add_argument(
        '--score-thr',
        '--pred-score-thr',
        dest='score_thr',
        type=float,
        default=0.3,
        help='draw detections with a score above this (default: %(default)s)',
    )
    parser.add_argument('--device', help='e.g. cpu or cuda:0 (default: cuda if available)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass')
    parser.add_argument('--show', action='store_true', help='also show the images in a window')
    parser.add_argument('--no-save-vis', action='store_true', help='do not write the images')
    parser.add_argument('--no-save-pred', action='store_true', help='do not write the JSONs')
    parser.add_argument('--print-result', action='store_true', help='print the predictions')
    parser.add_argument(
        '--palette',
        default='none',
        choices=['coco', 'voc', 'citys', 'random', 'none'],
        help="box colours (default 'none': the dataset's palette)",
    )
    args = parser.parse_args(argv)
    if not osp.exists(args.inputs):
        parser.error(f'input not found: {args.inputs!r}')
    if not osp.isfile(args.model):
        parser.error(f'config not found: {args.model!r}')
    if args.weights is not None and not osp.isfile(args.weights):
        parser.error(f'checkpoint not found: {args.weights!r}')
    if not 0 <= args.score_thr <= 1:
        parser.error(f'--score-thr must be in [0, 1], got {args.score_thr}')
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    from mmdet.apis import DetInferencer

    device = args.device or ('cuda:0' if torch.cuda.is_available() else 'cpu')
    inferencer = DetInferencer(
        model=args.model, weights=args.weights, device=device, palette=args.palette
    )
    results = inferencer(
        args.inputs,
        batch_size=args.batch_size,
        show=args.show,
        no_save_vis=args.no_save_vis,
        no_save_pred=args.no_save_pred,
        pred_score_thr=args.score_thr,
        print_result=args.print_result,
        out_dir=args.out_dir,
    )
    if not (args.no_save_vis and args.no_save_pred):
        print(f'results have been saved at {osp.abspath(args.out_dir)}')
    return results


if __name__ == '__main__':
    main()
