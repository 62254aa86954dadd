// CUDA kernels of multi-scale deformable attention, forward and backward,
// and their host-side orchestration, templated on how a kernel is launched:
// ms_deform_attn_cuda.cu launches them on the GPU; the test harness in
// tests/test_ops/cuda_emulation/ runs this very source on the CPU with an
// emulated grid (threads, warp shuffles, atomics) and checks every vector
// access against the live allocations.
//
// The math is exactly that of the CPU kernel (cpu/ms_deform_attn_cpu.cpp):
// sampling is F.grid_sample(bilinear, zeros, align_corners=False) per level,
// the pixel coordinate of a normalised x is x * w - 0.5, a bilinear corner
// outside the map contributes zero, and a non-finite location contributes
// zero. Half types (float16, bfloat16) are loaded and stored in their own
// type and accumulated in float32 (at::opmath_type); float64 in float64.
//
// Work decomposition (forward and backward):
//   One *group* of G lanes handles one (batch, query, head) row and one chunk
//   of its head_dim channels; every lane owns V consecutive channels, loaded
//   and stored as one aligned vector (V * sizeof(scalar_t) <= 16 bytes, so
//   float4 for float32, 8 x half for float16/bfloat16, 2 x double), so a
//   group reads a head's channels of one key as one coalesced segment. G is
//   the smallest power of two >= head_dim / V, capped at 32, so a group never
//   straddles a warp; head_dim > 32 * V is split into chunks of 32 * V
//   channels handled by separate groups. Every lane computes the bilinear
//   corners and weights of a point once, for all of its channels.
//
// Backward:
//   * grad_sampling_locations / grad_attention_weights: every lane computes
//     its channels' share of the dot products <grad_output, value corner>,
//     and the group sums them with warp shuffles (__shfl_xor_sync, no shared
//     memory, no atomics); with several chunks, every chunk writes its
//     partial sums and a second kernel adds them in chunk order.
//   * grad_value, normal path: atomicAdd of attention * corner weight *
//     grad_output into a buffer of the accumulation type (float32 for the
//     half types, then cast), as float4/float2 vector atomics on sm_90+.
//   * grad_value, deterministic path (torch.use_deterministic_algorithms):
//     a gather formulation. Every (point, corner) contribution gets the key
//     of the value row (batch, key, head) it writes; a stable sort by key
//     groups the contributions of every row in their original order
//     (batch, query, head, level, point, corner, the order of the CPU
//     kernel), and one group per value row sums its contributions in that
//     fixed order, with no atomics, so grad_value is bitwise reproducible.
//     Cost: 4 * bs * num_queries * num_heads * num_levels * num_points
//     contributions, each with a key (int32, or int64 when there are more
//     than 2^31 value rows) and a coefficient (float32; float64 for float64
//     inputs), plus the sort's output keys and int64 permutation: about
//     24 bytes per contribution (0.7 GB at bs 8 with 7,144 queries, 8 heads,
//     4 levels and 4 points), and the time of a radix sort of that many keys.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../ms_deform_attn.h"

// Hook run on every vector access (pointer, bytes, required alignment): a
// no-op on the GPU; the CPU emulation checks bounds and alignment.
#ifndef MSDA_CHECK_ACCESS
#define MSDA_CHECK_ACCESS(ptr, bytes, alignment)
#endif

namespace mmdet_deform {
namespace msda_cuda {

constexpr int kBlock = 256;  // threads per block, a multiple of the warp size
constexpr int kWarp = 32;
constexpr int kMaxVecBytes = 16;

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// V consecutive elements loaded or stored as one aligned vector access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* __restrict__ ptr, acc_t (&out)[V]) {
  MSDA_CHECK_ACCESS(ptr, sizeof(Pack<scalar_t, V>), alignof(Pack<scalar_t, V>));
  const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(ptr);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    out[j] = static_cast<acc_t>(pack.v[j]);
  }
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ ptr, const acc_t (&in)[V]) {
  MSDA_CHECK_ACCESS(ptr, sizeof(Pack<scalar_t, V>), alignof(Pack<scalar_t, V>));
  Pack<scalar_t, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    pack.v[j] = static_cast<scalar_t>(in[j]);
  }
  *reinterpret_cast<Pack<scalar_t, V>*>(ptr) = pack;
}

