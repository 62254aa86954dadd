// CPU kernel of multi-scale deformable attention, forward and backward.
//
// Sampling is F.grid_sample(bilinear, zeros, align_corners=False) per level:
// the pixel coordinate of a normalised x is x * w - 0.5, a bilinear corner
// outside the map contributes zero, and so does a non-finite location.
//
// Layout and speed
// ----------------
// value is (bs, num_keys, num_heads, head_dim), so the head_dim channels of
// one bilinear corner are contiguous: every inner loop runs over a block of
// channels of compile-time width (kBlock, 128 bytes of accumulators) that the
// compiler unrolls and vectorises. The bilinear weights and corner offsets of
// all points of one (query, head) are computed once, into a small per-task
// buffer (no allocation per point), and shared by all channel blocks.
//
// The hot loops are compiled twice: for the baseline ISA that torch targets
// (x86-64 / SSE2, or whatever the platform's default is) and, on x86 with
// GCC or Clang, for AVX2+FMA through __attribute__((target)). The AVX2 clone
// runs when torch itself dispatches its own kernels to AVX2 or better
// (torch.backends.cpu.get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable) and the CPU reports avx2 and fma.
//
// Forward: at::parallel_for over (batch, query); each task writes its own
// output rows, so it is race-free and deterministic.
//
// Backward: grad_value[b, k, h, :] receives contributions from every query,
// so it is owned, not shared: at::parallel_for runs over (batch, head, query
// group) tasks, and a task only ever writes the grad_value slice of its
// (batch, head), in a fixed order (queries, levels, points, corners). With
// as many (batch, head) pairs as threads there is one query group and no
// extra memory; with fewer (e.g. bs = 1, one head) the queries are split into
// G groups, group g > 0 accumulating into a private float buffer that is
// added to grad_value afterwards in the fixed order g = 1, 2, ...; G depends
// only on the problem size and the thread count. No atomics are used, so the
// gradients are bitwise identical from run to run at a fixed thread count
// (and across thread counts whenever G = 1). grad_sampling_locations and
// grad_attention_weights of a point are written by the one task that owns it.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../ms_deform_attn.h"

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define MSDA_HAVE_AVX2_CLONE 1
#define MSDA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MSDA_HAVE_AVX2_CLONE 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_INLINE inline __attribute__((always_inline))
#define MSDA_HAVE_VECTOR_EXT 1
#else
#define MSDA_INLINE inline
#define MSDA_HAVE_VECTOR_EXT 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The 32-byte vectors below never cross a function boundary (everything is
// inlined into one clone), so the note that their ABI depends on -mavx is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mmdet_deform {

namespace {

// ---------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------

// Accumulation type: float for bfloat16, the type itself otherwise.
template <typename scalar_t>
struct AccType {
  using type = scalar_t;
};
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};
template <typename scalar_t>
using acc_t_of = typename AccType<scalar_t>::type;

