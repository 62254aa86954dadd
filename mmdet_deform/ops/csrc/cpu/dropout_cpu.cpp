// CPU kernels of the counter-based dropout (mmdet_deform::dropout,
// mmdet_deform::relu_dropout = dropout(relu(x)) in one pass, and their
// backwards).
//
// ATen's CPU dropout draws its mask with bernoulli_, one element at a time
// from a single Mersenne-Twister stream (serial): the deformable
// transformer's dropouts over the (tokens, 1024) FFN activations then cost
// more than its attention op (docs/benchmarks.md, "Dropout (CPU)").
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
// relu_dropout, for the FFN's `dropout(relu(fc1(x)))`, saves no mask and no
// ReLU input: its backward passes the gradient where the output is > 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace mmdet_deform {

namespace {

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_DROPOUT_RESTRICT __restrict__
#else
#define MSDA_DROPOUT_RESTRICT
#endif

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

// out = f(x) * (keep ? scale : 0) for f = identity or ReLU (NaN stays NaN,
// as in torch.relu), writing the keep bits to mask_ptr when it is not null.
template <bool kRelu>
void masked_scale_forward(
    const at::Tensor& input, at::Tensor& output, bool* mask_ptr, double p, int64_t seed) {
  const int64_t numel = input.numel();
  if (numel == 0) {
    return;
  }
  // p < 1, so the threshold is at most 2^32 (every element dropped)
  const uint64_t threshold = static_cast<uint64_t>(std::llround(std::ldexp(p, 32)));
  const uint64_t seed_bits = static_cast<uint64_t>(seed);
  const double scale = 1.0 / (1.0 - p);
  const int64_t pairs = (numel + 1) / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "mmdet_deform_dropout_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const opmath_t kept_scale = static_cast<opmath_t>(scale);
        const scalar_t* in_ptr = input.const_data_ptr<scalar_t>();
        scalar_t* out_ptr = output.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, pairs, kGrainPairs, [&](int64_t begin, int64_t end) {
          // the factor (scale or 0) of every element of a block: the hash
          // loop fills it, then a branch-free float loop applies it
          opmath_t factor[2 * kBlockPairs];
          for (int64_t block = begin; block < end; block += kBlockPairs) {
            const int64_t block_end = std::min(end, block + kBlockPairs);
            const int64_t first = 2 * block;
            const int64_t count = std::min(numel, 2 * block_end) - first;
            for (int64_t k = block; k < block_end; ++k) {
              const uint64_t bits = pair_bits(seed_bits, k);
              factor[2 * (k - block)] =
                  (bits & 0xFFFFFFFFULL) >= threshold ? kept_scale : opmath_t(0);
              factor[2 * (k - block) + 1] = (bits >> 32) >= threshold ? kept_scale : opmath_t(0);
            }
            if (mask_ptr != nullptr) {
              bool* MSDA_DROPOUT_RESTRICT keep = mask_ptr + first;
              for (int64_t i = 0; i < count; ++i) {
                keep[i] = factor[i] != opmath_t(0);
              }
            }
            const scalar_t* MSDA_DROPOUT_RESTRICT in = in_ptr + first;
            scalar_t* MSDA_DROPOUT_RESTRICT out = out_ptr + first;
            for (int64_t i = 0; i < count; ++i) {
              opmath_t value = static_cast<opmath_t>(in[i]);
              if (kRelu) {
                // (value < 0 ? 0 : value): NaN stays NaN, as in torch.relu
                value = value < opmath_t(0) ? opmath_t(0) : value;
              }
              out[i] = static_cast<scalar_t>(value * factor[i]);
            }
          }
        });
      });
}

std::tuple<at::Tensor, at::Tensor> dropout_cpu(
    const at::Tensor& input_in, double p, int64_t seed) {
  check_input(input_in, "mmdet_deform::dropout", "input");
  check_p(p);
  const at::Tensor input = input_in.contiguous();
  at::Tensor output = at::empty(input.sizes(), input.options());
  at::Tensor mask = at::empty(input.sizes(), input.options().dtype(at::kBool));
  masked_scale_forward<false>(input, output, mask.mutable_data_ptr<bool>(), p, seed);
  return {output, mask};
}