__device__ __forceinline__ void atomic_add(float* ptr, float v) {
  atomicAdd(ptr, v);
}

__device__ __forceinline__ void atomic_add(double* ptr, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  // No native float64 atomicAdd before sm_60: compare-and-swap loop.
  unsigned long long int* address = reinterpret_cast<unsigned long long int*>(ptr);
  unsigned long long int old = *address;
  unsigned long long int assumed;
  do {
    assumed = old;
    old = atomicCAS(
        address, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
  } while (assumed != old);
#else
  atomicAdd(ptr, v);
#endif
}

// Adds V consecutive values to ptr[0..V) atomically (element-wise). The
// caller guarantees ptr is aligned to min(V * sizeof(acc_t), 16) bytes.
template <int V, typename acc_t>
__device__ __forceinline__ void atomic_add_pack(acc_t* ptr, const acc_t (&v)[V]) {
  MSDA_CHECK_ACCESS(ptr, V * sizeof(acc_t), std::min<size_t>(V * sizeof(acc_t), kMaxVecBytes));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<acc_t, float>::value && V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      atomicAdd(
          reinterpret_cast<float4*>(ptr + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
    }
  } else if constexpr (std::is_same<acc_t, float>::value && V == 2) {
    atomicAdd(reinterpret_cast<float2*>(ptr), make_float2(v[0], v[1]));
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      atomic_add(ptr + j, v[j]);
    }
  }
#else
#pragma unroll
  for (int j = 0; j < V; ++j) {
    atomic_add(ptr + j, v[j]);
  }
#endif
}

// Sum of v over the `group` lanes (a power of two <= 32, aligned within the
// warp) named by `mask`; every lane of the group gets the same sum.
template <typename T>
__device__ __forceinline__ T group_sum(T v, unsigned mask, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(mask, v, offset, group);
  }
  return v;
}

__device__ __forceinline__ float floor_acc(float x) {
  return floorf(x);
}

__device__ __forceinline__ double floor_acc(double x) {
  return floor(x);
}

// The bilinear corners of one sampling point. Corner k is (x0 + (k & 1),
// y0 + (k >> 1)), the order of the CPU kernel: (x0, y0), (x0 + 1, y0),
// (x0, y0 + 1), (x0 + 1, y0 + 1).
template <typename acc_t>
struct Bilinear {
  int64_t offset;  // y0 * w + x0, the key offset of corner 0 within its level
  int64_t w;
  acc_t lx, ly, hx, hy;
  unsigned mask;  // bit k set: corner k is inside the map

  __device__ __forceinline__ bool inside(int k) const {
    return (mask >> k) & 1u;
  }
  // Key offset of corner k within its level (only meaningful when inside).
  __device__ __forceinline__ int64_t corner_offset(int k) const {
    return offset + (k & 1) + ((k >> 1) ? w : 0);
  }
  __device__ __forceinline__ acc_t weight(int k) const {
    return ((k >> 1) ? ly : hy) * ((k & 1) ? lx : hx);
  }
  // d weight / d x and d weight / d y (in pixels).
  __device__ __forceinline__ acc_t dweight_dx(int k) const {
    const acc_t wy = (k >> 1) ? ly : hy;
    return (k & 1) ? wy : -wy;
  }
  __device__ __forceinline__ acc_t dweight_dy(int k) const {
    const acc_t wx = (k & 1) ? lx : hx;
    return (k >> 1) ? wx : -wx;
  }
};