MSDA_INLINE float to_acc(float v) {
  return v;
}
MSDA_INLINE double to_acc(double v) {
  return v;
}
// bfloat16 -> float is exact: the 16 bits are the high half of the float
// (written as a shift so that the compiler vectorises it).
MSDA_INLINE float to_acc(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Channels per step of the scalar (tail) loops.
constexpr int kScalarBlock = 32;

#if MSDA_HAVE_VECTOR_EXT
// 32 bytes of accumulators (8 floats or 4 doubles): one AVX2 register, two
// SSE2 / NEON registers on the baseline clone. GNU vector extensions give
// explicit, portable SIMD without ISA-specific intrinsics.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

// Loads kLanes consecutive elements (unaligned), converted to acc_t.
template <typename V>
MSDA_INLINE V load_vec(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
MSDA_INLINE V load_vec(const double* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
MSDA_INLINE V load_vec(const c10::BFloat16* p) {
  u16x8 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const u32x8 bits = __builtin_convertvector(raw, u32x8) << 16;
  V v;
  std::memcpy(&v, &bits, sizeof(V));
  return v;
}

// Stores the lanes of v, converted to scalar_t (bfloat16 rounds to nearest even).
template <typename scalar_t, typename V>
MSDA_INLINE void store_vec(scalar_t* p, const V& v) {
  if constexpr (sizeof(scalar_t) * 2 == sizeof(float) && sizeof(V) == 32) {
    float lanes[8];
    std::memcpy(lanes, &v, sizeof(lanes));
    for (int i = 0; i < 8; ++i) {
      p[i] = static_cast<scalar_t>(lanes[i]);
    }
  } else {
    std::memcpy(p, &v, sizeof(V));
  }
}

// Sum of the lanes in a fixed pairwise order.
template <typename acc_t, typename V>
MSDA_INLINE acc_t hsum(const V& v) {
  constexpr int kLanes = sizeof(V) / sizeof(acc_t);
  acc_t lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(V));
  for (int half = kLanes / 2; half >= 1; half /= 2) {
    for (int i = 0; i < half; ++i) {
      lanes[i] += lanes[i + half];
    }
  }
  return lanes[0];
}
#endif  // MSDA_HAVE_VECTOR_EXT

// ---------------------------------------------------------------------------
// Bilinear corners of the points of one (batch, query, head)
// ---------------------------------------------------------------------------

// The in-map corners of the sampling points of one (batch, query, head), in
// point-major order. Sized once per task (4 * num_levels * num_points).
template <typename acc_t>
struct CornerBuffer {
  std::vector<int64_t> offset;  // element offset of the corner's value row
  std::vector<acc_t> weight;    // bilinear weight (times the attention weight in the forward)
  std::vector<acc_t> dweight_dx;  // d weight / d x (pixel units), backward only
  std::vector<acc_t> dweight_dy;
  std::vector<int32_t> point;  // index of the corner's point in [0, L * P)
  std::vector<acc_t> dot;      // backward: <grad_output, value row> of the corner
  int count = 0;

  explicit CornerBuffer(int64_t num_points_total, bool backward) {
    const size_t n = static_cast<size_t>(4 * num_points_total);
    offset.resize(n);
    weight.resize(n);
    if (backward) {
      dweight_dx.resize(n);
      dweight_dy.resize(n);
      point.resize(n);
      dot.resize(n);
    }
  }
};

// Appends the in-map corners of every point of one (batch, query, head) to
// `buf`. `loc` and `attn` point at its (num_levels, num_points, [2]) entries;
// offsets are relative to value[b, 0, head, 0] (row stride num_heads *
// head_dim). In the forward (kBackward = false) the stored weight already
// includes the attention weight.
template <bool kBackward, typename scalar_t, typename acc_t>
MSDA_INLINE void collect_corners(
    const scalar_t* loc,
    const scalar_t* attn,
    const int64_t* shapes,
    const int64_t* starts,
    int64_t num_levels,
    int64_t num_points,
    int64_t row_stride,
    CornerBuffer<acc_t>& buf) {
  int n = 0;
  for (int64_t l = 0; l < num_levels; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    const acc_t wf = static_cast<acc_t>(w), hf = static_cast<acc_t>(h);
    const int64_t level_offset = starts[l] * row_stride;
    for (int64_t p = 0; p < num_points; ++p) {
      const int64_t j = l * num_points + p;
      const acc_t x = to_acc(loc[2 * j]) * wf - acc_t(0.5);
      const acc_t y = to_acc(loc[2 * j + 1]) * hf - acc_t(0.5);
      // No corner is inside unless -1 < x < w and -1 < y < h; the test is
      // false for NaN, and it bounds the integer conversion below.
      if (!(x > acc_t(-1) && y > acc_t(-1) && x < wf && y < hf)) {
        continue;
      }
      const acc_t x0f = std::floor(x), y0f = std::floor(y);
      const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
      const acc_t lx = x - x0f, ly = y - y0f;
      const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
      const acc_t a = kBackward ? acc_t(1) : to_acc(attn[j]);
      const int x0_in = x0 >= 0, x1_in = x0 + 1 < w;
      const int y0_in = y0 >= 0, y1_in = y0 + 1 < h;
      const int64_t row = level_offset + (y0 * w + x0) * row_stride;
      const int64_t down = w * row_stride;
      // Corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1), each
      // written to slot n and kept (n advanced) only if inside the map:
      // branch-free compaction.
      auto put = [&](int inside, int64_t offset, acc_t weight, acc_t dx, acc_t dy) {
        buf.offset[n] = offset;
        buf.weight[n] = a * weight;
        if constexpr (kBackward) {
          buf.dweight_dx[n] = dx;
          buf.dweight_dy[n] = dy;
          buf.point[n] = static_cast<int32_t>(j);
        }
        n += inside;
      };
      put(x0_in & y0_in, row, hy * hx, -hy, -hx);
      put(x1_in & y0_in, row + row_stride, hy * lx, hy, -lx);
      put(x0_in & y1_in, row + down, ly * hx, -ly, hx);
      put(x1_in & y1_in, row + down + row_stride, ly * lx, ly, lx);
    }
  }
  buf.count = n;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  scalar_t* output;
  MSDAShape s;
};

// out[c] = sum_k weight[k] * row_k[channel + c] for c < width (scalar loop,
// used for the channels that do not fill a vector).
template <typename scalar_t, typename acc_t>
MSDA_INLINE void gather_scalar(
    const scalar_t* value,
    const CornerBuffer<acc_t>& buf,
    int64_t channel,
    int64_t width,
    scalar_t* out) {
  for (int64_t c0 = 0; c0 < width; c0 += kScalarBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kScalarBlock, width - c0));
    acc_t acc[kScalarBlock];
    for (int c = 0; c < n; ++c) {
      acc[c] = acc_t(0);
    }
    for (int k = 0; k < buf.count; ++k) {
      const scalar_t* row = value + buf.offset[k] + channel + c0;
      const acc_t wk = buf.weight[k];
      for (int c = 0; c < n; ++c) {
        acc[c] += wk * to_acc(row[c]);
      }
    }
    for (int c = 0; c < n; ++c) {
      out[c0 + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

#if MSDA_HAVE_VECTOR_EXT
// The same for kVecs full vectors of channels starting at `channel`, the
// accumulators held in registers. Two corners are in flight at a time (two
// accumulator sets) to hide the latency of the multiply-adds.
template <int kVecs, typename scalar_t, typename acc_t>
MSDA_INLINE void gather_vectors(
    const scalar_t* value,
    const CornerBuffer<acc_t>& buf,
    int64_t channel,
    scalar_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::kLanes;
  V acc0[kVecs], acc1[kVecs];
  for (int i = 0; i < kVecs; ++i) {
    acc0[i] = V{};
    acc1[i] = V{};
  }
  const int64_t* offset = buf.offset.data();
  const acc_t* weight = buf.weight.data();
  const int count = buf.count;
  int k = 0;
  for (; k + 1 < count; k += 2) {
    const scalar_t* row0 = value + offset[k] + channel;
    const scalar_t* row1 = value + offset[k + 1] + channel;
    const V w0 = V{} + weight[k];
    const V w1 = V{} + weight[k + 1];
    for (int i = 0; i < kVecs; ++i) {
      acc0[i] += w0 * load_vec<V>(row0 + i * L);
      acc1[i] += w1 * load_vec<V>(row1 + i * L);
    }
  }
  if (k < count) {
    const scalar_t* row0 = value + offset[k] + channel;
    const V w0 = V{} + weight[k];
    for (int i = 0; i < kVecs; ++i) {
      acc0[i] += w0 * load_vec<V>(row0 + i * L);
    }
  }
  for (int i = 0; i < kVecs; ++i) {
    store_vec(out + i * L, acc0[i] + acc1[i]);
  }
}
#endif

// out[0:d) = sum_k weight[k] * row_k[0:d) over all head_dim channels.
template <typename scalar_t, typename acc_t>
MSDA_INLINE void gather_channels(
    const scalar_t* value,
    const CornerBuffer<acc_t>& buf,
    int64_t d,
    scalar_t* out) {
  int64_t c = 0;
#if MSDA_HAVE_VECTOR_EXT
  constexpr int L = Vec<acc_t>::kLanes;
  for (; c + 4 * L <= d; c += 4 * L) {
    gather_vectors<4>(value, buf, c, out + c);
  }
  if (c + 2 * L <= d) {
    gather_vectors<2>(value, buf, c, out + c);
    c += 2 * L;
  }
  if (c + L <= d) {
    gather_vectors<1>(value, buf, c, out + c);
    c += L;
  }
#endif
  if (c < d) {
    gather_scalar(value, buf, c, d - c, out + c);
  }
}

// Forward of the (batch, query) pairs [begin, end).
template <typename scalar_t>
MSDA_INLINE void forward_range_impl(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = acc_t_of<scalar_t>;
  const MSDAShape& s = a.s;
  const int64_t nh = s.num_heads, d = s.head_dim, nl = s.num_levels, np = s.num_points;
  CornerBuffer<acc_t> buf(nl * np, /*backward=*/false);
  // Head-major within the task: the value rows of one (batch, head) are
  // re-read by nearby queries while they are still in cache.
  for (int64_t head = 0; head < nh; ++head) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / s.num_queries;
      const int64_t point_base = (bq * nh + head) * nl * np;
      collect_corners<false>(
          a.locations + 2 * point_base, a.weights + point_base, a.shapes, a.starts, nl, np,
          nh * d, buf);
      const scalar_t* value = a.value + (b * s.num_keys * nh + head) * d;
      gather_channels(value, buf, d, a.output + (bq * nh + head) * d);
    }
  }
}

template <typename scalar_t>
void forward_range_baseline(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_range_impl(a, begin, end);
}

#if MSDA_HAVE_AVX2_CLONE
template <typename scalar_t>
MSDA_TARGET_AVX2 void forward_range_avx2(
    const ForwardArgs<scalar_t>& a,
    int64_t begin,
    int64_t end) {
  forward_range_impl(a, begin, end);
}
#endif

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_output;
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  scalar_t* grad_locations;
  scalar_t* grad_weights;
  // grad_value accumulators, (groups, bs, num_keys, num_heads, head_dim):
  // group 0 is grad_value itself (in the accumulation type), groups > 0 are
  // the private buffers of the extra query groups.
  acc_t_of<scalar_t>* grad_value;
  int64_t groups;
  MSDAShape s;
};

// For the channels [channel, channel + width) of every corner row k:
// dot[k] += <g, row_k> and grad_row_k += attn[point[k]] * weight[k] * g, where
// g is grad_output of the (query, head) (scalar loop for the channels that do
// not fill a vector).
template <typename scalar_t, typename acc_t>
MSDA_INLINE void scatter_scalar(
    const scalar_t* value,
    acc_t* grad_value,
    const scalar_t* grad_out,
    const acc_t* attn,
    CornerBuffer<acc_t>& buf,
    int64_t channel,
    int64_t width) {
  for (int64_t c0 = 0; c0 < width; c0 += kScalarBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kScalarBlock, width - c0));
    acc_t g[kScalarBlock];
    for (int c = 0; c < n; ++c) {
      g[c] = to_acc(grad_out[channel + c0 + c]);
    }
    for (int k = 0; k < buf.count; ++k) {
      const scalar_t* row = value + buf.offset[k] + channel + c0;
      acc_t* grad_row = grad_value + buf.offset[k] + channel + c0;
      const acc_t cw = attn[buf.point[k]] * buf.weight[k];
      acc_t dot = 0;
      for (int c = 0; c < n; ++c) {
        dot += g[c] * to_acc(row[c]);
        grad_row[c] += cw * g[c];
      }
      buf.dot[k] += dot;
    }
  }
}

