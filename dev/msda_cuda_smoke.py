"""Small forward + backward runs of every CUDA kernel path of ms_deform_attn,
for compute-sanitizer (memcheck / initcheck / synccheck) on a GPU machine.

Covers every dtype, both grad_value paths (atomic and deterministic), vector
widths 8/4/2/1 (head_dims 32, 6, 7 and a misaligned value), idle lanes, head
dims split into several chunks, border / outside / non-finite locations and
empty inputs. Checks results against the float64 reference loosely (the test
suite checks them tightly) and exits non-zero on a mismatch.

Usage (``dev/cuda_check.sh sanitize`` runs it under all three tools)::

    compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python dev/msda_cuda_smoke.py

``--device cpu`` runs the same cases (without float16) on the CPU kernel.
"""

import argparse
import sys
from typing import List, Optional

import torch

from mmdet_deform.ops import has_cuda_kernel, ms_deform_attn, ms_deform_attn_pytorch

CASES = [
    # (bs, [(h, w)], num_heads, head_dim, num_queries, num_points)
    (2, [(6, 5), (3, 2), (1, 1)], 3, 7, 11, 2),
    (2, [(8, 9), (4, 5)], 8, 32, 20, 4),
    (1, [(5, 4)], 2, 6, 5, 3),
    (1, [(3, 4), (2, 2)], 2, 300, 3, 2),  # several chunks in every dtype
    (0, [(3, 4)], 2, 8, 5, 2),  # empty batch
    (2, [(0, 4), (3, 0)], 2, 8, 5, 2),  # no keys
]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def make_inputs(case, dtype, device, misalign=False):
    bs, shapes, nh, d, nq, npt = case
    g = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    nk, nl = int(areas.sum()), len(shapes)
    value = torch.rand(bs, nk, nh, d, generator=g, dtype=torch.float64) * 2 - 1
    locations = torch.rand(bs, nq, nh, nl, npt, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    if locations.numel():
        locations.view(-1)[:6] = torch.tensor([float('nan'), float('inf'), -1e30, 1e30, 0, 1])
    weights = torch.rand(bs, nq, nh, nl, npt, generator=g, dtype=torch.float64)
    value = value.to(device, dtype)
    if misalign:  # a value whose data starts one element after an aligned address
        value = torch.cat([value.new_zeros(1), value.flatten()])[1:].view(value.shape)
    return (
        value,
        spatial_shapes.to(device),
        starts.to(device),
        locations.to(device, dtype),
        weights.to(device, dtype),
    )


def check(name, actual, expected, tol):
    if actual.numel() == 0:
        return True
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    ok = torch.isfinite(actual).all().item() and error <= tol * scale
    if not ok:
        print(f'  MISMATCH {name}: max error {error:.3e} (scale {scale:.3g})')
    return ok


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda')
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith('cuda')
    assert not on_cuda or has_cuda_kernel(), 'mmdet_deform._C was built without its CUDA kernel'
    backward = torch.ops.mmdet_deform._ms_deform_attn_backward
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    if not on_cuda:  # the CPU kernel has no float16 (a dry run of this script)
        dtypes.remove(torch.float16)
    ok = True
    for dtype in dtypes:
        for case in CASES:
            for misalign in (False, True):
                inputs = make_inputs(case, dtype, args.device, misalign)
                value, shapes, starts, locations, weights = inputs
                finite = torch.where(
                    torch.isfinite(locations), locations, torch.full_like(locations, 5.0)
                )
                ref_inputs = [t.double() for t in (value, locations, weights)]
                ref_inputs[1] = finite.double()
                leaves = [t.clone().requires_grad_() for t in ref_inputs]
                if value.numel():
                    expected = ms_deform_attn_pytorch(leaves[0], shapes, starts, *leaves[1:])
                else:  # nothing to sample (the reference needs keys)
                    channels = value.shape[2] * value.shape[3]
                    expected = torch.zeros(*locations.shape[:2], channels, dtype=torch.float64)
                    expected = expected.to(args.device)
                grad_output = torch.rand_like(expected)
                if expected.requires_grad and expected.numel():
                    expected.backward(grad_output)
                output = ms_deform_attn(*inputs)
                ok &= check(f'{dtype} {case} output', output, expected.detach(), TOL[dtype])
                for deterministic in (False, True):
                    torch.use_deterministic_algorithms(deterministic)
                    grads = backward(grad_output.to(dtype), *inputs)
                    torch.use_deterministic_algorithms(False)
                    for i in (0, 2):  # grad_locations: border jumps, see the test suite
                        expected_grad = leaves[0 if i == 0 else 2].grad
                        if expected_grad is None:
                            expected_grad = torch.zeros_like(ref_inputs[0 if i == 0 else 2])
                        name = f'{dtype} {case} det={deterministic} grad {i}'
                        ok &= check(name, grads[i], expected_grad, TOL[dtype])
                if on_cuda:
                    torch.cuda.synchronize()
    print('OK' if ok else 'FAILED')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
