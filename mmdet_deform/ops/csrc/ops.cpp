// Schema of the mmdet_deform operators, the input checks of ms_deform_attn
// shared by every backend, and the Python module entry point of
// mmdet_deform._C.
//
// The kernels are registered per backend with TORCH_LIBRARY_IMPL in their
// own files; Python (mmdet_deform/ops/ms_deform_attn.py, dropout.py) adds
// the fake kernels and the autograd formulas.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include "ms_deform_attn.h"

namespace mmdet_deform {

namespace {

void check_float_input(const at::Tensor& t, const char* name, const at::Tensor& value) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == value.scalar_type(),
      "ms_deform_attn: ", name, " must have the dtype of value (", value.scalar_type(),
      "), got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == value.device(), "ms_deform_attn: ", name,
      " must be on the device of value (", value.device(), "), got ", t.device());
}

}  // namespace

MSDAShape check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(
      value.dim() == 4,
      "ms_deform_attn: value must be 4-D (bs, num_keys, num_heads, head_dim), got shape ",
      value.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(value.scalar_type()),
      "ms_deform_attn: value must be a floating point tensor, got ", value.scalar_type());
  TORCH_CHECK_VALUE(
      sampling_locations.dim() == 6,
      "ms_deform_attn: sampling_locations must be 6-D "
      "(bs, num_queries, num_heads, num_levels, num_points, 2), got shape ",
      sampling_locations.sizes());
  TORCH_CHECK_VALUE(
      attention_weights.dim() == 5,
      "ms_deform_attn: attention_weights must be 5-D "
      "(bs, num_queries, num_heads, num_levels, num_points), got shape ",
      attention_weights.sizes());
  TORCH_CHECK_VALUE(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      "ms_deform_attn: spatial_shapes must have shape (num_levels, 2), got ",
      spatial_shapes.sizes());
  TORCH_CHECK_VALUE(
      level_start_index.dim() == 1,
      "ms_deform_attn: level_start_index must have shape (num_levels,), got ",
      level_start_index.sizes());
  TORCH_CHECK_TYPE(
      spatial_shapes.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(
      level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: level_start_index must be int64, got ",
      level_start_index.scalar_type());
  check_float_input(sampling_locations, "sampling_locations", value);
  check_float_input(attention_weights, "attention_weights", value);
  TORCH_CHECK(
      spatial_shapes.device() == value.device(),
      "ms_deform_attn: spatial_shapes must be on the device of value (", value.device(),
      "), got ", spatial_shapes.device());
  TORCH_CHECK(
      level_start_index.device() == value.device(),
      "ms_deform_attn: level_start_index must be on the device of value (", value.device(),
      "), got ", level_start_index.device());

  MSDAShape s;
  s.batch = value.size(0);
  s.num_keys = value.size(1);
  s.num_heads = value.size(2);
  s.head_dim = value.size(3);
  s.num_queries = sampling_locations.size(1);
  s.num_levels = sampling_locations.size(3);
  s.num_points = sampling_locations.size(4);

  TORCH_CHECK_VALUE(
      sampling_locations.size(0) == s.batch,
      "ms_deform_attn: sampling_locations has batch size ", sampling_locations.size(0),
      " but value has ", s.batch);
  TORCH_CHECK_VALUE(
      sampling_locations.size(2) == s.num_heads,
      "ms_deform_attn: sampling_locations has ", sampling_locations.size(2),
      " heads but value has ", s.num_heads);
  TORCH_CHECK_VALUE(
      sampling_locations.size(5) == 2,
      "ms_deform_attn: the last dimension of sampling_locations must be 2 (x, y), got ",
      sampling_locations.size(5));
  const int64_t expected_weights[5] = {
      s.batch, s.num_queries, s.num_heads, s.num_levels, s.num_points};
  TORCH_CHECK_VALUE(
      attention_weights.sizes() == at::IntArrayRef(expected_weights),
      "ms_deform_attn: attention_weights must have shape (bs, num_queries, num_heads, "
      "num_levels, num_points) = ",
      at::IntArrayRef(expected_weights), " to match sampling_locations, got ",
      attention_weights.sizes());
  TORCH_CHECK_VALUE(
      spatial_shapes.size(0) == s.num_levels,
      "ms_deform_attn: spatial_shapes has ", spatial_shapes.size(0),
      " levels but sampling_locations has ", s.num_levels);
  TORCH_CHECK_VALUE(
      level_start_index.size(0) == s.num_levels,
      "ms_deform_attn: level_start_index has ", level_start_index.size(0),
      " levels but sampling_locations has ", s.num_levels);

  // The level metadata decides every memory access of the kernels: check it
  // on the host against num_keys. On CUDA this copy is a device sync (once
  // per forward / backward call; documented in ms_deform_attn's docstring).
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* shapes_ptr = shapes.data_ptr<int64_t>();
  const int64_t* starts_ptr = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < s.num_levels; ++l) {
    const int64_t h = shapes_ptr[2 * l];
    const int64_t w = shapes_ptr[2 * l + 1];
    TORCH_CHECK_VALUE(
        h >= 0 && w >= 0, "ms_deform_attn: spatial_shapes[", l,
        "] must be non-negative (h, w), got (", h, ", ", w, ")");
    TORCH_CHECK_VALUE(
        starts_ptr[l] == total, "ms_deform_attn: level_start_index[", l, "] must be ", total,
        " (the exclusive cumulative sum of h*w over spatial_shapes), got ", starts_ptr[l]);
    TORCH_CHECK_VALUE(
        h == 0 || w <= (INT64_MAX - total) / h,
        "ms_deform_attn: spatial_shapes overflows int64");
    total += h * w;
  }
  TORCH_CHECK_VALUE(
      total == s.num_keys, "ms_deform_attn: spatial_shapes describe sum(h*w) = ", total,
      " keys but value has num_keys = ", s.num_keys);
  return s;
}

void check_ms_deform_attn_grad_output(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const MSDAShape& s) {
  const int64_t expected[3] = {s.batch, s.num_queries, s.num_heads * s.head_dim};
  TORCH_CHECK_VALUE(
      grad_output.sizes() == at::IntArrayRef(expected),
      "ms_deform_attn backward: grad_output must have shape ", at::IntArrayRef(expected),
      ", got ", grad_output.sizes());
  check_float_input(grad_output, "grad_output", value);
}

}  // namespace mmdet_deform

TORCH_LIBRARY(mmdet_deform, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  // Dropout with a counter-based mask (cpu/dropout_cpu.cpp): returns the
  // output and the bool keep mask; the backward multiplies by mask * scale.
  m.def("dropout(Tensor input, float p, int seed) -> (Tensor, Tensor)");
  m.def("_dropout_backward(Tensor grad_output, Tensor mask, float scale) -> Tensor");
  // dropout(relu(input)) in one pass, with the same mask; the backward
  // needs only the output.
  m.def("relu_dropout(Tensor input, float p, int seed) -> Tensor");
  m.def("_relu_dropout_backward(Tensor grad_output, Tensor output, float scale) -> Tensor");
}

// `import mmdet_deform._C` loads this library (running the registrations
// above); the module itself is empty: everything is reached via torch.ops.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Compiled operators of mmdet_deform (see torch.ops.mmdet_deform).",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
