// CPU kernel of multi-scale deformable attention, forward and backward.
//
// Sampling is F.grid_sample(bilinear, zeros, align_corners=False) per level:
// the pixel coordinate of a normalised x is x * w - 0.5, a bilinear corner
// outside the map contributes zero, and so does a non-finite location.
//
// Structure and speed
// -------------------
// For one (query, head), `prepare_points` computes the bilinear corners of
// all num_levels * num_points sampling points at once, in a loop over points
// written so that the compiler vectorises it (structure-of-arrays buffers,
// floor by truncation, int32 key indices), with a bit mask of the corners
// inside their map. The bilinear weights and offsets are therefore computed
// once per point and shared by all channels, and the buffers are sized once
// per task (no allocation per point). The channel loops then visit the
// corners inside and run over head_dim in blocks of 1, 2 or 4 32-byte vectors
// (GNU vector extensions) with the accumulators in registers, and a scalar
// tail.
//
// value rows are read through strides. When each value row is read several
// times (the encoder: one query per key), the kernels first copy value to a
// head-major (bs, num_heads, num_keys, head_dim) layout, so that the rows one
// head samples are contiguous: several times fewer cache misses for the
// price of one copy.
//
// The hot loops are compiled twice: for the baseline ISA that torch targets
// (x86-64 / SSE2, or the platform's default) and, on x86 with GCC or Clang,
// for AVX2+FMA through __attribute__((target)). The AVX2 clone runs when
// torch itself dispatches its own kernels to AVX2 or better
// (torch.backends.cpu.get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable) and the CPU reports avx2 and fma.
//
// Forward: at::parallel_for over (batch, query); each task writes its own
// output rows (heads outermost inside a task, for cache locality), so it is
// race-free and deterministic.
//
// Backward: grad_value[b, k, h, :] receives contributions from every query,
// so it is owned, not shared: at::parallel_for runs over (batch, head, query
// group) tasks, and a task only ever writes the grad_value slice of its
// (batch, head), in a fixed order (queries, levels, points, corners). With
// as many (batch, head) pairs as threads there is one query group and no
// extra buffer; with fewer (e.g. bs = 1, one head) the queries are split into
// G groups, group g > 0 accumulating into a private buffer that is added to
// grad_value afterwards in the fixed order g = 1, 2, ...; G depends only on
// the problem size and the thread count. No atomics are used, so the
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
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
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
#define MSDA_RESTRICT __restrict__
#define MSDA_HAVE_VECTOR_EXT 1
#else
#define MSDA_INLINE inline
#define MSDA_RESTRICT
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

// Per-task scratch: level constants of every point (fixed) and the corners of
// the points of the current (query, head). The
// n = num_levels * num_points points are in (level, point) order; corner c
// of point j is stored at c * n + j, c = 0..3 for (x0, y0), (x0 + 1, y0),
// (x0, y0 + 1), (x0 + 1, y0 + 1).
template <typename acc_t>
struct Workspace {
  int n;
  // level constants of point j
  std::vector<acc_t> width, height;
  std::vector<int32_t> iwidth, iheight, start;
  // the points of the current (query, head)
  std::vector<int32_t> key;   // key index of corner 0 (x0, y0)
  std::vector<int32_t> mask;  // bit c set if corner c is inside the map
  std::vector<acc_t> weight;  // 4 n: bilinear weight of each corner (times the attention weight in
                              // the forward)
  std::vector<acc_t> lx, ly;  // backward: fractional pixel position
  std::vector<acc_t> dot;     // backward, 4 n: <grad_output, value row> of each corner
  // bfloat16 only: locations, attention weights and their gradients in acc_t
  std::vector<acc_t> loc_acc, attn_acc, grad_loc_acc, grad_attn_acc;