// Fills `c` for the pixel coordinate (x, y) on an h x w map; returns false
// when no corner is inside (including non-finite coordinates: every
// comparison with NaN is false). Every corner is bounds-checked on its own,
// like the CPU kernel, so no rounding of x < w can lead to a read outside.
template <typename acc_t>
__device__ __forceinline__ bool bilinear_setup(
    acc_t x, acc_t y, int64_t h, int64_t w, Bilinear<acc_t>& c) {
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < acc_t(w) && y < acc_t(h))) {
    return false;
  }
  const acc_t x0f = floor_acc(x);
  const acc_t y0f = floor_acc(y);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  c.lx = x - x0f;
  c.ly = y - y0f;
  c.hx = acc_t(1) - c.lx;
  c.hy = acc_t(1) - c.ly;
  c.offset = y0 * w + x0;
  c.w = w;
  const bool x0_in = x0 >= 0 && x0 < w;
  const bool x1_in = x0 + 1 >= 0 && x0 + 1 < w;
  const bool y0_in = y0 >= 0 && y0 < h;
  const bool y1_in = y0 + 1 >= 0 && y0 + 1 < h;
  c.mask = static_cast<unsigned>(x0_in && y0_in) | (static_cast<unsigned>(x1_in && y0_in) << 1) |
           (static_cast<unsigned>(x0_in && y1_in) << 2) |
           (static_cast<unsigned>(x1_in && y1_in) << 3);
  return c.mask != 0;
}

// Sizes of a launch over `num_rows` rows of head_dim channels: one group of
// `group` lanes per (row, chunk), every lane owning V channels.
struct Geometry {
  int64_t num_keys;
  int64_t num_heads;
  int64_t head_dim;
  int64_t num_queries;
  int64_t num_levels;
  int64_t num_points;
  int64_t num_rows;    // (batch, query, head) rows, or (batch, key, head) rows
  int64_t num_vecs;    // head_dim / V
  int64_t num_chunks;  // ceil(num_vecs / group)
  int64_t num_threads;
  int group;  // power of two <= 32
  int group_shift;
};

// What one thread works on.
struct Slot {
  int64_t row;    // index of the (.., .., head) row
  int64_t chunk;  // chunk of the row's channels
  int64_t vec;    // index of the lane's V-vector within the row
  int lane;       // lane within the group
  bool valid;     // the whole group is in range (uniform over the group)
  bool active;    // the lane owns channels (vec < num_vecs)
};

__device__ __forceinline__ Slot thread_slot(const Geometry& g) {
  Slot s;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  s.valid = t < g.num_threads;  // num_threads is a multiple of group
  s.lane = static_cast<int>(t & (g.group - 1));
  const int64_t group_index = t >> g.group_shift;
  if (g.num_chunks == 1) {
    s.chunk = 0;
    s.row = group_index;
  } else {
    s.chunk = group_index % g.num_chunks;
    s.row = group_index / g.num_chunks;
  }
  s.vec = s.chunk * g.group + s.lane;
  s.active = s.valid && s.vec < g.num_vecs;
  return s;
}

