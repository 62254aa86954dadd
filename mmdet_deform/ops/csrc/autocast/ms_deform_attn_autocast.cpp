// Autocast kernels of ms_deform_attn (torchvision's autocast roi_align style).
//
// Under torch.autocast the op runs in float32 unless value,
// sampling_locations and attention_weights are all bfloat16, in which case it
// runs in bfloat16 (the kernels accumulate in float32). In float32 mode every
// float16 / bfloat16 / float32 input on the autocast device is cast to float32
// (at::autocast::cached_cast; float64 stays float64) and the result is
// float32. Sampling locations in bfloat16 resolve only 1/256 of the map, so
// mixed inputs (typically bf16 values with float32 locations) take the
// float32 path rather than rounding the locations. The backward needs no
// autocast kernel: autograd saved the inputs in the dtype the forward ran in.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"

namespace mmdet_deform {

namespace {

template <c10::DeviceType kDevice, c10::DispatchKey kAutocastKey>
at::Tensor ms_deform_attn_autocast(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmdet_deform::ms_deform_attn", "")
                       .typed<decltype(ms_deform_attn_forward_cpu)>();
  const bool all_bf16 = value.scalar_type() == at::kBFloat16 &&
      sampling_locations.scalar_type() == at::kBFloat16 &&
      attention_weights.scalar_type() == at::kBFloat16;
  if (all_bf16) {
    return op.call(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  }
  return op.call(
      at::autocast::cached_cast(at::kFloat, value, kDevice), spatial_shapes, level_start_index,
      at::autocast::cached_cast(at::kFloat, sampling_locations, kDevice),
      at::autocast::cached_cast(at::kFloat, attention_weights, kDevice));
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_deform, AutocastCPU, m) {
  m.impl(
      "ms_deform_attn",
      TORCH_FN((ms_deform_attn_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>)));
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(mmdet_deform, AutocastCUDA, m) {
  m.impl(
      "ms_deform_attn",
      TORCH_FN((ms_deform_attn_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>)));
}
#endif

}  // namespace mmdet_deform
