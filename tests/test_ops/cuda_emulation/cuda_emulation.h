// A small CUDA emulator for running this package's CUDA kernel source on the
// CPU in tests, where no GPU is available.
//
// It provides what mmdet_deform/ops/csrc/cuda/ms_deform_attn_cuda.cuh uses:
// the __global__/__device__ qualifiers, threadIdx/blockIdx/blockDim/gridDim,
// __shfl_xor_sync, atomicAdd, and a launcher that runs every block with one
// std::thread per CUDA thread, so warp shuffles really exchange values
// between concurrently running lanes. It also checks what a GPU would not
// forgive or what compute-sanitizer would report:
//   * a shuffle whose calling lane is not in its mask, whose mask is not one
//     aligned group of `width` lanes, that the lanes of a group call with
//     different arguments, or that some lane of the mask never reaches
//     (deadlock, detected by a timeout);
//   * a vector access (MSDA_CHECK_ACCESS) that is misaligned or not inside
//     one live allocation;
//   * writes past the end of any allocation (guard bytes checked), and reads
//     of memory never written (fresh allocations and guards are filled with
//     0xff bytes, a NaN in every float type, so such reads poison results);
//   * a launch with zero blocks (invalid on a GPU).
// All tensors a test passes in are copied into checked allocations first;
// every allocation made while a CheckedAllocatorScope is alive is checked.
//
// Include this header before the kernel source, after the ATen headers.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace cuda_emulation {

struct Dim3 {
  unsigned int x = 0, y = 1, z = 1;
};

inline thread_local Dim3 thread_idx;
inline thread_local Dim3 block_idx;
inline Dim3 block_dim;
inline Dim3 grid_dim;

// ---------------------------------------------------------------------------
// Errors: the first one is kept; every waiting lane is released.
// ---------------------------------------------------------------------------
struct Aborted {};

inline std::atomic<bool> g_failed{false};
inline std::mutex g_error_mutex;
inline std::string g_first_error;

[[noreturn]] inline void fail(const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(g_error_mutex);
    if (g_first_error.empty()) {
      std::ostringstream out;
      out << message << " (block " << block_idx.x << ", thread " << thread_idx.x << ")";
      g_first_error = out.str();
    }
  }
  g_failed = true;
  throw Aborted{};
}

inline void reset_errors() {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_first_error.clear();
  g_failed = false;
}

inline void raise_if_failed() {
  if (g_failed) {
    std::string message;
    {
      std::lock_guard<std::mutex> lock(g_error_mutex);
      message = g_first_error;
    }
    reset_errors();
    throw std::runtime_error("CUDA emulation: " + message);
  }
}

// ---------------------------------------------------------------------------
// Checked allocations
// ---------------------------------------------------------------------------
constexpr std::size_t kGuardBytes = 256;
constexpr unsigned char kPoison = 0xff;  // NaN in float16/bfloat16/float32/float64

struct Registry {
  std::mutex mutex;
  std::map<std::uintptr_t, std::size_t> live;  // data pointer -> size in bytes
  std::vector<std::string> corruptions;        // guards found overwritten
};

inline Registry& registry() {
  static Registry r;
  return r;
}

inline bool guards_intact(const unsigned char* data, std::size_t size) {
  for (std::size_t i = 0; i < kGuardBytes; ++i) {
    if (data[-static_cast<std::ptrdiff_t>(kGuardBytes) + static_cast<std::ptrdiff_t>(i)] !=
            kPoison ||
        data[size + i] != kPoison) {
      return false;
    }
  }
  return true;
}

class CheckedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t n) override {
    const std::size_t total = ((n + 2 * kGuardBytes + 63) / 64) * 64;
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(64, total));
    TORCH_CHECK(base != nullptr, "CUDA emulation: out of memory");
    std::memset(base, kPoison, total);
    unsigned char* data = base + kGuardBytes;
    {
      std::lock_guard<std::mutex> lock(registry().mutex);
      registry().live[reinterpret_cast<std::uintptr_t>(data)] = n;
    }
    return {data, data, &CheckedAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &CheckedAllocator::deleter;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void deleter(void* ptr) {
    auto* data = static_cast<unsigned char*>(ptr);
    {
      std::lock_guard<std::mutex> lock(registry().mutex);
      auto it = registry().live.find(reinterpret_cast<std::uintptr_t>(data));
      if (it != registry().live.end()) {
        if (!guards_intact(data, it->second)) {
          registry().corruptions.push_back(
              "a write outside an allocation of " + std::to_string(it->second) +
              " bytes (found when it was freed)");
        }
        registry().live.erase(it);
      }
    }
    std::free(data - kGuardBytes);
  }
};