  // The attention weights of the current (query, head) in acc_t (bfloat16:
  // widened by prepare_points).
  template <typename scalar_t>
  const acc_t* attention(const scalar_t* attn) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return attn;
    } else {
      return attn_acc.data();
    }
  }

  Workspace(int64_t num_levels, int64_t num_points, const int64_t* shapes, const int64_t* starts)
      : n(static_cast<int>(num_levels * num_points)) {
    const size_t n4 = 4 * static_cast<size_t>(n);
    width.resize(n);
    height.resize(n);
    iwidth.resize(n);
    iheight.resize(n);
    start.resize(n);
    key.resize(n);
    mask.resize(n);
    weight.resize(n4);
    lx.resize(n);
    ly.resize(n);
    dot.resize(n4);
    loc_acc.resize(2 * static_cast<size_t>(n));
    attn_acc.resize(n);
    grad_loc_acc.resize(2 * static_cast<size_t>(n));
    grad_attn_acc.resize(n);
    for (int64_t l = 0; l < num_levels; ++l) {
      for (int64_t p = 0; p < num_points; ++p) {
        const int64_t j = l * num_points + p;
        height[j] = static_cast<acc_t>(shapes[2 * l]);
        width[j] = static_cast<acc_t>(shapes[2 * l + 1]);
        iheight[j] = static_cast<int32_t>(shapes[2 * l]);
        iwidth[j] = static_cast<int32_t>(shapes[2 * l + 1]);
        start[j] = static_cast<int32_t>(starts[l]);
      }
    }
  }
};

// The loop of prepare_points. Every array is a restrict parameter: GCC keeps
// that aliasing information through inlining (not for restrict locals), and
// without it the loop would need too many run-time alias checks to vectorise.
// One pointer per corner, as with -fwrapv (Python's flags) the vectoriser
// cannot analyse weight[c * n + j].
template <bool kBackward, typename scalar_t, typename acc_t>
MSDA_INLINE void prepare_points_loop(
    int n,
    const scalar_t* MSDA_RESTRICT loc,
    const scalar_t* MSDA_RESTRICT attn,
    const acc_t* MSDA_RESTRICT width,
    const acc_t* MSDA_RESTRICT height,
    const int32_t* MSDA_RESTRICT iwidth,
    const int32_t* MSDA_RESTRICT iheight,
    const int32_t* MSDA_RESTRICT start,
    int32_t* MSDA_RESTRICT key,
    int32_t* MSDA_RESTRICT mask,
    acc_t* MSDA_RESTRICT weight0,
    acc_t* MSDA_RESTRICT weight1,
    acc_t* MSDA_RESTRICT weight2,
    acc_t* MSDA_RESTRICT weight3,
    acc_t* MSDA_RESTRICT lxs,
    acc_t* MSDA_RESTRICT lys) {
  for (int j = 0; j < n; ++j) {
    const acc_t w = width[j], h = height[j];
    acc_t x = to_acc(loc[2 * j]) * w - acc_t(0.5);
    acc_t y = to_acc(loc[2 * j + 1]) * h - acc_t(0.5);
    // No corner is inside unless -1 < x < w and -1 < y < h; the test is
    // false for NaN. Outside points continue at (-0.5, -0.5), which keeps the
    // integer conversion below in range; their mask is cleared.
    const int32_t inside = (x > acc_t(-1)) & (y > acc_t(-1)) & (x < w) & (y < h);
    x = inside ? x : acc_t(-0.5);
    y = inside ? y : acc_t(-0.5);
    // floor for x > -1: truncate, then step down if that rounded up
    const int32_t xt = static_cast<int32_t>(x), yt = static_cast<int32_t>(y);
    const int32_t x0 = xt - static_cast<int32_t>(x < static_cast<acc_t>(xt));
    const int32_t y0 = yt - static_cast<int32_t>(y < static_cast<acc_t>(yt));
    const acc_t lx = x - static_cast<acc_t>(x0), ly = y - static_cast<acc_t>(y0);
    const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    const acc_t a = kBackward ? acc_t(1) : to_acc(attn[j]);
    weight0[j] = a * (hy * hx);
    weight1[j] = a * (hy * lx);
    weight2[j] = a * (ly * hx);
    weight3[j] = a * (ly * lx);
    const int32_t x0_in = x0 >= 0, x1_in = x0 + 1 < iwidth[j];
    const int32_t y0_in = y0 >= 0, y1_in = y0 + 1 < iheight[j];
    const int32_t m = (x0_in & y0_in) | ((x1_in & y0_in) << 1) | ((x0_in & y1_in) << 2) |
        ((x1_in & y1_in) << 3);
    mask[j] = inside ? m : 0;
    key[j] = start[j] + y0 * iwidth[j] + x0;
    if constexpr (kBackward) {
      lxs[j] = lx;
      lys[j] = ly;
    }
  }
}

