// Multi-scale deformable attention: declarations shared by the schema
// (ops.cpp), the CPU kernel (cpu/) and the CUDA kernel (cuda/).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace mmdet_deform {

// Sizes of one ms_deform_attn call, read off validated inputs.
struct MSDAShape {
  int64_t batch;
  int64_t num_keys;
  int64_t num_heads;
  int64_t head_dim;
  int64_t num_queries;
  int64_t num_levels;
  int64_t num_points;
};

// Validates every input of ms_deform_attn (ranks, matching sizes, dtypes,
// devices, and that spatial_shapes / level_start_index describe exactly
// num_keys keys), raising a Python error that names the argument. Returns
// the sizes. Copies spatial_shapes / level_start_index to the host and
// checks them there, so that no kernel can index outside `value`: for CUDA
// tensors this tiny device-to-host copy synchronises the current stream,
// once per forward and once per backward call.
MSDAShape check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Additionally validates grad_output of the backward against the inputs.
void check_ms_deform_attn_grad_output(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const MSDAShape& shape);

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

}  // namespace mmdet_deform