#if MSDA_HAVE_VECTOR_EXT
// The same for kVecs full vectors of channels starting at `channel`; the dot
// product is reduced across lanes in a fixed order.
template <int kVecs, typename scalar_t, typename acc_t>
MSDA_INLINE void scatter_vectors(
    const scalar_t* value,
    acc_t* grad_value,
    const scalar_t* grad_out,
    const acc_t* attn,
    CornerBuffer<acc_t>& buf,
    int64_t channel) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::kLanes;
  V g[kVecs];
  for (int i = 0; i < kVecs; ++i) {
    g[i] = load_vec<V>(grad_out + channel + i * L);
  }
  for (int k = 0; k < buf.count; ++k) {
    const scalar_t* row = value + buf.offset[k] + channel;
    acc_t* grad_row = grad_value + buf.offset[k] + channel;
    const V cw = V{} + attn[buf.point[k]] * buf.weight[k];
    V prod = g[0] * load_vec<V>(row);
    for (int i = 1; i < kVecs; ++i) {
      prod += g[i] * load_vec<V>(row + i * L);
    }
    for (int i = 0; i < kVecs; ++i) {
      V grad = load_vec<V>(grad_row + i * L);
      grad += cw * g[i];
      std::memcpy(grad_row + i * L, &grad, sizeof(V));
    }
    buf.dot[k] += hsum<acc_t>(prod);
  }
}
#endif