// Shuffle mask of the lanes of this thread's group within its warp.
__device__ __forceinline__ unsigned group_mask(int group) {
  if (group == kWarp) {
    return 0xffffffffu;
  }
  const unsigned lane_in_warp = threadIdx.x & (kWarp - 1);
  return ((1u << group) - 1u) << (lane_in_warp & ~static_cast<unsigned>(group - 1));
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// output[b, q, head * D + c] = sum over levels, points, corners of
// attention * corner weight * value[b, corner key, head, c].
template <typename scalar_t, int V>
__global__ void forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    scalar_t* __restrict__ output,
    const Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Slot s = thread_slot(g);
  if (!s.active) {
    return;  // no shuffles in the forward: idle lanes may leave
  }
  const int64_t head = s.row % g.num_heads;
  const int64_t b = s.row / (g.num_queries * g.num_heads);
  const int64_t c0 = s.vec * V;
  const int64_t row_stride = g.num_heads * g.head_dim;  // between consecutive keys
  acc_t acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc[j] = acc_t(0);
  }
  for (int64_t l = 0; l < g.num_levels; ++l) {
    const int64_t h = shapes[2 * l];
    const int64_t w = shapes[2 * l + 1];
    const scalar_t* value_l =
        value + ((b * g.num_keys + starts[l]) * g.num_heads + head) * g.head_dim + c0;
    const int64_t point_base = (s.row * g.num_levels + l) * g.num_points;
    for (int64_t p = 0; p < g.num_points; ++p) {
      const int64_t idx = point_base + p;
      const acc_t x = static_cast<acc_t>(locations[2 * idx]) * acc_t(w) - acc_t(0.5);
      const acc_t y = static_cast<acc_t>(locations[2 * idx + 1]) * acc_t(h) - acc_t(0.5);
      Bilinear<acc_t> c;
      if (!bilinear_setup<acc_t>(x, y, h, w, c)) {
        continue;
      }
      const acc_t attn = static_cast<acc_t>(weights[idx]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (c.inside(k)) {
          acc_t v[V];
          load_pack<V>(value_l + c.corner_offset(k) * row_stride, v);
          const acc_t cw = attn * c.weight(k);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc[j] += cw * v[j];
          }
        }
      }
    }
  }
  store_pack<V>(output + s.row * g.head_dim + c0, acc);
}

// Gradients of sampling_locations and attention_weights (and, when
// kAtomicGradValue, grad_value by atomics). With one chunk per row the
// group's lane 0 writes the final gradients; with several, every chunk
// writes its partial sums to partial[(point, chunk, 3)] and
// reduce_chunks_kernel adds them.
template <typename scalar_t, int V, bool kAtomicGradValue>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    at::opmath_type<scalar_t>* __restrict__ grad_value,
    scalar_t* __restrict__ grad_locations,
    scalar_t* __restrict__ grad_weights,
    at::opmath_type<scalar_t>* __restrict__ partial,
    const Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Slot s = thread_slot(g);
  if (!s.valid) {
    return;  // the whole group leaves together
  }
  // Inactive lanes (vec >= num_vecs) stay: they take part in the shuffles
  // with zero contributions. Control flow below depends only on data shared
  // by the whole group, so the group's lanes reach every shuffle together.
  const unsigned mask = group_mask(g.group);
  const int64_t head = s.row % g.num_heads;
  const int64_t b = s.row / (g.num_queries * g.num_heads);
  const int64_t c0 = s.vec * V;
  const int64_t row_stride = g.num_heads * g.head_dim;
  acc_t go[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    go[j] = acc_t(0);
  }
  if (s.active) {
    load_pack<V>(grad_output + s.row * g.head_dim + c0, go);
  }
  for (int64_t l = 0; l < g.num_levels; ++l) {
    const int64_t h = shapes[2 * l];
    const int64_t w = shapes[2 * l + 1];
    const int64_t value_offset =
        ((b * g.num_keys + starts[l]) * g.num_heads + head) * g.head_dim + c0;
    const int64_t point_base = (s.row * g.num_levels + l) * g.num_points;
    for (int64_t p = 0; p < g.num_points; ++p) {
      const int64_t idx = point_base + p;
      const acc_t x = static_cast<acc_t>(locations[2 * idx]) * acc_t(w) - acc_t(0.5);
      const acc_t y = static_cast<acc_t>(locations[2 * idx + 1]) * acc_t(h) - acc_t(0.5);
      acc_t g_attn = 0, g_x = 0, g_y = 0;
      Bilinear<acc_t> c;
      if (bilinear_setup<acc_t>(x, y, h, w, c)) {  // uniform over the group
        const acc_t attn = static_cast<acc_t>(weights[idx]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.inside(k)) {
            acc_t dot = 0;  // this lane's share of <grad_output, value corner>
            if (s.active) {
              const int64_t offset = value_offset + c.corner_offset(k) * row_stride;
              acc_t v[V];
              load_pack<V>(value + offset, v);
#pragma unroll
              for (int j = 0; j < V; ++j) {
                dot += go[j] * v[j];
              }
              if constexpr (kAtomicGradValue) {
                const acc_t cw = attn * c.weight(k);
                acc_t add[V];
#pragma unroll
                for (int j = 0; j < V; ++j) {
                  add[j] = cw * go[j];
                }
                atomic_add_pack<V>(grad_value + offset, add);
              }
            }
            g_attn += c.weight(k) * dot;
            g_x += c.dweight_dx(k) * dot;
            g_y += c.dweight_dy(k) * dot;
          }
        }
        g_attn = group_sum(g_attn, mask, g.group);
        g_x = group_sum(g_x, mask, g.group) * (attn * acc_t(w));
        g_y = group_sum(g_y, mask, g.group) * (attn * acc_t(h));
      }
      if (s.lane == 0) {
        if (g.num_chunks == 1) {
          grad_weights[idx] = static_cast<scalar_t>(g_attn);
          grad_locations[2 * idx] = static_cast<scalar_t>(g_x);
          grad_locations[2 * idx + 1] = static_cast<scalar_t>(g_y);
        } else {
          acc_t* out = partial + (idx * g.num_chunks + s.chunk) * 3;
          out[0] = g_attn;
          out[1] = g_x;
          out[2] = g_y;
        }
      }
    }
  }
}