// Corners of the n points of one (query, head): `loc` and `attn` point at
// its (num_levels, num_points, [2]) entries. A loop over points without
// branches or calls, which the compiler vectorises.
template <bool kBackward, typename scalar_t, typename acc_t>
MSDA_INLINE void prepare_points(const scalar_t* loc, const scalar_t* attn, Workspace<acc_t>& ws) {
  const int n = ws.n;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    // bfloat16: widen first (two simple loops), so the main loop vectorises
    for (int i = 0; i < 2 * n; ++i) {
      ws.loc_acc[i] = to_acc(loc[i]);
    }
    for (int i = 0; i < n; ++i) {
      ws.attn_acc[i] = to_acc(attn[i]);
    }
    prepare_points<kBackward>(ws.loc_acc.data(), ws.attn_acc.data(), ws);
    return;
  }
  acc_t* weight = ws.weight.data();
  prepare_points_loop<kBackward>(
      n, loc, attn, ws.width.data(), ws.height.data(), ws.iwidth.data(), ws.iheight.data(),
      ws.start.data(), ws.key.data(), ws.mask.data(), weight, weight + n, weight + 2 * n,
      weight + 3 * n, ws.lx.data(), ws.ly.data());
}

template <int C>
using Corner = std::integral_constant<int, C>;