// Both over all head_dim channels.
template <typename scalar_t, typename acc_t>
MSDA_INLINE void scatter_channels(
    const scalar_t* value,
    acc_t* grad_value,
    const scalar_t* grad_out,
    const acc_t* attn,
    CornerBuffer<acc_t>& buf,
    int64_t d) {
  int64_t c = 0;
#if MSDA_HAVE_VECTOR_EXT
  constexpr int L = Vec<acc_t>::kLanes;
  for (; c + 4 * L <= d; c += 4 * L) {
    scatter_vectors<4>(value, grad_value, grad_out, attn, buf, c);
  }
  if (c + 2 * L <= d) {
    scatter_vectors<2>(value, grad_value, grad_out, attn, buf, c);
    c += 2 * L;
  }
  if (c + L <= d) {
    scatter_vectors<1>(value, grad_value, grad_out, attn, buf, c);
    c += L;
  }
#endif
  if (c < d) {
    scatter_scalar(value, grad_value, grad_out, attn, buf, c, d - c);
  }
}

// Backward of the tasks [begin, end) over (batch, head, query group).
template <typename scalar_t>
MSDA_INLINE void backward_range_impl(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = acc_t_of<scalar_t>;
  const MSDAShape& s = a.s;
  const int64_t nh = s.num_heads, d = s.head_dim, nl = s.num_levels, np = s.num_points;
  const int64_t nq = s.num_queries, groups = a.groups;
  CornerBuffer<acc_t> buf(nl * np, /*backward=*/true);
  std::vector<acc_t> attn(static_cast<size_t>(nl * np));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t group = task % groups;
    const int64_t bh = task / groups;
    const int64_t b = bh / nh, head = bh % nh;
    const int64_t value_base = (b * s.num_keys * nh + head) * d;
    const scalar_t* value = a.value + value_base;
    acc_t* grad_value = a.grad_value + group * s.batch * s.num_keys * nh * d + value_base;
    const int64_t q_begin = nq * group / groups, q_end = nq * (group + 1) / groups;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t bq = b * nq + q;
      const int64_t point_base = (bq * nh + head) * nl * np;
      const scalar_t* loc = a.locations + 2 * point_base;
      const scalar_t* weights = a.weights + point_base;
      collect_corners<true>(loc, weights, a.shapes, a.starts, nl, np, nh * d, buf);
      for (int64_t j = 0; j < nl * np; ++j) {
        attn[j] = to_acc(weights[j]);
      }
      std::fill(buf.dot.begin(), buf.dot.begin() + buf.count, acc_t(0));
      const scalar_t* grad_out = a.grad_output + (bq * nh + head) * d;
      scatter_channels(value, grad_value, grad_out, attn.data(), buf, d);
      // d out / d attn = sum_k w_k dot_k; d out / d x = attn * w * sum_k dw_k/dx dot_k
      scalar_t* grad_loc = a.grad_locations + 2 * point_base;
      scalar_t* grad_weight = a.grad_weights + point_base;
      int k = 0;
      for (int64_t l = 0; l < nl; ++l) {
        const acc_t wf = static_cast<acc_t>(a.shapes[2 * l + 1]);
        const acc_t hf = static_cast<acc_t>(a.shapes[2 * l]);
        for (int64_t p = 0; p < np; ++p) {
          const int64_t j = l * np + p;
          acc_t g_attn = 0, g_x = 0, g_y = 0;
          for (; k < buf.count && buf.point[k] == j; ++k) {
            g_attn += buf.weight[k] * buf.dot[k];
            g_x += buf.dweight_dx[k] * buf.dot[k];
            g_y += buf.dweight_dy[k] * buf.dot[k];
          }
          grad_weight[j] = static_cast<scalar_t>(g_attn);
          grad_loc[2 * j] = static_cast<scalar_t>(g_x * attn[j] * wf);
          grad_loc[2 * j + 1] = static_cast<scalar_t>(g_y * attn[j] * hf);
        }
      }
    }
  }
}