// Adds the per-chunk partial gradients of every point in chunk order.
template <typename scalar_t>
__global__ void reduce_chunks_kernel(
    const at::opmath_type<scalar_t>* __restrict__ partial,
    scalar_t* __restrict__ grad_locations,
    scalar_t* __restrict__ grad_weights,
    int64_t num_points,
    int64_t num_chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < num_points; idx += stride) {
    acc_t g_attn = 0, g_x = 0, g_y = 0;
    const acc_t* in = partial + idx * num_chunks * 3;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      g_attn += in[3 * chunk];
      g_x += in[3 * chunk + 1];
      g_y += in[3 * chunk + 2];
    }
    grad_weights[idx] = static_cast<scalar_t>(g_attn);
    grad_locations[2 * idx] = static_cast<scalar_t>(g_x);
    grad_locations[2 * idx + 1] = static_cast<scalar_t>(g_y);
  }
}

// Deterministic path, step 1: for contribution 4 * point + corner, the value
// row (batch, key, head) it adds to (num_value_rows when the corner is
// outside, which sorts last and belongs to no row) and its coefficient
// attention * corner weight (computed as in backward_kernel).
template <typename scalar_t, typename key_t>
__global__ void contribution_keys_kernel(
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    key_t* __restrict__ keys,
    at::opmath_type<scalar_t>* __restrict__ coefs,
    const Geometry g,
    int64_t num_points_total,
    int64_t num_value_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < num_points_total; idx += stride) {
    // idx = ((bq * num_heads + head) * num_levels + l) * num_points + p
    const int64_t l = (idx / g.num_points) % g.num_levels;
    const int64_t bqh = idx / (g.num_points * g.num_levels);
    const int64_t head = bqh % g.num_heads;
    const int64_t b = bqh / (g.num_queries * g.num_heads);
    const int64_t h = shapes[2 * l];
    const int64_t w = shapes[2 * l + 1];
    const acc_t x = static_cast<acc_t>(locations[2 * idx]) * acc_t(w) - acc_t(0.5);
    const acc_t y = static_cast<acc_t>(locations[2 * idx + 1]) * acc_t(h) - acc_t(0.5);
    Bilinear<acc_t> c;
    const bool any = bilinear_setup<acc_t>(x, y, h, w, c);
    const acc_t attn = static_cast<acc_t>(weights[idx]);
    const int64_t key_base = b * g.num_keys + starts[l];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool inside = any && c.inside(k);
      keys[4 * idx + k] = static_cast<key_t>(
          inside ? (key_base + c.corner_offset(k)) * g.num_heads + head : num_value_rows);
      coefs[4 * idx + k] = inside ? attn * c.weight(k) : acc_t(0);
    }
  }
}

