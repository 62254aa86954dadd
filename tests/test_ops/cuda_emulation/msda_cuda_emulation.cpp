// Runs the CUDA kernels of ms_deform_attn (ms_deform_attn_cuda.cuh, the very
// source the GPU build compiles) on the CPU with the emulator of
// cuda_emulation.h. Built by tests/test_ops/test_ms_deform_attn_cuda_emulated.py.
//
// The inputs are expected valid (the tests build them); they are copied into
// checked allocations, optionally shifted by `offset` elements from an
// aligned address to exercise the kernels' narrower-vector fallback.
#include <ATen/ATen.h>
#include <torch/extension.h>

#include <tuple>

#include "cuda_emulation.h"
// clang-format off
#include "cuda/ms_deform_attn_cuda.cuh"
// clang-format on

namespace {

using mmdet_deform::MSDAShape;

// A checked copy of `t` whose data starts `offset` elements after an
// aligned address.
at::Tensor checked_copy(const at::Tensor& t, int64_t offset) {
  at::Tensor flat = at::empty({t.numel() + offset}, t.options());
  at::Tensor out = flat.narrow(0, offset, t.numel()).view(t.sizes());
  out.copy_(t);
  return out;
}

MSDAShape shape_of(const at::Tensor& value, const at::Tensor& locations) {
  MSDAShape s;
  s.batch = value.size(0);
  s.num_keys = value.size(1);
  s.num_heads = value.size(2);
  s.head_dim = value.size(3);
  s.num_queries = locations.size(1);
  s.num_levels = locations.size(3);
  s.num_points = locations.size(4);
  return s;
}

// Copies results out of the checked allocations.
at::Tensor plain(const at::Tensor& t) {
  return t.clone();
}

// Returns (output, number of kernel launches).
std::tuple<at::Tensor, int> forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t offset) {
  at::Tensor result;
  cuda_emulation::Launcher launch{mmdet_deform::msda_cuda::kBlock};
  {
    cuda_emulation::CheckedAllocatorScope scope;
    const at::Tensor v = checked_copy(value, offset);
    const at::Tensor shapes = checked_copy(spatial_shapes, 0);
    const at::Tensor starts = checked_copy(level_start_index, 0);
    const at::Tensor loc = checked_copy(sampling_locations, offset);
    const at::Tensor attn = checked_copy(attention_weights, offset);
    const at::Tensor out = mmdet_deform::msda_cuda::forward_impl(
        launch, v, shapes, starts, loc, attn, shape_of(value, sampling_locations));
    cuda_emulation::CheckedAllocatorScope::check_guards();
    result = out;
  }
  return {plain(result), launch.launches};
}

// Returns (grad_value, grad_sampling_locations, grad_attention_weights,
// number of kernel launches).
std::tuple<at::Tensor, at::Tensor, at::Tensor, int> backward(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    bool deterministic,
    int64_t offset) {
  at::Tensor grad_value, grad_locations, grad_weights;
  cuda_emulation::Launcher launch{mmdet_deform::msda_cuda::kBlock};
  {
    cuda_emulation::CheckedAllocatorScope scope;
    const at::Tensor go = checked_copy(grad_output, offset);
    const at::Tensor v = checked_copy(value, offset);
    const at::Tensor shapes = checked_copy(spatial_shapes, 0);
    const at::Tensor starts = checked_copy(level_start_index, 0);
    const at::Tensor loc = checked_copy(sampling_locations, offset);
    const at::Tensor attn = checked_copy(attention_weights, offset);
    std::tie(grad_value, grad_locations, grad_weights) = mmdet_deform::msda_cuda::backward_impl(
        launch, go, v, shapes, starts, loc, attn, shape_of(value, sampling_locations),
        deterministic);
    cuda_emulation::CheckedAllocatorScope::check_guards();
  }
  return {plain(grad_value), plain(grad_locations), plain(grad_weights), launch.launches};
}

// The vector width (channels per lane) and lanes per group the kernels use.
std::tuple<int, int, int64_t> geometry(const at::Tensor& value, int64_t offset) {
  int vec = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "geometry", [&] {
    const auto* p = static_cast<const char*>(value.data_ptr()) + offset * value.element_size();
    vec = mmdet_deform::msda_cuda::pick_vec_width<scalar_t>(value.size(3), {p});
  });
  MSDAShape s{};
  s.head_dim = value.size(3);
  const auto g = mmdet_deform::msda_cuda::make_geometry(s, 1, vec);
  return {vec, g.group, g.num_chunks};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "ms_deform_attn forward on the emulated GPU");
  m.def("backward", &backward, "ms_deform_attn backward on the emulated GPU");
  m.def("geometry", &geometry, "(vector width, lanes per group, chunks) for value");
}
