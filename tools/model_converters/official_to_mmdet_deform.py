"""Convert a checkpoint of the official Deformable DETR implementation
(fundamentalvision/Deformable-DETR) into an mmdet_deform (= mmdet 3.3)
checkpoint.

Key mapping (official -> ours):

* ``backbone.0.body.*`` (torchvision ResNet, frozen BN) -> ``backbone.*``,
  adding the BN ``num_batches_tracked`` buffers;
* ``input_proj.i.0`` / ``.1`` (conv / GroupNorm) -> ``neck.convs.i.conv`` /
  ``.gn`` for the 1x1 projections and ``neck.extra_convs.j.*`` for the
  stride-2 3x3 ones. The official convs have a bias, so the model needs
  ``model.neck.bias=True`` (``--cfg-options model.neck.bias=True``);
* ``transformer.level_embed`` -> ``level_embed``, ``query_embed`` ->
  ``query_embedding``, ``transformer.reference_points`` ->
  ``reference_points_fc``, ``transformer.enc_output[_norm]`` ->
  ``memory_trans_fc`` / ``memory_trans_norm``, ``transformer.pos_trans`` ->
  ``pos_trans_fc``;
* encoder layers: ``self_attn`` kept, ``norm1`` -> ``norms.0``, ``linear1``
  -> ``ffn.layers.0.0``, ``linear2`` -> ``ffn.layers.1``, ``norm2`` ->
  ``norms.1``; decoder layers: ``self_attn.*`` -> ``self_attn.attn.*``,
  ``norm2`` (after self-attention) -> ``norms.0``, ``cross_attn`` kept,
  ``norm1`` (after cross-attention) -> ``norms.1``, ``norm3`` -> ``norms.2``;
* ``class_embed.i`` -> ``bbox_head.cls_branches.i`` and
  ``bbox_embed.i.layers.k`` -> ``bbox_head.reg_branches.i.{2k}``; the aliases
  ``transformer.decoder.{class,bbox}_embed`` (refinement / two-stage) are
  dropped. The official COCO models classify 91 category ids; their rows of
  the 80 COCO classes are kept, in mmdet's order (``--keep-all-classes`` to
  skip).

Example::

    python tools/model_converters/official_to_mmdet_deform.py \\
        r50_deformable_detr-checkpoint.pth deformable_detr_r50_converted.pth
"""

import argparse
import re
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import Tensor

# COCO category ids of mmdet's 80 classes, in mmdet's label order.
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]  # fmt: skip

# (official pattern, our replacement), applied in order by re.sub (anchored)
_RENAMES = [
    (r'transformer\.level_embed', 'level_embed'),
    (r'query_embed\.', 'query_embedding.'),
    (r'transformer\.reference_points\.', 'reference_points_fc.'),
    (r'transformer\.enc_output_norm\.', 'memory_trans_norm.'),
    (r'transformer\.enc_output\.', 'memory_trans_fc.'),
    (r'transformer\.pos_trans_norm\.', 'pos_trans_norm.'),
    (r'transformer\.pos_trans\.', 'pos_trans_fc.'),
    # encoder layers
    (r'transformer\.encoder\.layers\.(\d+)\.self_attn\.', r'encoder.layers.\1.self_attn.'),
    (r'transformer\.encoder\.layers\.(\d+)\.norm1\.', r'encoder.layers.\1.norms.0.'),
    (r'transformer\.encoder\.layers\.(\d+)\.linear1\.', r'encoder.layers.\1.ffn.layers.0.0.'),
    (r'transformer\.encoder\.layers\.(\d+)\.linear2\.', r'encoder.layers.\1.ffn.layers.1.'),
    (r'transformer\.encoder\.layers\.(\d+)\.norm2\.', r'encoder.layers.\1.norms.1.'),
    # decoder layers: self-attention -> norm2, cross-attention -> norm1, ffn -> norm3
    (r'transformer\.decoder\.layers\.(\d+)\.self_attn\.', r'decoder.layers.\1.self_attn.attn.'),
    (r'transformer\.decoder\.layers\.(\d+)\.norm2\.', r'decoder.layers.\1.norms.0.'),
    (r'transformer\.decoder\.layers\.(\d+)\.cross_attn\.', r'decoder.layers.\1.cross_attn.'),
    (r'transformer\.decoder\.layers\.(\d+)\.norm1\.', r'decoder.layers.\1.norms.1.'),
    (r'transformer\.decoder\.layers\.(\d+)\.linear1\.', r'decoder.layers.\1.ffn.layers.0.0.'),
    (r'transformer\.decoder\.layers\.(\d+)\.linear2\.', r'decoder.layers.\1.ffn.layers.1.'),
    (r'transformer\.decoder\.layers\.(\d+)\.norm3\.', r'decoder.layers.\1.norms.2.'),
    # head
    (r'class_embed\.(\d+)\.', r'bbox_head.cls_branches.\1.'),
    (r'bbox_embed\.(\d+)\.layers\.0\.', r'bbox_head.reg_branches.\1.0.'),
    (r'bbox_embed\.(\d+)\.layers\.1\.', r'bbox_head.reg_branches.\1.2.'),
    (r'bbox_embed\.(\d+)\.layers\.2\.', r'bbox_head.reg_branches.\1.4.'),
    # backbone
    (r'backbone\.0\.body\.', 'backbone.'),
]
# aliases of class_embed / bbox_embed registered under the decoder
_ALIASES = re.compile(r'transformer\.decoder\.(class_embed|bbox_embed)\.')
_INPUT_PROJ = re.compile(r'input_proj\.(\d+)\.(0|1)\.(\w+)$')
_BACKBONE_BN = re.compile(r'backbone\.(bn1|layer\d+\.\d+\.(bn\d|downsample\.1))\.running_var$')


