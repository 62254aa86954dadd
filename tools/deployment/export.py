"""Export a trained Deformable DETR for deployment: ONNX (standard operators,
runs in stock ONNX Runtime / OpenVINO) or an AOTInductor package (``.pt2``).

    python tools/deployment/export.py CONFIG CHECKPOINT --format onnx --out model.onnx
    python tools/deployment/export.py CONFIG CHECKPOINT --format onnx --msda-form deform_conv \
        --out model_ort.onnx
    python tools/deployment/export.py CONFIG CHECKPOINT --format pt2 --out model.pt2
    python tools/deployment/export.py CONFIG CHECKPOINT --format pt2 --precision bf16 \
        --out model_bf16.pt2
    python tools/deployment/export.py CONFIG CHECKPOINT --format onnx --msda-form deform_conv \
        --precision int8 [--calib-images DIR] --out model_int8.onnx

The graph takes one uint8 (H, W, 3) BGR image as the test pipeline's Resize
leaves it and returns ``boxes`` (N, 4), ``scores`` (N,) and ``labels`` (N,)
(N = ``test_cfg.max_per_img``, sorted by score); normalisation, padding and
the head's sigmoid + top-k are inside. Height and width are dynamic unless
``--shape H W`` is given. ``--precision bf16`` (``.pt2`` only) runs the
backbone, neck, encoder and decoder under bf16 autocast: about twice as fast
on CPUs with bf16 matrix units (AMX), slower elsewhere, with scores that
differ from float32 in the third decimal. ``--precision int8`` (ONNX only)
quantizes the float32 file for ONNX Runtime: int8 convolutions calibrated on
``--calib-num`` images (``--calib-images``, or else the config's training
set), int8 Linear layers with inputs quantized at run time (see
``mmdet_deform/apis/quantize.py``). ``--msda-form deform_conv`` writes
the encoder's attention as one ``DeformConv`` per layer: faster in ONNX
Runtime, but OpenVINO cannot read it. ``<out>.json`` holds what
``tools/deployment/run_exported.py`` needs (classes, resize, valid sizes...).
Bad input (missing files, a checkpoint of another variant, an unsupported
opset, an existing output without ``--overwrite``) stops with a message naming
it and exit code 2.
"""

import argparse
import os.path as osp
import sys
import time
from typing import List, Optional

import torch  # noqa: F401  (first: mmdet_deform._C needs libtorch loaded)

FORMATS = ('onnx', 'pt2')
PRECISIONS = ('fp32', 'bf16', 'int8')
PRECISION_FORMATS = {'bf16': 'pt2', 'int8': 'onnx'}
MSDA_FORMS = ('grid_sample', 'deform_conv')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='config file of the detector')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--format', required=True, choices=FORMATS, dest='fmt')
    parser.add_argument('--out', required=True, help='model file to write (.onnx / .pt2)')
    parser.add_argument(
        '--opset', type=int, default=20, help='ONNX opset, 18 to 23 (default: %(default)s)'
    )
    parser.add_argument(
        '--precision',
        choices=PRECISIONS,
        default='fp32',
        help='bf16: backbone, neck, encoder and decoder under bf16 autocast (--format pt2 '
        'only); int8: the ONNX file quantized for ONNX Runtime (--format onnx only)',
    )
    parser.add_argument(
        '--calib-images',
        nargs='+',
        metavar='PATH',
        help="--precision int8: image files or folders to calibrate on (default: the config's "
        'training images)',
    )
    parser.add_argument(
        '--calib-num',
        type=int,
        default=32,
        help='--precision int8: how many calibration images (default: %(default)s)',
    )
    parser.add_argument(
        '--msda-form',
        choices=MSDA_FORMS,
        default='grid_sample',
        help='how the attention op is written in ONNX: grid_sample (default; ONNX Runtime '
        'and OpenVINO) or deform_conv (the encoder as DeformConv: about 1.4x faster in '
        'ONNX Runtime, opset >= 19, not read by OpenVINO)',
    )
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='export for exactly this input size (after the resize) instead of dynamic sizes',
    )
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.3,
        help="the runner's default drawing threshold (default: %(default)s)",
    )
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output files')
    args = parser.parse_args(argv)
    for name, path in (('config', args.config), ('checkpoint', args.checkpoint)):
        if not osp.isfile(path):
            parser.error(f'{name} not found: {path!r}')
    suffix = '.' + args.fmt
    if not args.out.endswith(suffix):
        parser.error(f'--out must end in {suffix} for --format {args.fmt}, got {args.out!r}')
    if args.fmt == 'onnx' and not 18 <= args.opset <= 23:
        parser.error(f'--opset must be from 18 to 23 (GridSample, the exporter), got {args.opset}')
    if args.msda_form != 'grid_sample' and args.fmt != 'onnx':
        parser.error(f'--msda-form {args.msda_form} is for --format onnx only')
    if args.msda_form == 'deform_conv' and args.opset < 19:
        parser.error(
            f'--msda-form deform_conv needs --opset 19 or later (DeformConv), got {args.opset}'
        )
    if args.precision != 'fp32' and args.fmt != PRECISION_FORMATS[args.precision]:
        parser.error(
            f'--precision {args.precision} is for --format {PRECISION_FORMATS[args.precision]} '
            f'only, got --format {args.fmt}'
        )
    if args.precision != 'int8' and args.calib_images:
        parser.error('--calib-images is for --precision int8 only')
    if args.calib_num < 1:
        parser.error(f'--calib-num must be >= 1, got {args.calib_num}')
    for path in args.calib_images or ():
        if not osp.exists(path):
            parser.error(f'calibration image not found: {path!r}')
    if args.shape is not None and min(args.shape) < 1:
        parser.error(f'--shape must be two positive sizes, got {args.shape}')
    if not 0 <= args.score_thr <= 1:
        parser.error(f'--score-thr must be in [0, 1], got {args.score_thr}')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be >= 1, got {args.threads}')
    if not args.overwrite:
        for path in (args.out, args.out + '.json'):
            if osp.exists(path):
                parser.error(f'{path!r} exists; pass --overwrite to replace it')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from mmdet_deform.apis.export import export_detector

    start = time.perf_counter()
    try:
        metadata = export_detector(
            args.config,
            args.checkpoint,
            fmt=args.fmt,
            out=args.out,
            opset_version=args.opset,
            shape=tuple(args.shape) if args.shape else None,
            score_thr=args.score_thr,
            overwrite=args.overwrite,
            precision=args.precision,
            msda_form=args.msda_form,
            calibration_images=args.calib_images,
            calibration_num=args.calib_num,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'export.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    sizes = metadata['input']
    seconds = time.perf_counter() - start
    kind = 'dynamic' if sizes['dynamic'] else 'static'
    print(
        f'exported a {metadata["variant"]} Deformable DETR to {args.out} '
        f'({osp.getsize(args.out) / 2**20:.1f} MiB, {metadata["precision"]}, {kind} input '
        f'{sizes["min_hw"]} to {sizes["max_hw"]}) and {args.out}.json in {seconds:.0f} s'
    )
    return metadata


if __name__ == '__main__':
    main()