// relu_dropout keeps no mask: its backward reads the keep-and-positive bits
// off the output (> 0 exactly where the input was > 0 and kept).
at::Tensor relu_dropout_cpu(const at::Tensor& input_in, double p, int64_t seed) {
  check_input(input_in, "mmdet_deform::relu_dropout", "input");
  check_p(p);
  const at::Tensor input = input_in.contiguous();
  at::Tensor output = at::empty(input.sizes(), input.options());
  masked_scale_forward<true>(input, output, nullptr, p, seed);
  return output;
}

// grad_input = grad_output * (gate ? scale : 0), the gate being the saved
// keep mask (dropout) or output > 0 (relu_dropout, whose output is > 0
// exactly where the input was > 0 and kept).
template <bool kGateIsOutput>
at::Tensor gated_backward(
    const at::Tensor& grad_output_in, const at::Tensor& gate_in, double scale, const char* op,
    const char* gate_name) {
  check_input(grad_output_in, op, "grad_output");
  TORCH_CHECK(
      gate_in.device().is_cpu(), op, ": ", gate_name, " must be a CPU tensor, got ",
      gate_in.device());
  const at::ScalarType gate_type = kGateIsOutput ? grad_output_in.scalar_type() : at::kBool;
  TORCH_CHECK_TYPE(
      gate_in.scalar_type() == gate_type, op, ": ", gate_name, " must be ", gate_type,
      kGateIsOutput ? " (the dtype of grad_output)" : "", ", got ", gate_in.scalar_type());
  TORCH_CHECK_VALUE(
      gate_in.sizes() == grad_output_in.sizes(), op, ": ", gate_name,
      " must have the shape of grad_output (", grad_output_in.sizes(), "), got ",
      gate_in.sizes());
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor gate = gate_in.contiguous();
  at::Tensor grad_input = at::empty(grad_output.sizes(), grad_output.options());
  const int64_t numel = grad_output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_output.scalar_type(), "mmdet_deform_dropout_backward_cpu",
      [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        using gate_t = std::conditional_t<kGateIsOutput, scalar_t, bool>;
        const opmath_t kept_scale = static_cast<opmath_t>(scale);
        const scalar_t* grad_ptr = grad_output.const_data_ptr<scalar_t>();
        const gate_t* gate_ptr = gate.const_data_ptr<gate_t>();
        scalar_t* result_ptr = grad_input.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, numel, 2 * kGrainPairs, [&](int64_t begin, int64_t end) {
          const scalar_t* MSDA_DROPOUT_RESTRICT grad = grad_ptr + begin;
          const gate_t* MSDA_DROPOUT_RESTRICT gates = gate_ptr + begin;
          scalar_t* MSDA_DROPOUT_RESTRICT result = result_ptr + begin;
          for (int64_t i = 0; i < end - begin; ++i) {
            // a multiply by 0 or 1 rather than a select: the loop vectorises
            bool passes;
            if constexpr (kGateIsOutput) {
              passes = static_cast<opmath_t>(gates[i]) > opmath_t(0);
            } else {
              passes = gates[i];
            }
            const opmath_t factor = static_cast<opmath_t>(passes) * kept_scale;
            result[i] = static_cast<scalar_t>(static_cast<opmath_t>(grad[i]) * factor);
          }
        });
      });
  return grad_input;
}

at::Tensor dropout_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& mask, double scale) {
  return gated_backward<false>(grad_output, mask, scale, "mmdet_deform::_dropout_backward", "mask");
}

at::Tensor relu_dropout_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& output, double scale) {
  return gated_backward<true>(
      grad_output, output, scale, "mmdet_deform::_relu_dropout_backward", "output");
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_deform, CPU, m) {
  m.impl("dropout", &dropout_cpu);
  m.impl("_dropout_backward", &dropout_backward_cpu);
  m.impl("relu_dropout", &relu_dropout_cpu);
  m.impl("_relu_dropout_backward", &relu_dropout_backward_cpu);
}

}  // namespace mmdet_deform
