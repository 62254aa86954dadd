"""The README's main job (``make demo``).

Until the shapes training job lands, this is a smoke job: it builds the
two-stage Deformable DETR (ResNet-50, random init, no download) if the model
is available, otherwise runs the compiled multi-scale deformable attention on
a generated multi-scale input, and reports what it ran.
"""

import time

import torch

import mmdet_deform
from mmdet_deform.ops import MultiScaleDeformableAttention


def main() -> None:
    torch.manual_seed(0)
    shapes = torch.tensor([[64, 84], [32, 42], [16, 21], [8, 11]])
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    num_keys = int((shapes[:, 0] * shapes[:, 1]).sum())
    attn = MultiScaleDeformableAttention(embed_dims=256, batch_first=True).eval()
    value = torch.randn(2, num_keys, 256)
    ref = torch.rand(2, num_keys, 4, 2)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = attn(value, reference_points=ref, spatial_shapes=shapes, level_start_index=starts)
    dt = time.perf_counter() - t0
    print(
        f'mmdet_deform {mmdet_deform.__version__}: MultiScaleDeformableAttention on '
        f'{num_keys} queries x 4 levels -> {tuple(out.shape)} in {dt * 1000:.0f} ms '
        f'(compiled op: {mmdet_deform.ops.has_extension()})'
    )


if __name__ == '__main__':
    main()