// Deterministic path, step 3: grad_value of value row r (batch, key, head)
// is the sum, in sorted (original) order, of coefficient * grad_output row
// over the contributions segment_offsets[r] .. segment_offsets[r + 1] of
// the sorted order. No atomics: every row is written by one group.
template <typename scalar_t, int V>
__global__ void gather_grad_value_kernel(
    const scalar_t* __restrict__ grad_output,
    const int64_t* __restrict__ segment_offsets,
    const int64_t* __restrict__ order,
    const at::opmath_type<scalar_t>* __restrict__ coefs,
    scalar_t* __restrict__ grad_value,
    const Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Slot s = thread_slot(g);
  if (!s.active) {
    return;
  }
  const int64_t c0 = s.vec * V;
  // contribution = 4 * ((bqh * num_levels + l) * num_points + p) + corner
  const int64_t per_bqh = 4 * g.num_levels * g.num_points;
  acc_t acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc[j] = acc_t(0);
  }
  const int64_t end = segment_offsets[s.row + 1];
  for (int64_t i = segment_offsets[s.row]; i < end; ++i) {
    const int64_t contribution = order[i];
    const int64_t bqh = contribution / per_bqh;
    const acc_t cw = coefs[contribution];
    acc_t go[V];
    load_pack<V>(grad_output + bqh * g.head_dim + c0, go);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc[j] += cw * go[j];
    }
  }
  store_pack<V>(grad_value + s.row * g.head_dim + c0, acc);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

// The widest vector (channels per lane) that divides head_dim, fits in 16
// bytes, and for which every pointer in `ptrs` (elements of scalar_t) and
// `acc_ptrs` (elements of the accumulation type, needing
// min(V * size, 16)-byte alignment for vector atomics) is aligned.
template <typename scalar_t>
int pick_vec_width(
    int64_t head_dim,
    std::initializer_list<const void*> ptrs,
    std::initializer_list<const void*> acc_ptrs = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  int vec = kMaxVecBytes / static_cast<int>(sizeof(scalar_t));
  for (; vec > 1; vec /= 2) {
    bool ok = head_dim % vec == 0;
    for (const void* p : ptrs) {
      ok = ok && is_aligned(p, vec * static_cast<int64_t>(sizeof(scalar_t)));
    }
    const int64_t acc_bytes = std::min<int64_t>(vec * sizeof(acc_t), kMaxVecBytes);
    for (const void* p : acc_ptrs) {
      ok = ok && is_aligned(p, acc_bytes);
    }
    if (ok) {
      break;
    }
  }
  return vec;
}

// Calls f(std::integral_constant<int, V>) for vec == V, instantiating only
// the widths valid for scalar_t (V * sizeof(scalar_t) <= 16).
template <typename scalar_t, typename F>
void dispatch_vec_width(int vec, F&& f) {
  constexpr int kMax = kMaxVecBytes / static_cast<int>(sizeof(scalar_t));
  switch (vec) {
    case 8:
      if constexpr (kMax >= 8) {
        f(std::integral_constant<int, 8>{});
        return;
      }
      break;
    case 4:
      if constexpr (kMax >= 4) {
        f(std::integral_constant<int, 4>{});
        return;
      }
      break;
    case 2:
      if constexpr (kMax >= 2) {
        f(std::integral_constant<int, 2>{});
        return;
      }
      break;
    case 1:
      f(std::integral_constant<int, 1>{});
      return;
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "ms_deform_attn: unsupported vector width ", vec);
}

inline Geometry make_geometry(const MSDAShape& s, int64_t num_rows, int vec) {
  Geometry g;
  g.num_keys = s.num_keys;
  g.num_heads = s.num_heads;
  g.head_dim = s.head_dim;
  g.num_queries = s.num_queries;
  g.num_levels = s.num_levels;
  g.num_points = s.num_points;
  g.num_rows = num_rows;
  g.num_vecs = s.head_dim / vec;
  g.group = 1;
  g.group_shift = 0;
  while (g.group < kWarp && g.group < g.num_vecs) {
    g.group *= 2;
    ++g.group_shift;
  }
  g.num_chunks = (g.num_vecs + g.group - 1) / g.group;
  g.num_threads = num_rows * g.num_chunks * g.group;
  return g;
}