// Makes every CPU allocation a checked one while alive.
class CheckedAllocatorScope {
 public:
  CheckedAllocatorScope() : previous_(c10::GetCPUAllocator()) {
    c10::SetCPUAllocator(&allocator(), kPriority);
  }
  ~CheckedAllocatorScope() {
    c10::SetCPUAllocator(previous_, kPriority);
  }
  CheckedAllocatorScope(const CheckedAllocatorScope&) = delete;
  CheckedAllocatorScope& operator=(const CheckedAllocatorScope&) = delete;

  // Raises if a guard of a live or freed allocation was overwritten.
  static void check_guards() {
    std::vector<std::string> errors;
    {
      std::lock_guard<std::mutex> lock(registry().mutex);
      for (const auto& [address, size] : registry().live) {
        if (!guards_intact(reinterpret_cast<const unsigned char*>(address), size)) {
          errors.push_back(
              "a write outside a live allocation of " + std::to_string(size) + " bytes");
        }
      }
      errors.insert(errors.end(), registry().corruptions.begin(), registry().corruptions.end());
      registry().corruptions.clear();
    }
    if (!errors.empty()) {
      throw std::runtime_error("CUDA emulation: " + errors.front());
    }
  }

 private:
  static constexpr uint8_t kPriority = 200;
  static CheckedAllocator& allocator() {
    static CheckedAllocator a;
    return a;
  }
  c10::Allocator* previous_;
};

// MSDA_CHECK_ACCESS: a vector access of `bytes` at `ptr` needing `alignment`.
inline void check_access(const void* ptr, std::size_t bytes, std::size_t alignment) {
  const auto p = reinterpret_cast<std::uintptr_t>(ptr);
  if (alignment > 1 && p % alignment != 0) {
    fail("misaligned vector access of " + std::to_string(bytes) + " bytes (needs " +
         std::to_string(alignment) + "-byte alignment)");
  }
  std::lock_guard<std::mutex> lock(registry().mutex);
  auto it = registry().live.upper_bound(p);
  if (it == registry().live.begin()) {
    fail("vector access outside every allocation");
  }
  --it;
  if (p + bytes > it->first + it->second) {
    fail(
        "out-of-bounds vector access: " + std::to_string(bytes) + " bytes at offset " +
        std::to_string(p - it->first) + " of an allocation of " + std::to_string(it->second) +
        " bytes");
  }
}

// ---------------------------------------------------------------------------
// Blocks, warp shuffles
// ---------------------------------------------------------------------------
constexpr auto kDeadlockTimeout = std::chrono::seconds(60);

struct GroupBarrier {
  std::mutex mutex;
  std::condition_variable cv;
  int arrived = 0;
  std::uint64_t generation = 0;
};

struct ShuffleCall {
  unsigned mask;
  int lane_mask;
  int width;
  std::size_t size;
  bool operator==(const ShuffleCall& o) const {
    return mask == o.mask && lane_mask == o.lane_mask && width == o.width && size == o.size;
  }
};

struct BlockState {
  explicit BlockState(unsigned int threads)
      : barriers(threads), slots(threads), calls(threads) {}
  std::vector<GroupBarrier> barriers;  // indexed by the first lane of a group
  std::vector<std::array<unsigned char, 8>> slots;
  std::vector<ShuffleCall> calls;
};

inline thread_local BlockState* current_block = nullptr;

