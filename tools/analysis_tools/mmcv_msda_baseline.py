"""mmcv 2.1's CUDA kernel of multi-scale deformable attention, as a speed
baseline on a GPU machine where mmcv itself is not installed.

Two ways to reach it, tried in this order by :func:`load_mmcv_msda`:

1. an mmcv built from its sdist with ``MMCV_WITH_OPS=1 FORCE_CUDA=1`` (see
   docs/cuda.md): its compiled ``mmcv/_ext*.so`` is loaded directly, without
   importing the ``mmcv`` package (which would need mmengine, OpenCV, ...);
2. otherwise mmcv's own source file ``mmcv/ops/csrc/pytorch/cuda/
   ms_deform_attn_cuda.cu`` from the extracted sdist, JIT-compiled together
   with a two-function binding (about a minute), in case the full mmcv build
   is too slow or fails on a newer CUDA.

Either way the functions are mmcv's, called as ``MultiScaleDeformableAttnFunction``
calls them. This file only wraps them for benchmarks; mmcv is never a
dependency of the package.

Usage::

    from tools.analysis_tools.mmcv_msda_baseline import load_mmcv_msda
    forward, backward = load_mmcv_msda('build/mmcv/mmcv-2.1.0')
    out = forward(value, shapes, starts, locations, weights, 64)
    grads = backward(value, shapes, starts, locations, weights, grad_out, 64)
"""

import glob
import importlib.util
import os
import os.path as osp
from typing import Callable, Tuple

from torch import Tensor

_BINDING = r"""
#include <torch/extension.h>

// Defined in mmcv/ops/csrc/pytorch/cuda/ms_deform_attn_cuda.cu (mmcv 2.1.0).
at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const int im2col_step);
void ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const at::Tensor& grad_output,
    at::Tensor& grad_value, at::Tensor& grad_sampling_loc,
    at::Tensor& grad_attn_weight, const int im2col_step);

void backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const at::Tensor& grad_output,
    at::Tensor grad_value, at::Tensor grad_sampling_loc,
    at::Tensor grad_attn_weight, int64_t im2col_step) {
  ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index, sampling_loc,
                               attn_weight, grad_output, grad_value, grad_sampling_loc,
                               grad_attn_weight, static_cast<int>(im2col_step));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &ms_deform_attn_cuda_forward,
        py::arg("value"), py::arg("value_spatial_shapes"), py::arg("value_level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("im2col_step"));
  m.def("ms_deform_attn_backward", &backward,
        py::arg("value"), py::arg("value_spatial_shapes"), py::arg("value_level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"),
        py::arg("grad_value"), py::arg("grad_sampling_loc"), py::arg("grad_attn_weight"),
        py::arg("im2col_step"));
}
"""


def _load_built_ext(mmcv_root: str):
    paths = glob.glob(osp.join(mmcv_root, 'mmcv', '_ext*.so'))
    if not paths:
        return None
    spec = importlib.util.spec_from_file_location('_ext', paths[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_from_source(mmcv_root: str, build_dir: str):
    from torch.utils.cpp_extension import load

    csrc = osp.join(mmcv_root, 'mmcv', 'ops', 'csrc')
    source = osp.join(csrc, 'pytorch', 'cuda', 'ms_deform_attn_cuda.cu')
    if not osp.isfile(source):
        raise FileNotFoundError(f'{source} not found: pass the extracted mmcv-2.1.0 sdist')
    os.makedirs(build_dir, exist_ok=True)
    binding = osp.join(build_dir, 'mmcv_msda_binding.cpp')
    with open(binding, 'w') as f:
        f.write(_BINDING)
    return load(
        name='mmcv_msda_baseline',
        sources=[binding, source],
        extra_include_paths=[
            osp.join(csrc, 'common'),
            osp.join(csrc, 'common', 'cuda'),
            osp.join(csrc, 'pytorch'),
        ],
        extra_cuda_cflags=['-O3', '-DMMCV_WITH_CUDA'],
        build_directory=build_dir,
        verbose=False,
    )


def load_mmcv_msda(
    mmcv_root: str, build_dir: str = 'build/mmcv_msda_baseline'
) -> Tuple[Callable[..., Tensor], Callable[..., Tuple[Tensor, Tensor, Tensor]]]:
    """mmcv's CUDA MSDA as (forward, backward).

    Args:
        mmcv_root (str): The extracted mmcv-2.1.0 sdist, built in place or not.
        build_dir (str): Where to JIT-compile mmcv's source if it is not built.

    Returns:
        tuple: ``forward(value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights, im2col_step)`` -> output
        (bs, num_queries, num_heads * head_dim), and ``backward(value,
        spatial_shapes, level_start_index, sampling_locations,
        attention_weights, grad_output, im2col_step)`` -> (grad_value,
        grad_sampling_locations, grad_attention_weights), each as mmcv's
        ``MultiScaleDeformableAttnFunction`` computes them.
    """
    ext = _load_built_ext(mmcv_root) or _build_from_source(mmcv_root, build_dir)

    def forward(value, spatial_shapes, level_start_index, locations, weights, im2col_step=64):
        return ext.ms_deform_attn_forward(
            value,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            im2col_step=im2col_step,
        )

    def backward(
        value, spatial_shapes, level_start_index, locations, weights, grad_output, im2col_step=64
    ):
        grad_value = value.new_zeros(value.shape)
        grad_locations = locations.new_zeros(locations.shape)
        grad_weights = weights.new_zeros(weights.shape)
        ext.ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            grad_output.contiguous(),
            grad_value,
            grad_locations,
            grad_weights,
            im2col_step=im2col_step,
        )
        return grad_value, grad_locations, grad_weights

    return forward, backward