inline unsigned int num_blocks(int64_t num_threads) {
  const int64_t blocks = (num_threads + kBlock - 1) / kBlock;
  TORCH_CHECK(
      blocks <= std::numeric_limits<int32_t>::max(),
      "ms_deform_attn: the problem is too large for one CUDA launch (", num_threads,
      " threads)");
  return static_cast<unsigned int>(blocks);
}

// Blocks for a grid-stride loop over n items (a few waves are enough).
inline unsigned int num_blocks_strided(int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, 65535));
}


// ---------------------------------------------------------------------------
// Orchestration (inputs already validated and contiguous)
// ---------------------------------------------------------------------------
//
// `Launcher` runs a kernel: launch(kernel, num_blocks, args...) with kBlock
// threads per block, and checks the launch.

// grad_value without atomics (see the header of this file).
template <typename scalar_t, int V, typename Launcher>
void deterministic_grad_value(
    const Launcher& launch,
    const at::Tensor& grad_output,
    const at::Tensor& shapes,
    const at::Tensor& starts,
    const at::Tensor& locations,
    const at::Tensor& weights,
    at::Tensor& grad_value,
    const MSDAShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_points_total =
      s.batch * s.num_queries * s.num_heads * s.num_levels * s.num_points;
  const int64_t num_value_rows = s.batch * s.num_keys * s.num_heads;
  if (num_points_total == 0) {
    grad_value.zero_();
    return;
  }
  const Geometry point_geometry = make_geometry(s, s.batch * s.num_queries * s.num_heads, V);
  // int32 keys sort faster; the sentinel num_value_rows must fit too.
  const bool small_keys = num_value_rows < std::numeric_limits<int32_t>::max();
  const at::Tensor keys = at::empty(
      {4 * num_points_total}, grad_output.options().dtype(small_keys ? at::kInt : at::kLong));
  const auto acc_type = at::toOpMathType(grad_output.scalar_type());
  const at::Tensor coefs = at::empty({4 * num_points_total}, grad_output.options().dtype(acc_type));
  auto launch_keys = [&](auto key_tag) {
    using key_t = decltype(key_tag);
    launch(
        &contribution_keys_kernel<scalar_t, key_t>, num_blocks_strided(num_points_total),
        shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), locations.data_ptr<scalar_t>(),
        weights.data_ptr<scalar_t>(), keys.data_ptr<key_t>(), coefs.data_ptr<acc_t>(),
        point_geometry, num_points_total, num_value_rows);
  };
  if (small_keys) {
    launch_keys(int32_t{});
  } else {
    launch_keys(int64_t{});
  }
  // Stable: the contributions of one row keep their original order.
  at::Tensor sorted_keys, order;
  std::tie(sorted_keys, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // segment_offsets[r] = first position whose key >= r, r = 0 .. num_value_rows.
  const at::Tensor bounds = at::arange(num_value_rows + 1, keys.options());
  const at::Tensor segment_offsets = at::searchsorted(sorted_keys, bounds);
  const Geometry row_geometry = make_geometry(s, num_value_rows, V);
  if (row_geometry.num_threads > 0) {
    launch(
        &gather_grad_value_kernel<scalar_t, V>, num_blocks(row_geometry.num_threads),
        grad_output.data_ptr<scalar_t>(), segment_offsets.data_ptr<int64_t>(),
        order.data_ptr<int64_t>(), coefs.data_ptr<acc_t>(), grad_value.data_ptr<scalar_t>(),
        row_geometry);
  }
}