def _convert_input_proj(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``input_proj.i.{0,1}`` -> ``neck.convs`` (1x1) / ``neck.extra_convs``
    (3x3), numbering each kind from 0 in the official order."""
    indices = sorted({int(m.group(1)) for k in state if (m := _INPUT_PROJ.match(k))})
    out = {}
    num_convs = num_extra = 0
    for i in indices:
        is_extra = state[f'input_proj.{i}.0.weight'].shape[-1] != 1
        target = f'neck.extra_convs.{num_extra}' if is_extra else f'neck.convs.{num_convs}'
        num_extra += int(is_extra)
        num_convs += int(not is_extra)
        for key, value in state.items():
            m = _INPUT_PROJ.match(key)
            if m and int(m.group(1)) == i:
                module = 'conv' if m.group(2) == '0' else 'gn'
                out[f'{target}.{module}.{m.group(3)}'] = value
    return out


def convert(
    official: Dict[str, Tensor], class_ids: Optional[List[int]] = COCO_CATEGORY_IDS
) -> 'OrderedDict[str, Tensor]':
    """Rename an official state dict into ours.

    Args:
        official (dict[str, Tensor]): The official model's state dict.
        class_ids (list[int], optional): Rows of the 91-way COCO classifier
            to keep, in our label order; None keeps every row. Applied only
            when the classifier has 91 outputs.

    Returns:
        OrderedDict[str, Tensor]: Our state dict.

    Raises:
        KeyError: On a key that matches no rule.
        ValueError: If an alias differs from the tensor it aliases.
    """
    converted = OrderedDict()
    for key, value in official.items():
        if _ALIASES.match(key):
            original = _ALIASES.sub(lambda m: f'{m.group(1)}.', key)
            if original in official and not torch.equal(official[original], value):
                raise ValueError(f'{key} should alias {original} but differs from it')
            continue
        if _INPUT_PROJ.match(key):
            continue
        new_key = key
        for pattern, replacement in _RENAMES:
            new_key, count = re.subn(f'^{pattern}', replacement, new_key)
            if count:
                break
        else:
            raise KeyError(f'no conversion rule for the official key {key!r}')
        is_classifier = new_key.startswith('bbox_head.cls_branches.')
        if is_classifier and class_ids is not None and value.shape[0] == 91:
            value = value[class_ids]
        converted[new_key] = value
    converted.update(_convert_input_proj(official))
    # frozen BN of the official backbone has no num_batches_tracked buffer
    for key in list(converted):
        if _BACKBONE_BN.match(key):
            tracked = key[: -len('running_var')] + 'num_batches_tracked'
            converted.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return converted


def load_official(path: str) -> Dict[str, Tensor]:
    """The model state dict of an official checkpoint (``{'model': ...,
    'args': argparse.Namespace, ...}``), loaded with ``weights_only=True``."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path} does not hold a dict, got {type(checkpoint).__name__}')
    return checkpoint.get('model', checkpoint)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='converted checkpoint (.pth)')
    parser.add_argument(
        '--keep-all-classes',
        action='store_true',
        help='keep all 91 rows of a COCO classifier (default: the 80 COCO classes)',
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    state = convert(load_official(args.src), None if args.keep_all_classes else COCO_CATEGORY_IDS)
    torch.save(
        {'state_dict': state, 'meta': {'converted_from': 'fundamentalvision/Deformable-DETR'}},
        args.dst,
    )
    print(
        f'saved {len(state)} tensors to {args.dst}; build the model with '
        '--cfg-options model.neck.bias=True (the official input projections have a bias)'
    )


if __name__ == '__main__':
    main()
