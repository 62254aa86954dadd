"""Generate the synthetic shapes detection dataset (COCO format).

    python tools/dataset_converters/generate_shapes.py --out data/shapes

writes ``train/``, ``val/`` and ``annotations/{train,val}.json`` under
``--out``. Safe to rerun: complete splits with the same parameters are
skipped, partial ones regenerated; a non-empty directory that the generator
did not write is refused. Configs using ``mmdet_deform.ShapesDataset`` with
``generate=...`` do the same on first use, so running this is optional.
"""

import argparse
import sys
from typing import List, Optional

import torch  # noqa: F401  (first: mmdet_deform._C needs libtorch loaded)

from mmdet_deform.datasets import ShapesDirError, ShapesRenderParams, generate_shapes


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    defaults = ShapesRenderParams()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/shapes', help='dataset root (default: %(default)s)')
    parser.add_argument('--num-train', type=int, default=2000, help='training images')
    parser.add_argument('--num-val', type=int, default=200, help='validation images')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed')
    parser.add_argument('--img-size', type=int, default=defaults.img_size, help='image side, px')
    parser.add_argument('--min-objects', type=int, default=defaults.min_objects)
    parser.add_argument('--max-objects', type=int, default=defaults.max_objects)
    parser.add_argument('--min-size', type=float, default=defaults.min_size, help='object px')
    parser.add_argument('--max-size', type=float, default=defaults.max_size, help='object px')
    parser.add_argument('--max-occlusion', type=float, default=defaults.max_occlusion)
    parser.add_argument('--noise-std', type=float, default=defaults.noise_std)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    render = dict(
        img_size=args.img_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        min_size=args.min_size,
        max_size=args.max_size,
        max_occlusion=args.max_occlusion,
        noise_std=args.noise_std,
    )
    try:
        done = generate_shapes(args.out, args.num_train, args.num_val, args.seed, **render)
    except (ShapesDirError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for split, generated in done.items():
        state = 'generated' if generated else 'already complete, skipped'
        print(f'{split}: {state} ({args.out}/annotations/{split}.json)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