// Forward on validated, contiguous inputs; `s` from check_ms_deform_attn_inputs.
template <typename Launcher>
at::Tensor forward_impl(
    const Launcher& launch,
    const at::Tensor& value,
    const at::Tensor& shapes,
    const at::Tensor& starts,
    const at::Tensor& locations,
    const at::Tensor& weights,
    const MSDAShape& s) {
  at::Tensor output =
      at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        const int vec =
            pick_vec_width<scalar_t>(s.head_dim, {value.data_ptr(), output.data_ptr()});
        dispatch_vec_width<scalar_t>(vec, [&](auto vec_tag) {
          constexpr int V = decltype(vec_tag)::value;
          const Geometry g = make_geometry(s, s.batch * s.num_queries * s.num_heads, V);
          launch(
              &forward_kernel<scalar_t, V>, num_blocks(g.num_threads),
              value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
              starts.data_ptr<int64_t>(), locations.data_ptr<scalar_t>(),
              weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), g);
        });
      });
  return output;
}

// Backward on validated, contiguous inputs; `deterministic` picks the
// gather path for grad_value.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Launcher& launch,
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& shapes,
    const at::Tensor& starts,
    const at::Tensor& locations,
    const at::Tensor& weights,
    const MSDAShape& s,
    bool deterministic) {
  if (grad_output.numel() == 0 || value.numel() == 0) {
    return {at::zeros_like(value), at::zeros_like(locations), at::zeros_like(weights)};
  }
  const auto acc_type = at::toOpMathType(value.scalar_type());
  // Every point's gradients are written by the kernels: no zero-fill needed.
  at::Tensor grad_locations = at::empty_like(locations);
  at::Tensor grad_weights = at::empty_like(weights);
  // Normal path: atomics into a zeroed buffer of the accumulation type.
  // Deterministic path: every row written once, in value's own dtype.
  at::Tensor grad_value = deterministic ? at::empty_like(value)
                                        : at::zeros(value.sizes(), value.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int vec = deterministic
            ? pick_vec_width<scalar_t>(
                  s.head_dim,
                  {value.data_ptr(), grad_output.data_ptr(), grad_value.data_ptr()})
            : pick_vec_width<scalar_t>(
                  s.head_dim, {value.data_ptr(), grad_output.data_ptr()},
                  {grad_value.data_ptr()});
        dispatch_vec_width<scalar_t>(vec, [&](auto vec_tag) {
          constexpr int V = decltype(vec_tag)::value;
          const Geometry g = make_geometry(s, s.batch * s.num_queries * s.num_heads, V);
          const int64_t num_points_total = g.num_rows * s.num_levels * s.num_points;
          at::Tensor partial;
          if (g.num_chunks > 1) {
            partial = at::empty(
                {num_points_total, g.num_chunks, 3}, value.options().dtype(acc_type));
          }
          acc_t* partial_ptr = g.num_chunks > 1 ? partial.data_ptr<acc_t>() : nullptr;
          if (deterministic) {
            launch(
                &backward_kernel<scalar_t, V, false>, num_blocks(g.num_threads),
                grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                static_cast<acc_t*>(nullptr), grad_locations.data_ptr<scalar_t>(),
                grad_weights.data_ptr<scalar_t>(), partial_ptr, g);
            deterministic_grad_value<scalar_t, V>(
                launch, grad_output, shapes, starts, locations, weights, grad_value, s);
          } else {
            launch(
                &backward_kernel<scalar_t, V, true>, num_blocks(g.num_threads),
                grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                locations.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<scalar_t>(),
                grad_weights.data_ptr<scalar_t>(), partial_ptr, g);
          }
          if (g.num_chunks > 1 && num_points_total > 0) {
            launch(
                &reduce_chunks_kernel<scalar_t>, num_blocks_strided(num_points_total),
                static_cast<const acc_t*>(partial_ptr), grad_locations.data_ptr<scalar_t>(),
                grad_weights.data_ptr<scalar_t>(), num_points_total, g.num_chunks);
          }
        });
      });
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace msda_cuda
}  // namespace mmdet_deform
