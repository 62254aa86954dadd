// CPU kernels of the counter-based dropout (mmdet_deform::dropout and
// mmdet_deform::_dropout_backward).
//
// ATen's CPU dropout draws its mask with bernoulli_, one element at a time
// from a single Mersenne-Twister stream (~10 ns per element on this
// machine's cores, serial): the deformable transformer's dropouts over the
// (tokens, 1024) FFN activations then cost more than its attention op.
// Here the keep bit of element i is a pure function of (seed, i): the
// splitmix64 finaliser of seed + (i / 2 + 1) * golden-ratio gives 64 random
// bits for the pair (2k, 2k + 1), the low 32 bits deciding element 2k and
// the high 32 bits element 2k + 1. Element i is kept when its 32 bits are
// >= round(p * 2^32), i.e. with probability 1 - p (to 2^-33). So the mask:
//
// * costs a few integer instructions per element and is drawn by all
//   threads at once (at::parallel_for over pairs);
// * does not depend on the thread count or the blocking (bitwise
//   reproducible), and is reproduced bit for bit by the Python reference
//   (mmdet_deform/ops/dropout.py, dropout_pytorch);
// * is saved as a bool tensor (1 byte per element; ATen's CPU dropout
//   keeps a float noise tensor) for the backward, which multiplies by it.
//
// Kept elements are multiplied by 1 / (1 - p) in the op-math type (float
// for float16/bfloat16), dropped ones by 0, so `out = x * mask * scale`.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace mmdet_deform {

namespace {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;
// Pairs of elements per block: the keep bits of a block are hashed into a
// small stack buffer first, then the multiply runs as a simple loop.
constexpr int64_t kBlockPairs = 512;
// Elements per parallel task (below this, one thread does all).
constexpr int64_t kGrainPairs = 16384;

// splitmix64's output function: 64 well-mixed bits of a 64-bit counter.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The 64 random bits of pair k (elements 2k and 2k + 1).
inline uint64_t pair_bits(uint64_t seed, int64_t k) {
  return splitmix64(seed + static_cast<uint64_t>(k + 1) * kGoldenGamma);
}

void check_p(double p) {
  TORCH_CHECK_VALUE(
      p >= 0.0 && p < 1.0, "mmdet_deform::dropout: p must be in [0, 1), got ", p);
}

void check_input(const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(
      input.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", input.device());
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), op, ": ", name,
      " must be a floating point tensor, got ", input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> dropout_cpu(
    const at::Tensor& input_in, double p, int64_t seed) {
  check_input(input_in, "mmdet_deform::dropout", "input");
  check_p(p);
  const at::Tensor input = input_in.contiguous();
  at::Tensor output = at::empty(input.sizes(), input.options());
  at::Tensor mask = at::empty(input.sizes(), input.options().dtype(at::kBool));
  const int64_t numel = input.numel();
  if (numel == 0) {
    return {output, mask};
  }
  // p < 1, so the threshold is at most 2^32 (every element dropped)
  const uint64_t threshold = static_cast<uint64_t>(std::llround(std::ldexp(p, 32)));
  const uint64_t seed_bits = static_cast<uint64_t>(seed);
  const double scale = 1.0 / (1.0 - p);
  const int64_t pairs = (numel + 1) / 2;
  bool* mask_ptr = mask.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdet_deform_dropout_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const opmath_t kept_scale = static_cast<opmath_t>(scale);
        const scalar_t* in_ptr = input.const_data_ptr<scalar_t>();
        scalar_t* out_ptr = output.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, pairs, kGrainPairs, [&](int64_t begin, int64_t end) {
          for (int64_t block = begin; block < end; block += kBlockPairs) {
            const int64_t block_end = std::min(end, block + kBlockPairs);
            const int64_t first = 2 * block;
            const int64_t last = std::min(numel, 2 * block_end);
            bool* keep = mask_ptr + first;
            if (last == 2 * block_end) {
              for (int64_t k = block; k < block_end; ++k) {
                const uint64_t bits = pair_bits(seed_bits, k);
                keep[2 * (k - block)] = (bits & 0xFFFFFFFFULL) >= threshold;
                keep[2 * (k - block) + 1] = (bits >> 32) >= threshold;
              }
            } else {  // the last pair of an odd numel has one element
              for (int64_t k = block; k < block_end; ++k) {
                const uint64_t bits = pair_bits(seed_bits, k);
                keep[2 * (k - block)] = (bits & 0xFFFFFFFFULL) >= threshold;
                if (2 * k + 1 < numel) {
                  keep[2 * (k - block) + 1] = (bits >> 32) >= threshold;
                }
              }
            }
            for (int64_t i = first; i < last; ++i) {
              const opmath_t factor = mask_ptr[i] ? kept_scale : opmath_t(0);
              out_ptr[i] = static_cast<scalar_t>(static_cast<opmath_t>(in_ptr[i]) * factor);
            }
          }
        });
      });
  return {output, mask};
}

at::Tensor dropout_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& mask_in, double scale) {
  check_input(grad_output_in, "mmdet_deform::_dropout_backward", "grad_output");
  TORCH_CHECK_TYPE(
      mask_in.scalar_type() == at::kBool,
      "mmdet_deform::_dropout_backward: mask must be bool, got ", mask_in.scalar_type());
  TORCH_CHECK_VALUE(
      mask_in.sizes() == grad_output_in.sizes(),
      "mmdet_deform::_dropout_backward: mask must have the shape of grad_output (",
      grad_output_in.sizes(), "), got ", mask_in.sizes());
  TORCH_CHECK(
      mask_in.device().is_cpu(),
      "mmdet_deform::_dropout_backward: mask must be a CPU tensor, got ", mask_in.device());
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor grad_input = at::empty(grad_output.sizes(), grad_output.options());
  const int64_t numel = grad_output.numel();
  const bool* mask_ptr = mask.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_output.scalar_type(), "mmdet_deform_dropout_backward_cpu",
      [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const opmath_t kept_scale = static_cast<opmath_t>(scale);
        const scalar_t* in_ptr = grad_output.const_data_ptr<scalar_t>();
        scalar_t* out_ptr = grad_input.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, numel, 2 * kGrainPairs, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const opmath_t factor = mask_ptr[i] ? kept_scale : opmath_t(0);
            out_ptr[i] = static_cast<scalar_t>(static_cast<opmath_t>(in_ptr[i]) * factor);
          }
        });
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_deform, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("_dropout_backward", &dropout_backward_cpu);
}

}  // namespace mmdet_deform
