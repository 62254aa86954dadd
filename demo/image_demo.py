"""Detect objects in images with our configs (:class:`mmdet_deform.apis.SafeDetInferencer`,
mmdet's ``DetInferencer`` with checked inputs and weights loaded as data).

    python demo/image_demo.py IMG CONFIG [--weights CKPT] [--out-dir outputs]
        [--score-thr 0.3] [--device cpu]

``IMG`` is an image file or a folder of images. Writes ``OUT_DIR/vis/<name>``
(the image with the detections above ``--score-thr`` drawn) and
``OUT_DIR/preds/<name>.json`` (all detections: labels, scores, boxes in
xyxy pixels). Class names and palette come from the checkpoint's metadata.

Every input is checked before the model is built: a missing path, a folder
without images, or a file that is empty, truncated or not an image OpenCV can
read stops the demo with a message naming the file (exit code 2), as does a
``--weights`` file that is not a complete checkpoint. Grayscale, RGBA and
16-bit images are read as 3-channel colour images; any size works (the test
pipeline resizes). The weights are loaded as data (no code in a checkpoint
runs), and the config is always the one given: the config text stored in a
checkpoint is never used.
"""

import argparse
import os
import os.path as osp
from typing import List, Optional

import torch

#: The files of a folder that ``DetInferencer`` reads (mmdet's list).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def image_problem(path: str) -> Optional[str]:
    """What keeps ``path`` from being read as an image (None: nothing found).

    Cheap: reads the file's first and last bytes, decodes nothing.
    """
    from mmdet_deform.apis import image_path_problem

    return image_path_problem(path)


def input_problems(inputs: str) -> List[str]:
    """Problems of an input file, or of the images of an input folder.

    Returns:
        list[str]: One line per bad file (or the folder), empty when all is well.
    """
    if not osp.isdir(inputs):
        problem = image_problem(inputs)
        return [] if problem is None else [f'input {inputs!r} {problem}']
    names = sorted(n for n in os.listdir(inputs) if n.endswith(IMG_EXTENSIONS))
    if not names:
        return [f'input folder {inputs!r} holds no images ({", ".join(IMG_EXTENSIONS)})']
    problems = []
    for name in names:
        path = osp.join(inputs, name)
        problem = 'is not a file' if not osp.isfile(path) else image_problem(path)
        if problem is not None:
            problems.append(f'image {path!r} {problem}')
    return problems


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
        '--optimize-for-inference',
        action='store_true',
        help='run mmdet_deform.apis.optimize_for_inference(model) (BatchNorms folded)',
    )
    parser.add_argument(
        '--palette',
        default='none',
        choices=['coco', 'voc', 'citys', 'random', 'none'],
        help="box colours (default 'none': the dataset's palette)",
    )
    args = parser.parse_args(argv)
    if not osp.exists(args.inputs):
        parser.error(f'input not found: {args.inputs!r}')
    problems = input_problems(args.inputs)
    if problems:
        shown = problems[:10] + (
            [f'... and {len(problems) - 10} more'] if len(problems) > 10 else []
        )
        parser.error('bad input, nothing was run:\n  ' + '\n  '.join(shown))
    if not osp.isfile(args.model):
        parser.error(f'config not found: {args.model!r}')
    if args.weights is not None:
        from mmdet_deform.engine import checkpoint_header_problem

        problem = checkpoint_header_problem(args.weights)
        if problem == 'does not exist':
            parser.error(f'checkpoint not found: {args.weights!r}')
        if problem is not None:
            parser.error(f'--weights: checkpoint {args.weights!r} {problem}')
    if not 0 <= args.score_thr <= 1:
        parser.error(f'--score-thr must be in [0, 1], got {args.score_thr}')
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    from mmdet_deform.apis import SafeDetInferencer, optimize_for_inference

    device = args.device or ('cuda:0' if torch.cuda.is_available() else 'cpu')
    inferencer = SafeDetInferencer(
        model=args.model, weights=args.weights, device=device, palette=args.palette
    )
    if args.optimize_for_inference:
        inferencer.model = optimize_for_inference(inferencer.model)
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