// Calls f(Corner<c>{}, j, offset) for every corner c of every point j that is
// inside its map, in (point, corner) order, offset being the element offset
// key * key_stride of the corner's row. The corner index is a compile-time
// constant in f.
template <typename acc_t, typename F>
MSDA_INLINE void for_each_corner(const Workspace<acc_t>& ws, int64_t key_stride, F&& f) {
  const int n = ws.n;
  const int32_t* MSDA_RESTRICT key = ws.key.data();
  const int32_t* MSDA_RESTRICT mask = ws.mask.data();
  const int32_t* MSDA_RESTRICT iwidth = ws.iwidth.data();
  for (int j = 0; j < n; ++j) {
    const int32_t m = mask[j];
    if (m == 0) {
      continue;
    }
    const int64_t row = key[j] * key_stride, down = iwidth[j] * key_stride;
    if (m & 1) {
      f(Corner<0>{}, j, row);
    }
    if (m & 2) {
      f(Corner<1>{}, j, row + key_stride);
    }
    if (m & 4) {
      f(Corner<2>{}, j, row + down);
    }
    if (m & 8) {
      f(Corner<3>{}, j, row + down + key_stride);
    }
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* value;
  int64_t value_strides[3];  // batch, key, head (channels are contiguous)
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  scalar_t* output;
  MSDAShape s;
};

// out[c] = sum over the corners k inside of weight_k * row_k[channel + c]
// for c < width (scalar loop, for the channels that do not fill a vector).
template <typename scalar_t, typename acc_t>
MSDA_INLINE void gather_scalar(
    const scalar_t* value,
    int64_t key_stride,
    const Workspace<acc_t>& ws,
    int64_t channel,
    int64_t width,
    scalar_t* out) {
  const acc_t* weight = ws.weight.data();
  const int n = ws.n;
  for (int64_t c0 = 0; c0 < width; c0 += kScalarBlock) {
    const int nc = static_cast<int>(std::min<int64_t>(kScalarBlock, width - c0));
    acc_t acc[kScalarBlock];
    for (int c = 0; c < nc; ++c) {
      acc[c] = acc_t(0);
    }
    for_each_corner(ws, key_stride, [&](auto corner, int j, int64_t offset) {
      const acc_t w = weight[decltype(corner)::value * n + j];
      const scalar_t* row = value + offset + channel + c0;
      for (int c = 0; c < nc; ++c) {
        acc[c] += w * to_acc(row[c]);
      }
    });
    for (int c = 0; c < nc; ++c) {
      out[c0 + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

#if MSDA_HAVE_VECTOR_EXT
// The same for kVecs full vectors of channels starting at `channel`, the
// accumulators held in registers: one set for the even corners and one for
// the odd ones, to hide the latency of the multiply-adds.
template <int kVecs, typename scalar_t, typename acc_t>
MSDA_INLINE void gather_vectors(
    const scalar_t* value,
    int64_t key_stride,
    const Workspace<acc_t>& ws,
    int64_t channel,
    scalar_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::kLanes;
  V acc[2][kVecs];
  for (int i = 0; i < kVecs; ++i) {
    acc[0][i] = V{};
    acc[1][i] = V{};
  }
  const acc_t* weight = ws.weight.data();
  const int n = ws.n;
  for_each_corner(ws, key_stride, [&](auto corner, int j, int64_t offset) {
    constexpr int c = decltype(corner)::value;
    const V w = V{} + weight[c * n + j];
    const scalar_t* row = value + offset + channel;
    for (int i = 0; i < kVecs; ++i) {
      acc[c & 1][i] += w * load_vec<V>(row + i * L);
    }
  });
  for (int i = 0; i < kVecs; ++i) {
    store_vec(out + i * L, acc[0][i] + acc[1][i]);
  }
}
#endif

// out[0:d) = sum over the corners k inside of weight_k * row_k[0:d).
template <typename scalar_t, typename acc_t>
MSDA_INLINE void gather_channels(
    const scalar_t* value,
    int64_t key_stride,
    const Workspace<acc_t>& ws,
    int64_t d,
    scalar_t* out) {
  int64_t c = 0;
#if MSDA_HAVE_VECTOR_EXT
  constexpr int L = Vec<acc_t>::kLanes;
  for (; c + 4 * L <= d; c += 4 * L) {
    gather_vectors<4>(value, key_stride, ws, c, out + c);
  }
  if (c + 2 * L <= d) {
    gather_vectors<2>(value, key_stride, ws, c, out + c);
    c += 2 * L;
  }
  if (c + L <= d) {
    gather_vectors<1>(value, key_stride, ws, c, out + c);
    c += L;
  }
#endif
  if (c < d) {
    gather_scalar(value, key_stride, ws, c, d - c, out + c);
  }
}

// Forward of the (batch, query) pairs [begin, end).
template <typename scalar_t>
MSDA_INLINE void forward_range_impl(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = acc_t_of<scalar_t>;
  const MSDAShape& s = a.s;
  const int64_t nh = s.num_heads, d = s.head_dim, nl = s.num_levels, np = s.num_points;
  Workspace<acc_t> ws(nl, np, a.shapes, a.starts);
  // Heads outermost: the value rows of one (batch, head) are re-read by
  // nearby queries while they are still in cache.
  for (int64_t head = 0; head < nh; ++head) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / s.num_queries;
      const int64_t point_base = (bq * nh + head) * nl * np;
      prepare_points<false>(a.locations + 2 * point_base, a.weights + point_base, ws);
      const scalar_t* value = a.value + b * a.value_strides[0] + head * a.value_strides[2];
      gather_channels(value, a.value_strides[1], ws, d, a.output + (bq * nh + head) * d);
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
  int64_t value_strides[3];  // batch, key, head; shared by grad_value
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  scalar_t* grad_locations;
  scalar_t* grad_weights;
  // grad_value accumulators in the layout of value, one per query group
  acc_t_of<scalar_t>* grad_value;
  int64_t group_stride;
  int64_t groups;
  MSDAShape s;
};

// For the channels [channel, channel + width) of the row of every corner
// (c, j) inside: dot[c][j] += <g, row> and grad_row += attn[j] * weight[c][j]
// * g, where g is grad_output of the (query, head) (scalar loop for the
// channels that do not fill a vector).
template <typename scalar_t, typename acc_t>
MSDA_INLINE void scatter_scalar(
    const scalar_t* value,
    acc_t* grad_value,
    int64_t key_stride,
    const scalar_t* grad_out,
    const acc_t* attn,
    Workspace<acc_t>& ws,
    int64_t channel,
    int64_t width) {
  const acc_t* weight = ws.weight.data();
  acc_t* dot = ws.dot.data();
  const int n = ws.n;
  for (int64_t c0 = 0; c0 < width; c0 += kScalarBlock) {
    const int nc = static_cast<int>(std::min<int64_t>(kScalarBlock, width - c0));
    acc_t g[kScalarBlock];
    for (int c = 0; c < nc; ++c) {
      g[c] = to_acc(grad_out[channel + c0 + c]);
    }
    for_each_corner(ws, key_stride, [&](auto corner, int j, int64_t offset) {
      const int slot = decltype(corner)::value * n + j;
      const acc_t cw = attn[j] * weight[slot];
      const scalar_t* row = value + offset + channel + c0;
      acc_t* grad_row = grad_value + offset + channel + c0;
      acc_t sum = 0;
      for (int c = 0; c < nc; ++c) {
        sum += g[c] * to_acc(row[c]);
        grad_row[c] += cw * g[c];
      }
      dot[slot] += sum;
    });
  }
}

#if MSDA_HAVE_VECTOR_EXT
// The same for kVecs full vectors of channels starting at `channel`; the dot
// product is reduced across lanes in a fixed order.
template <int kVecs, typename scalar_t, typename acc_t>
MSDA_INLINE void scatter_vectors(
    const scalar_t* value,
    acc_t* grad_value,
    int64_t key_stride,
    const scalar_t* grad_out,
    const acc_t* attn,
    Workspace<acc_t>& ws,
    int64_t channel) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::kLanes;
  V g[kVecs];
  for (int i = 0; i < kVecs; ++i) {
    g[i] = load_vec<V>(grad_out + channel + i * L);
  }
  const acc_t* weight = ws.weight.data();
  acc_t* dot = ws.dot.data();
  const int n = ws.n;
  for_each_corner(ws, key_stride, [&](auto corner, int j, int64_t offset) {
    const int slot = decltype(corner)::value * n + j;
    const V cw = V{} + attn[j] * weight[slot];
    const scalar_t* row = value + offset + channel;
    acc_t* grad_row = grad_value + offset + channel;
    V prod = g[0] * load_vec<V>(row);
    for (int i = 1; i < kVecs; ++i) {
      prod += g[i] * load_vec<V>(row + i * L);
    }
    for (int i = 0; i < kVecs; ++i) {
      V grad = load_vec<V>(grad_row + i * L);
      grad += cw * g[i];
      std::memcpy(grad_row + i * L, &grad, sizeof(V));
    }
    dot[slot] += hsum<acc_t>(prod);
  });
}
#endif

// Both over all head_dim channels.
template <typename scalar_t, typename acc_t>
MSDA_INLINE void scatter_channels(
    const scalar_t* value,
    acc_t* grad_value,
    int64_t key_stride,
    const scalar_t* grad_out,
    const acc_t* attn,
    Workspace<acc_t>& ws,
    int64_t d) {
  int64_t c = 0;
#if MSDA_HAVE_VECTOR_EXT
  constexpr int L = Vec<acc_t>::kLanes;
  for (; c + 4 * L <= d; c += 4 * L) {
    scatter_vectors<4>(value, grad_value, key_stride, grad_out, attn, ws, c);
  }
  if (c + 2 * L <= d) {
    scatter_vectors<2>(value, grad_value, key_stride, grad_out, attn, ws, c);
    c += 2 * L;
  }
  if (c + L <= d) {
    scatter_vectors<1>(value, grad_value, key_stride, grad_out, attn, ws, c);
    c += L;
  }
#endif
  if (c < d) {
    scatter_scalar(value, grad_value, key_stride, grad_out, attn, ws, c, d - c);
  }
}

// Gradients of the locations and attention weights of the n points of one
// (query, head) from the corner dot products (zero for corners outside):
//   d out / d attn = sum_c w_c dot_c,
//   d out / d x = attn * width * (hy (dot_1 - dot_0) + ly (dot_3 - dot_2)),
//   d out / d y = attn * height * (hx (dot_2 - dot_0) + lx (dot_3 - dot_1)).
// A point with no corner inside gets exactly zero. (Restrict parameters, as
// in prepare_points_loop.)
template <typename scalar_t, typename acc_t>
MSDA_INLINE void point_gradients_loop(
    int n,
    const scalar_t* MSDA_RESTRICT attn,
    const acc_t* MSDA_RESTRICT dot0,
    const acc_t* MSDA_RESTRICT dot1,
    const acc_t* MSDA_RESTRICT dot2,
    const acc_t* MSDA_RESTRICT dot3,
    const acc_t* MSDA_RESTRICT lxs,
    const acc_t* MSDA_RESTRICT lys,
    const acc_t* MSDA_RESTRICT width,
    const acc_t* MSDA_RESTRICT height,
    const int32_t* MSDA_RESTRICT mask,
    scalar_t* MSDA_RESTRICT grad_loc,
    scalar_t* MSDA_RESTRICT grad_attn) {
  for (int j = 0; j < n; ++j) {
    const acc_t d0 = dot0[j], d1 = dot1[j], d2 = dot2[j], d3 = dot3[j];
    const acc_t lx = lxs[j], ly = lys[j];
    const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    // the dots of a point without corners inside are 0, and so is its
    // attention weight here (even if not finite): its gradients are exactly 0
    const acc_t a = mask[j] != 0 ? to_acc(attn[j]) : acc_t(0);
    grad_attn[j] = static_cast<scalar_t>(hy * (hx * d0 + lx * d1) + ly * (hx * d2 + lx * d3));
    grad_loc[2 * j] = static_cast<scalar_t>(a * width[j] * (hy * (d1 - d0) + ly * (d3 - d2)));
    grad_loc[2 * j + 1] = static_cast<scalar_t>(a * height[j] * (hx * (d2 - d0) + lx * (d3 - d1)));
  }
}

template <typename scalar_t, typename acc_t>
MSDA_INLINE void point_gradients(
    const scalar_t* attn,
    Workspace<acc_t>& ws,
    scalar_t* grad_loc,
    scalar_t* grad_attn) {
  const int n = ws.n;
  const acc_t* dot = ws.dot.data();
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    // bfloat16: compute in acc_t, then round
    point_gradients_loop(
        n, ws.attn_acc.data(), dot, dot + n, dot + 2 * n, dot + 3 * n, ws.lx.data(),
        ws.ly.data(), ws.width.data(), ws.height.data(), ws.mask.data(), ws.grad_loc_acc.data(),
        ws.grad_attn_acc.data());
    for (int i = 0; i < 2 * n; ++i) {
      grad_loc[i] = static_cast<scalar_t>(ws.grad_loc_acc[i]);
    }
    for (int i = 0; i < n; ++i) {
      grad_attn[i] = static_cast<scalar_t>(ws.grad_attn_acc[i]);
    }
  } else {
    point_gradients_loop(
        n, attn, dot, dot + n, dot + 2 * n, dot + 3 * n, ws.lx.data(), ws.ly.data(),
        ws.width.data(), ws.height.data(), ws.mask.data(), grad_loc, grad_attn);
  }
}

// Backward of the tasks [begin, end) over (batch, head, query group).
template <typename scalar_t>
MSDA_INLINE void backward_range_impl(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = acc_t_of<scalar_t>;
  const MSDAShape& s = a.s;
  const int64_t nh = s.num_heads, d = s.head_dim, nl = s.num_levels, np = s.num_points;
  const int64_t nq = s.num_queries, groups = a.groups;
  Workspace<acc_t> ws(nl, np, a.shapes, a.starts);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t group = task % groups;
    const int64_t bh = task / groups;
    const int64_t b = bh / nh, head = bh % nh;
    const int64_t base = b * a.value_strides[0] + head * a.value_strides[2];
    const scalar_t* value = a.value + base;
    acc_t* grad_value = a.grad_value + group * a.group_stride + base;
    const int64_t q_begin = nq * group / groups, q_end = nq * (group + 1) / groups;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t bq = b * nq + q;
      const int64_t point_base = (bq * nh + head) * nl * np;
      const scalar_t* loc = a.locations + 2 * point_base;
      const scalar_t* weights = a.weights + point_base;
      prepare_points<true>(loc, weights, ws);
      std::fill(ws.dot.begin(), ws.dot.end(), acc_t(0));
      scatter_channels(
          value, grad_value, a.value_strides[1], a.grad_output + (bq * nh + head) * d,
          ws.attention(weights), ws, d);
      point_gradients(weights, ws, a.grad_locations + 2 * point_base, a.grad_weights + point_base);
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
// ISA choice, layout, work split and dtype checks
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

// Whether to read value in a head-major copy: when every value row is read
// at least twice on average (num_queries * num_levels * num_points * 4
// corners per (batch, head) against num_keys rows), the copy costs less than
// the cache misses it saves; for a few hundred decoder queries it does not.
bool use_head_major(const MSDAShape& s) {
  return s.num_heads > 1 &&
      s.num_queries * s.num_levels * s.num_points * 4 >= 2 * std::max<int64_t>(1, s.num_keys);
}

// value as a (bs, num_keys, num_heads, head_dim) tensor with contiguous
// channels and, if `head_major`, contiguous rows per (batch, head).
at::Tensor value_layout(const at::Tensor& value, bool head_major) {
  if (head_major) {
    // (bs, nk, nh, d) -> (bs, nh, nk, d) in memory, viewed back as (bs, nk, nh, d)
    return value.transpose(1, 2).contiguous().transpose(1, 2);
  }
  return value.stride(3) == 1 ? value : value.contiguous();
}

// Minimum work (corner-channel multiply-adds) of one parallel task, so that
// small calls do not pay for waking threads.
constexpr int64_t kMinTaskWork = 1 << 15;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

void check_cpu_inputs(const at::Tensor& value, const MSDAShape& s) {
  const auto t = value.scalar_type();
  TORCH_CHECK_TYPE(
      t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
      "ms_deform_attn (CPU): value, sampling_locations and attention_weights must be float32, "
      "float64 or bfloat16, got ", t);
  // key indices and per-(query, head) point counts are 32-bit in the kernel
  TORCH_CHECK_VALUE(
      s.num_keys <= std::numeric_limits<int32_t>::max(),
      "ms_deform_attn (CPU): value has ", s.num_keys, " keys, at most 2^31 - 1 are supported");
  TORCH_CHECK_VALUE(
      s.num_levels * s.num_points <= std::numeric_limits<int32_t>::max() / 4,
      "ms_deform_attn (CPU): num_levels * num_points = ", s.num_levels * s.num_points,
      " is too large");
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
  check_cpu_inputs(value_in, s);
  at::Tensor output =
      at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value_in.options());
  if (output.numel() == 0 || s.num_levels * s.num_points == 0) {
    return output.zero_();
  }
  const at::Tensor value = value_layout(value_in, use_head_major(s));
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  const bool avx2 = use_avx2();
  MSDA_DISPATCH_CPU_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const ForwardArgs<scalar_t> args{
        value.const_data_ptr<scalar_t>(),
        {value.stride(0), value.stride(1), value.stride(2)},
        shapes.const_data_ptr<int64_t>(),
        starts.const_data_ptr<int64_t>(),
        locations.const_data_ptr<scalar_t>(),
        weights.const_data_ptr<scalar_t>(),
        output.mutable_data_ptr<scalar_t>(),
        s};
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
  check_cpu_inputs(value_in, s);
  const at::Tensor locations = sampling_locations_in.contiguous();
  const at::Tensor weights = attention_weights_in.contiguous();
  at::Tensor grad_locations = at::zeros_like(locations);
  at::Tensor grad_weights = at::zeros_like(weights);
  const int64_t pairs = s.batch * s.num_heads;
  if (grad_output_in.numel() == 0 || value_in.numel() == 0 ||
      s.num_levels * s.num_points == 0) {
    return {at::zeros(value_in.sizes(), value_in.options()), grad_locations, grad_weights};
  }
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  // grad_value is accumulated in the layout value is read in: contiguous
  // (bs, num_keys, num_heads, head_dim) or head-major
  const bool head_major = use_head_major(s);
  const at::Tensor value = head_major ? value_layout(value_in, true) : value_in.contiguous();
  // Split the queries of each (batch, head) into `groups` tasks only when
  // there are fewer (batch, head) pairs than threads.
  const int64_t threads = at::get_num_threads();
  const int64_t groups =
      std::max<int64_t>(1, std::min<int64_t>(s.num_queries, (threads + pairs - 1) / pairs));
  const auto acc_type = at::toOpMathType(value.scalar_type());
  // (groups, bs, nk, nh, d), or (groups, bs, nh, nk, d) when head-major
  at::Tensor grad_acc = at::zeros(
      {groups, s.batch, head_major ? s.num_heads : s.num_keys,
       head_major ? s.num_keys : s.num_heads, s.head_dim},
      value.options().dtype(acc_type));
  const bool avx2 = use_avx2();
  MSDA_DISPATCH_CPU_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = acc_t_of<scalar_t>;
    const BackwardArgs<scalar_t> args{
        grad_output.const_data_ptr<scalar_t>(),
        value.const_data_ptr<scalar_t>(),
        {value.stride(0), value.stride(1), value.stride(2)},
        shapes.const_data_ptr<int64_t>(),
        starts.const_data_ptr<int64_t>(),
        locations.const_data_ptr<scalar_t>(),
        weights.const_data_ptr<scalar_t>(),
        grad_locations.mutable_data_ptr<scalar_t>(),
        grad_weights.mutable_data_ptr<scalar_t>(),
        grad_acc.mutable_data_ptr<acc_t>(),
        grad_acc.stride(0),
        groups,
        s};
    const int64_t work_per_task =
        s.num_queries / groups * s.num_levels * s.num_points * 4 * s.head_dim;
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
  at::Tensor grad_sum = grad_acc[0];
  for (int64_t g = 1; g < groups; ++g) {  // fixed order: deterministic
    grad_sum.add_(grad_acc[g]);
  }
  if (head_major) {
    grad_sum = grad_sum.transpose(1, 2);  // (bs, nh, nk, d) -> (bs, nk, nh, d) view
  }
  if (!head_major && groups == 1 && grad_sum.scalar_type() == value.scalar_type()) {
    return {grad_acc.squeeze(0), grad_locations, grad_weights};
  }
  // one pass: back to (bs, nk, nh, d), in the dtype of value
  at::Tensor grad_value = at::empty(value_in.sizes(), value_in.options());
  grad_value.copy_(grad_sum);
  return {grad_value, grad_locations, grad_weights};
}

TORCH_LIBRARY_IMPL(mmdet_deform, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace mmdet_deform
