// CPU kernel of multi-scale deformable attention, forward and backward.
//
// Sampling is F.grid_sample(bilinear, zeros, align_corners=False) per level:
// the pixel coordinate of a normalised x is x * w - 0.5, and a bilinear corner
// outside the map contributes zero. Non-finite locations contribute zero.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../ms_deform_attn.h"

namespace mmdet_deform {

namespace {

// The bilinear corners of one sampling point that fall inside an h x w map.
template <typename acc_t>
struct Corners {
  int64_t offset[4];  // key offset (y * w + x) of each corner
  acc_t weight[4];    // bilinear weight of each corner
  acc_t dweight_dx[4];
  acc_t dweight_dy[4];
  int count = 0;
};

// Fills `c` for the pixel coordinate (x, y); returns false if no corner of it
// is inside the map (including non-finite coordinates).
template <typename acc_t>
inline bool bilinear_corners(acc_t x, acc_t y, int64_t h, int64_t w, Corners<acc_t>& c) {
  c.count = 0;
  // Also false for NaN: every comparison with NaN is false.
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < acc_t(w) && y < acc_t(h))) {
    return false;
  }
  const acc_t x0f = std::floor(x);
  const acc_t y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const acc_t lx = x - x0f, ly = y - y0f;
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t ws[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const acc_t dxs[4] = {-hy, hy, -ly, ly};
  const acc_t dys[4] = {-hx, -lx, hx, lx};
  for (int k = 0; k < 4; ++k) {
    if (xs[k] >= 0 && xs[k] < w && ys[k] >= 0 && ys[k] < h) {
      c.offset[c.count] = ys[k] * w + xs[k];
      c.weight[c.count] = ws[k];
      c.dweight_dx[c.count] = dxs[k];
      c.dweight_dy[c.count] = dys[k];
      ++c.count;
    }
  }
  return c.count > 0;
}

template <typename scalar_t>
void forward_kernel(
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* starts,
    const scalar_t* locations,
    const scalar_t* weights,
    scalar_t* output,
    const MSDAShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nh = s.num_heads, d = s.head_dim, nl = s.num_levels, np = s.num_points;
  at::parallel_for(0, s.batch * s.num_queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    Corners<acc_t> corners;
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / s.num_queries;
      for (int64_t head = 0; head < nh; ++head) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t point_base = (bq * nh + head) * nl * np;
        for (int64_t l = 0; l < nl; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const scalar_t* value_l = value + (b * s.num_keys + starts[l]) * nh * d + head * d;
          for (int64_t p = 0; p < np; ++p) {
            const int64_t idx = point_base + l * np + p;
            const acc_t x = static_cast<acc_t>(locations[2 * idx]) * w - acc_t(0.5);
            const acc_t y = static_cast<acc_t>(locations[2 * idx + 1]) * h - acc_t(0.5);
            if (!bilinear_corners<acc_t>(x, y, h, w, corners)) {
              continue;
            }
            const acc_t attn = static_cast<acc_t>(weights[idx]);
            for (int k = 0; k < corners.count; ++k) {
              const acc_t cw = attn * corners.weight[k];
              const scalar_t* v = value_l + corners.offset[k] * nh * d;
              for (int64_t c = 0; c < d; ++c) {
                acc[c] += cw * static_cast<acc_t>(v[c]);
              }
            }
          }
        }
        scalar_t* out = output + (bq * nh + head) * d;
        for (int64_t c = 0; c < d; ++c) {
          out[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    }
  });
}

// Parallel over (batch, head): every task owns grad_value[b, :, head, :], so
// grad_value is written without races and summed in a fixed order (queries,
// levels, points, corners), hence bitwise reproducible.
template <typename scalar_t>
void backward_kernel(
    const scalar_t* grad_output,
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* starts,
    const scalar_t* locations,
    const scalar_t* weights,
    at::opmath_type<scalar_t>* grad_value,
    scalar_t* grad_locations,
    scalar_t* grad_weights,
    const MSDAShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nh = s.num_heads, d = s.head_dim, nl = s.num_levels, np = s.num_points;
  at::parallel_for(0, s.batch * nh, 1, [&](int64_t begin, int64_t end) {
    Corners<acc_t> corners;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / nh, head = bh % nh;
      for (int64_t q = 0; q < s.num_queries; ++q) {
        const int64_t bq = b * s.num_queries + q;
        const scalar_t* go = grad_output + (bq * nh + head) * d;
        const int64_t point_base = (bq * nh + head) * nl * np;
        for (int64_t l = 0; l < nl; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const int64_t key_base = (b * s.num_keys + starts[l]) * nh * d + head * d;
          for (int64_t p = 0; p < np; ++p) {
            const int64_t idx = point_base + l * np + p;
            const acc_t x = static_cast<acc_t>(locations[2 * idx]) * w - acc_t(0.5);
            const acc_t y = static_cast<acc_t>(locations[2 * idx + 1]) * h - acc_t(0.5);
            acc_t g_attn = 0, g_x = 0, g_y = 0;
            if (bilinear_corners<acc_t>(x, y, h, w, corners)) {
              const acc_t attn = static_cast<acc_t>(weights[idx]);
              for (int k = 0; k < corners.count; ++k) {
                const scalar_t* v = value + key_base + corners.offset[k] * nh * d;
                acc_t* gv = grad_value + key_base + corners.offset[k] * nh * d;
                const acc_t cw = attn * corners.weight[k];
                acc_t dot = 0;  // sum_c grad_output[c] * value_corner[c]
                for (int64_t c = 0; c < d; ++c) {
                  const acc_t g = static_cast<acc_t>(go[c]);
                  dot += g * static_cast<acc_t>(v[c]);
                  gv[c] += cw * g;
                }
                g_attn += corners.weight[k] * dot;
                g_x += corners.dweight_dx[k] * dot;
                g_y += corners.dweight_dy[k] * dot;
              }
              g_x *= attn * acc_t(w);
              g_y *= attn * acc_t(h);
            }
            grad_weights[idx] = static_cast<scalar_t>(g_attn);
            grad_locations[2 * idx] = static_cast<scalar_t>(g_x);
            grad_locations[2 * idx + 1] = static_cast<scalar_t>(g_y);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value_in,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations_in,
    const at::Tensor& attention_weights_in) {
  const MSDAShape s = check_ms_deform_attn_inputs(
      value_in, spatial_shapes, level_start_index, sampling_locations_in, attention_weights_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  at::Tensor output = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
        s);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_in,
    const at::Tensor& value_in,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations_in,
    const at::Tensor& attention_weights_in) {
  const MSDAShape s = check_ms_deform_attn_inputs(
      value_in, spatial_shapes, level_start_index, sampling_locations_in, attention_weights_in);
  check_ms_deform_attn_grad_output(grad_output_in, value_in, s);
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const auto acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_locations = at::zeros_like(locations);
  at::Tensor grad_weights = at::zeros_like(weights);
  if (grad_output.numel() > 0 && value.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(
        at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
          backward_kernel<scalar_t>(
              grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
              shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
              locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
              grad_value.data_ptr<at::opmath_type<scalar_t>>(),
              grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(), s);
        });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

TORCH_LIBRARY_IMPL(mmdet_deform, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace mmdet_deform