// Waits until `count` lanes have arrived at `b` (a reusable barrier).
inline void group_wait(GroupBarrier& b, int count) {
  std::unique_lock<std::mutex> lock(b.mutex);
  const std::uint64_t generation = b.generation;
  if (++b.arrived == count) {
    b.arrived = 0;
    ++b.generation;
    b.cv.notify_all();
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() + kDeadlockTimeout;
  while (b.generation == generation) {
    if (g_failed) {
      throw Aborted{};
    }
    if (std::chrono::steady_clock::now() > deadline) {
      lock.unlock();
      fail(
          "__shfl_xor_sync deadlock: only " + std::to_string(b.arrived) + " of " +
          std::to_string(count) + " lanes of the mask arrived");
    }
    b.cv.wait_for(lock, std::chrono::milliseconds(20));
  }
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  BlockState& block = *current_block;
  const unsigned tid = thread_idx.x;
  const unsigned lane = tid % 32;
  const unsigned warp_base = tid - lane;
  if (!((mask >> lane) & 1u)) {
    fail("__shfl_xor_sync called by a lane that is not in its mask");
  }
  const int count = std::popcount(mask);
  const int first = std::countr_zero(mask);
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0 || count != width ||
      first % width != 0 || (width < 32 && (mask >> first) != ((1u << width) - 1u))) {
    fail("__shfl_xor_sync mask is not one aligned group of `width` lanes");
  }
  if (lane_mask <= 0 || lane_mask >= width) {
    fail("__shfl_xor_sync lane mask outside the group");
  }
  const ShuffleCall call{mask, lane_mask, width, sizeof(T)};
  block.calls[tid] = call;
  std::memcpy(block.slots[tid].data(), &value, sizeof(T));
  GroupBarrier& barrier = block.barriers[warp_base + first];
  group_wait(barrier, count);
  for (int l = first; l < first + count; ++l) {
    if (!(block.calls[warp_base + l] == call)) {
      fail("the lanes of a shuffle group called __shfl_xor_sync with different arguments");
    }
  }
  T result;
  std::memcpy(&result, block.slots[warp_base + (lane ^ static_cast<unsigned>(lane_mask))].data(),
              sizeof(T));
  group_wait(barrier, count);  // nobody overwrites a slot before all have read
  return result;
}

// Runs kernel(args...) on a grid of `blocks` x `threads`, block after block,
// every block with one std::thread per CUDA thread.
struct Launcher {
  unsigned int threads_per_block;
  mutable int launches = 0;

  template <typename... KernelArgs, typename... Args>
  void operator()(void (*kernel)(KernelArgs...), unsigned int blocks, Args&&... args) const {
    ++launches;
    if (blocks == 0) {
      throw std::runtime_error("CUDA emulation: a launch with zero blocks (invalid on a GPU)");
    }
    const std::tuple<std::decay_t<KernelArgs>...> params(std::forward<Args>(args)...);
    reset_errors();
    grid_dim = Dim3{blocks, 1, 1};
    block_dim = Dim3{threads_per_block, 1, 1};
    for (unsigned int b = 0; b < blocks && !g_failed; ++b) {
      BlockState state(threads_per_block);
      std::vector<std::thread> workers;
      workers.reserve(threads_per_block);
      for (unsigned int t = 0; t < threads_per_block; ++t) {
        workers.emplace_back([&, b, t] {
          block_idx = Dim3{b, 0, 0};
          thread_idx = Dim3{t, 0, 0};
          current_block = &state;
          try {
            std::apply(kernel, params);
          } catch (const Aborted&) {
          } catch (const std::exception& e) {
            try {
              fail(std::string("exception in a kernel: ") + e.what());
            } catch (const Aborted&) {
            }
          }
        });
      }
      for (auto& w : workers) {
        w.join();
      }
    }
    raise_if_failed();
  }
};

}  // namespace cuda_emulation

// ---------------------------------------------------------------------------
// The CUDA names the kernel source uses
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define threadIdx (::cuda_emulation::thread_idx)
#define blockIdx (::cuda_emulation::block_idx)
#define blockDim (::cuda_emulation::block_dim)
#define gridDim (::cuda_emulation::grid_dim)
#define MSDA_CHECK_ACCESS(ptr, bytes, alignment) \
  ::cuda_emulation::check_access((ptr), (bytes), (alignment))

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width) {
  return ::cuda_emulation::shfl_xor(mask, value, lane_mask, width);
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value, std::memory_order_relaxed);
}

inline double atomicAdd(double* address, double value) {
  return std::atomic_ref<double>(*address).fetch_add(value, std::memory_order_relaxed);
}
