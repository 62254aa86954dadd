// CUDA entry points of multi-scale deformable attention: input checks, the
// device guard, launches on the current stream, and the registration with
// the dispatcher. The kernels and their orchestration (design, cost of the
// deterministic path) are in ms_deform_attn_cuda.cuh.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <tuple>
#include <utility>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_cuda.cuh"

namespace mmdet_deform {

namespace {

// Launches kernels on one stream and checks every launch.
struct CudaLauncher {
  cudaStream_t stream;

  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), unsigned int blocks, Args&&... args) const {
    kernel<<<blocks, msda_cuda::kBlock, 0, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda_value(const at::Tensor& value) {
  // The shared checks already put every tensor on value's device; the
  // dispatcher only sends inputs here when one of them is on a GPU.
  TORCH_CHECK(
      value.is_cuda(), "ms_deform_attn (CUDA kernel): value must be a CUDA tensor, got ",
      value.device());
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MSDAShape s = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cuda_value(value);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const CudaLauncher launch{c10::cuda::getCurrentCUDAStream()};
  return msda_cuda::forward_impl(
      launch, value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
      sampling_locations.contiguous(), attention_weights.contiguous(), s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MSDAShape s = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_ms_deform_attn_grad_output(grad_output, value, s);
  check_cuda_value(value);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const CudaLauncher launch{c10::cuda::getCurrentCUDAStream()};
  return msda_cuda::backward_impl(
      launch, grad_output.contiguous(), value.contiguous(), spatial_shapes.contiguous(),
      level_start_index.contiguous(), sampling_locations.contiguous(),
      attention_weights.contiguous(), s, at::globalContext().deterministicAlgorithms());
}

TORCH_LIBRARY_IMPL(mmdet_deform, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace mmdet_deform