template <typename scalar_t>
void backward_range_baseline(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  backward_range_impl(a, begin, end);
}

#if MSDA_HAVE_AVX2_CLONE
template <typename scalar_t>
MSDA_TARGET_AVX2 void backward_range_avx2(
    const BackwardArgs<scalar_t>& a,
    int64_t begin,
    int64_t end) {
  backward_range_impl(a, begin, end);
}
#endif

// ---------------------------------------------------------------------------
// ISA choice, work split and dtype checks
// ---------------------------------------------------------------------------

// Whether to run the AVX2+FMA clones: torch dispatches its own kernels to
// AVX2 or better (honouring ATEN_CPU_CAPABILITY) and the CPU has avx2 + fma.
bool use_avx2() {
#if MSDA_HAVE_AVX2_CLONE
  static const bool enabled = [] {
    const std::string capability = at::get_cpu_capability();
    const bool torch_avx2 = capability == "AVX2" || capability == "AVX512";
    return torch_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

// Minimum work (corner-channel multiply-adds) of one parallel task, so that
// small calls do not pay for waking threads.
constexpr int64_t kMinTaskWork = 1 << 15;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

void check_cpu_dtype(const at::Tensor& value) {
  const auto t = value.scalar_type();
  TORCH_CHECK_TYPE(
      t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
      "ms_deform_attn (CPU): value, sampling_locations and attention_weights must be float32, "
      "float64 or bfloat16, got ", t);
}

#define MSDA_DISPATCH_CPU_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(                                                            \
      TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                      AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)                 \
                          AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value_in,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations_in,
    const at::Tensor& attention_weights_in) {
  const MSDAShape s = check_ms_deform_attn_inputs(
      value_in, spatial_shapes, level_start_index, sampling_locations_in, attention_weights_in);
  check_cpu_dtype(value_in);
  at::Tensor output =
      at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value_in.options());
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const bool avx2 = use_avx2();
  MSDA_DISPATCH_CPU_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const ForwardArgs<scalar_t> args{
        value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
        starts.const_data_ptr<int64_t>(), locations.const_data_ptr<scalar_t>(),
        weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), s};
    const int64_t work = s.num_heads * s.num_levels * s.num_points * 4 * s.head_dim;
    at::parallel_for(0, s.batch * s.num_queries, grain_for(work), [&](int64_t begin, int64_t end) {
#if MSDA_HAVE_AVX2_CLONE
      if (avx2) {
        forward_range_avx2(args, begin, end);
        return;
      }
#endif
      forward_range_baseline(args, begin, end);
    });
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
  check_cpu_dtype(value_in);
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  at::Tensor grad_locations = at::zeros_like(locations);
  at::Tensor grad_weights = at::zeros_like(weights);
  const auto acc_type = at::toOpMathType(value.scalar_type());
  const int64_t pairs = s.batch * s.num_heads;
  if (grad_output.numel() == 0 || value.numel() == 0 || pairs == 0) {
    return {at::zeros_like(value), grad_locations, grad_weights};
  }
  // Split the queries of each (batch, head) into `groups` tasks only when
  // there are fewer (batch, head) pairs than threads.
  const int64_t threads = at::get_num_threads();
  const int64_t groups =
      std::max<int64_t>(1, std::min<int64_t>(s.num_queries, (threads + pairs - 1) / pairs));
  // (groups, bs, num_keys, num_heads, head_dim); group 0 becomes grad_value
  at::Tensor grad_value_acc = at::zeros({groups * value.numel()}, value.options().dtype(acc_type));
  const bool avx2 = use_avx2();
  MSDA_DISPATCH_CPU_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = acc_t_of<scalar_t>;
    const BackwardArgs<scalar_t> args{
        grad_output.const_data_ptr<scalar_t>(),
        value.const_data_ptr<scalar_t>(),
        shapes.const_data_ptr<int64_t>(),
        starts.const_data_ptr<int64_t>(),
        locations.const_data_ptr<scalar_t>(),
        weights.const_data_ptr<scalar_t>(),
        grad_locations.mutable_data_ptr<scalar_t>(),
        grad_weights.mutable_data_ptr<scalar_t>(),
        grad_value_acc.mutable_data_ptr<acc_t>(),
        groups,
        s};
    const int64_t work_per_task = s.num_queries / groups * s.num_levels * s.num_points * 4 *
        s.head_dim;
    at::parallel_for(0, pairs * groups, grain_for(work_per_task), [&](int64_t begin, int64_t end) {
#if MSDA_HAVE_AVX2_CLONE
      if (avx2) {
        backward_range_avx2(args, begin, end);
        return;
      }
#endif
      backward_range_baseline(args, begin, end);
    });
  });
  at::Tensor grad_value = grad_value_acc.narrow(0, 0, value.numel());
  for (int64_t g = 1; g < groups; ++g) {  // fixed order: deterministic
    grad_value.add_(grad_value_acc.narrow(0, g * value.numel(), value.numel()));
  }
  grad_value = grad_value.view(value.sizes());
  if (grad_value.scalar_type() != value.scalar_type()) {
    grad_value = grad_value.to(value.scalar_type());
  } else if (groups > 1) {
    grad_value = grad_value.clone();  // release the per-group buffers
  }
  return {grad_value, grad_locations, grad_weights};
}

TORCH_LIBRARY_IMPL(mmdet_deform, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace mmdet_deform
