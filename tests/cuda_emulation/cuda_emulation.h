// Runs the CUDA kernels of csrc/cuda on the CPU, where host sanitizers can watch every global and
// shared memory access. Pre-included in front of a .cu file compiled as C++:
//   g++ -x c++ -include tests/cuda_emulation/cuda_emulation.h -I csrc -I <cuda>/include file.cu
//
// A launch runs its blocks one after another. The threads of a block are fibers (ucontext) on the
// launching OS thread, switched only where a thread must wait (__syncthreads, warp shuffles), so a
// run is deterministic and a __shared__ variable can be a function static: one instance that the
// block's threads share and every block reuses. With CUDA_EMULATION_ORDER=reversed in the
// environment, blocks run last to first and a block's threads are resumed last to first: results
// that must not depend on which block finishes last can be compared across the two orders.
//
// Errors the GPU leaves undefined abort here, naming kernel, block and thread: a shuffle whose
// mask is not the full warp, that names an exited lane, or that lanes reach from different call
// sites (a shuffle in a divergent branch); a block where no thread can go on (a barrier or a
// shuffle some thread never reaches); a misaligned __ldg/__ldcg, which traps on the GPU.
//
// Sanitizers: ASan is told of every stack switch. Under TSan each thread is its own fiber, switched
// without implied ordering: only __syncthreads orders a block's threads (and a launch orders what
// comes before and after it), so shared-memory accesses no barrier separates are reported as races.
// Shuffles exchange values but, as on the GPU, order no memory.
#pragma once

// The CUDA headers keep a definition of __shared__ they find; in host mode the others are empty.
#define __shared__ static
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

#define __launch_bounds__(...)

// The layer's own bookkeeping is shared by a block's fibers in ways TSan cannot see as ordered;
// leaving it uninstrumented keeps the reports to the kernels' own accesses.
#define CUDA_EMULATION_UNWATCHED __attribute__((noinline, no_sanitize("thread")))

namespace cuda_emulation {

constexpr int kWarpLanes = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kMaxBlockThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // kernels' frames are small; ASan's redzones are not

enum class Wait { kNone, kBarrier, kShuffle, kExited };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
  char name[32] = {};
  uint3 index{};
  int rank = 0;  // linear thread index; warps are 32 consecutive ranks
  Wait wait = Wait::kNone;
};

// The lanes of a warp meeting at a shuffle: what each sent, whose value it reads, where it called.
struct Warp {
  unsigned arrived = 0, exited = 0;
  uint64_t sent[kWarpLanes], received[kWarpLanes];
  int source[kWarpLanes];
  const void* site[kWarpLanes];
};

struct Emulator {
  const char* kernel = nullptr;
  dim3 grid_dim, block_dim;
  uint3 block_index{};
  void (*run_thread)(const void*) = nullptr;
  const void* launch = nullptr;
  cudaError_t last_error = cudaSuccess;

  Fiber fibers[kMaxBlockThreads];
  int fibers_made = 0;
  Warp warps[kMaxBlockThreads / kWarpLanes];
  int threads = 0, live = 0, barrier_arrivals = 0;
  unsigned barrier_generation = 0;
  Fiber* current = nullptr;
  bool reversed = false;

  ucontext_t scheduler;
  void* scheduler_tsan_fiber = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_bytes = 0;

  // Addresses TSan orders through. Barriers alternate between two, so that a thread already at
  // the next barrier does not hand its later accesses to one still leaving the previous barrier.
  char barrier_token[2] = {}, start_token = 0, end_token = 0;
};

inline Emulator emulator;

#if defined(__SANITIZE_ADDRESS__)
inline void asan_start_switch(void** save, const void* bottom, size_t bytes) {
  __sanitizer_start_switch_fiber(save, bottom, bytes);
}
inline void asan_finish_switch(void* save, const void** bottom, size_t* bytes) {
  __sanitizer_finish_switch_fiber(save, bottom, bytes);
}
inline void asan_forget_frames(char* stack) { __asan_unpoison_memory_region(stack, kStackBytes); }
#else
inline void asan_start_switch(void**, const void*, size_t) {}
inline void asan_finish_switch(void*, const void**, size_t*) {}
inline void asan_forget_frames(char*) {}
#endif

#if defined(__SANITIZE_THREAD__)
inline void* tsan_current_fiber() { return __tsan_get_current_fiber(); }
inline void* tsan_new_fiber(const char* name) {
  void* fiber = __tsan_create_fiber(0);
  __tsan_set_fiber_name(fiber, name);
  return fiber;
}
inline void tsan_switch(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
inline void tsan_release(void* address) { __tsan_release(address); }
inline void tsan_acquire(void* address) { __tsan_acquire(address); }
#else
inline void* tsan_current_fiber() { return nullptr; }
inline void* tsan_new_fiber(const char*) { return nullptr; }
inline void tsan_switch(void*) {}
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif

// ---- diagnostics ----

CUDA_EMULATION_UNWATCHED inline void print_where() {
  const Emulator& e = emulator;
  std::fprintf(stderr, "cuda_emulation: kernel %s, block (%u,%u,%u)", e.kernel ? e.kernel : "?", e.block_index.x,
               e.block_index.y, e.block_index.z);
  if (e.current) {
    std::fprintf(stderr, ", thread (%u,%u,%u)", e.current->index.x, e.current->index.y, e.current->index.z);
  }
  std::fputs(": ", stderr);
}

[[noreturn]] CUDA_EMULATION_UNWATCHED inline void fail(const char* format, ...) {
  print_where();
  va_list arguments;
  va_start(arguments, format);
  std::vfprintf(stderr, format, arguments);
  va_end(arguments);
  std::fputc('\n', stderr);
  std::abort();
}

[[noreturn]] CUDA_EMULATION_UNWATCHED inline void report_deadlock() {
  const Emulator& e = emulator;
  print_where();
  std::fputs("no thread can go on: some thread never reaches a __syncthreads or a shuffle that others wait at.\n"
             "Lanes per warp (B: waits at __syncthreads, S: waits at a shuffle, x: exited):\n", stderr);
  for (int first = 0; first < e.threads; first += kWarpLanes) {
    char lanes[kWarpLanes + 1] = {};
    for (int lane = 0; lane < kWarpLanes && first + lane < e.threads; ++lane) {
      const Wait wait = e.fibers[first + lane].wait;
      lanes[lane] = wait == Wait::kBarrier ? 'B' : wait == Wait::kShuffle ? 'S' : wait == Wait::kExited ? 'x' : '?';
    }
    std::fprintf(stderr, "  warp %2d: %s\n", first / kWarpLanes, lanes);
  }
  std::abort();
}

// ---- fibers ----

CUDA_EMULATION_UNWATCHED inline void enter(Fiber& fiber) {
  Emulator& e = emulator;
  e.current = &fiber;
  asan_start_switch(&e.scheduler_fake_stack, fiber.stack, kStackBytes);
  tsan_switch(fiber.tsan_fiber);
  swapcontext(&e.scheduler, &fiber.context);
  asan_finish_switch(e.scheduler_fake_stack, nullptr, nullptr);
  e.current = nullptr;
}

// Back to the scheduler; a finished fiber is never resumed.
CUDA_EMULATION_UNWATCHED inline void leave(bool finished) {
  Emulator& e = emulator;
  Fiber& fiber = *e.current;
  asan_start_switch(finished ? nullptr : &fiber.asan_fake_stack, e.scheduler_stack_bottom, e.scheduler_stack_bytes);
  tsan_switch(e.scheduler_tsan_fiber);
  swapcontext(&fiber.context, &e.scheduler);
  asan_finish_switch(fiber.asan_fake_stack, &e.scheduler_stack_bottom, &e.scheduler_stack_bytes);
}

CUDA_EMULATION_UNWATCHED inline void complete_barrier() {
  Emulator& e = emulator;
  for (int t = 0; t < e.threads; ++t) {
    if (e.fibers[t].wait == Wait::kBarrier) e.fibers[t].wait = Wait::kNone;
  }
  e.barrier_arrivals = 0;
  ++e.barrier_generation;
}

CUDA_EMULATION_UNWATCHED inline void thread_exits() {
  Emulator& e = emulator;
  Fiber& fiber = *e.current;
  fiber.wait = Wait::kExited;
  --e.live;
  Warp& warp = e.warps[fiber.rank / kWarpLanes];
  warp.exited |= 1u << (fiber.rank % kWarpLanes);
  if (warp.arrived != 0) {
    fail("exits while lanes 0x%08x of its warp wait at a shuffle: a shuffle names an exited lane", warp.arrived);
  }
  if (e.barrier_arrivals > 0 && e.barrier_arrivals == e.live) complete_barrier();  // exited threads leave barriers
}

CUDA_EMULATION_UNWATCHED inline void fiber_main() {
  Emulator& e = emulator;
  asan_finish_switch(nullptr, &e.scheduler_stack_bottom, &e.scheduler_stack_bytes);
  tsan_acquire(&e.start_token);
  e.run_thread(e.launch);
  tsan_release(&e.end_token);
  thread_exits();
  leave(true);
}

CUDA_EMULATION_UNWATCHED inline void make_fibers(int count) {
  Emulator& e = emulator;
  const size_t page = 4096;
  for (; e.fibers_made < count; ++e.fibers_made) {
    Fiber& fiber = e.fibers[e.fibers_made];
    void* mapping = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(mapping, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    fiber.stack = static_cast<char*>(mapping) + page;
    std::snprintf(fiber.name, sizeof fiber.name, "GPU thread rank %d", e.fibers_made);
    fiber.tsan_fiber = tsan_new_fiber(fiber.name);
  }
}

CUDA_EMULATION_UNWATCHED inline void start_fiber(Fiber& fiber, int rank) {
  const Emulator& e = emulator;
  const unsigned x = e.block_dim.x, y = e.block_dim.y;
  fiber.rank = rank;
  fiber.index = make_uint3(rank % x, rank / x % y, rank / (x * y));
  fiber.wait = Wait::kNone;
  fiber.asan_fake_stack = nullptr;
  asan_forget_frames(fiber.stack);  // the previous block's finished frames left their redzones
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, fiber_main, 0);
  // makecontext has used the stack bounds; without them ASan's swapcontext hook leaves the shadow
  // of the fiber's live frames (their redzones) alone when the fiber resumes.
  fiber.context.uc_stack.ss_size = 0;
}

CUDA_EMULATION_UNWATCHED inline void run_block(int threads) {
  Emulator& e = emulator;
  e.threads = e.live = threads;
  e.barrier_arrivals = 0;
  for (Warp& warp : e.warps) warp.arrived = warp.exited = 0;
  for (int rank = 0; rank < threads; ++rank) start_fiber(e.fibers[rank], rank);
  tsan_release(&e.start_token);
  while (e.live > 0) {
    bool progressed = false;
    for (int step = 0; step < threads; ++step) {
      Fiber& fiber = e.fibers[e.reversed ? threads - 1 - step : step];
      if (fiber.wait != Wait::kNone) continue;
      enter(fiber);
      progressed = true;
    }
    if (!progressed) report_deadlock();
  }
  tsan_acquire(&e.end_token);
}

CUDA_EMULATION_UNWATCHED inline void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                                              void (*run_thread)(const void*), const void* launch) {
  Emulator& e = emulator;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads == 0 ||
      threads > kMaxBlockThreads || block.z > 64) {
    e.last_error = cudaErrorInvalidConfiguration;  // what the runtime reports; nothing runs
    return;
  }
  e.kernel = kernel;
  if (shared_bytes != 0) fail("dynamic shared memory (%zu bytes) is not emulated", shared_bytes);
  e.grid_dim = grid;
  e.block_dim = block;
  e.run_thread = run_thread;
  e.launch = launch;
  e.scheduler_tsan_fiber = tsan_current_fiber();
  const char* order = std::getenv("CUDA_EMULATION_ORDER");
  e.reversed = order != nullptr && std::strcmp(order, "reversed") == 0;
  make_fibers(static_cast<int>(threads));
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t step = 0; step < blocks; ++step) {
    const uint64_t block = e.reversed ? blocks - 1 - step : step;
    e.block_index = make_uint3(block % grid.x, block / grid.x % grid.y, block / (grid.x * grid.y));
    run_block(static_cast<int>(threads));
  }
  e.kernel = nullptr;
}

// ---- what kernels call ----

CUDA_EMULATION_UNWATCHED inline void block_barrier() {
  Emulator& e = emulator;
  char* token = &e.barrier_token[e.barrier_generation % 2];
  tsan_release(token);
  e.current->wait = Wait::kBarrier;
  if (++e.barrier_arrivals == e.live) {
    complete_barrier();
  } else {
    leave(false);
  }
  tsan_acquire(token);
}

CUDA_EMULATION_UNWATCHED inline void complete_shuffle(Warp& warp, int first_rank, const char* intrinsic) {
  Emulator& e = emulator;
  for (int lane = 1; lane < kWarpLanes; ++lane) {
    if (warp.site[lane] != warp.site[0]) {
      fail("%s: lanes of one warp reach shuffles at different call sites (lane 0 at %p, lane %d at %p): a shuffle "
           "in a divergent branch", intrinsic, warp.site[0], lane, warp.site[lane]);
    }
  }
  for (int lane = 0; lane < kWarpLanes; ++lane) {
    warp.received[lane] = warp.sent[warp.source[lane]];
    e.fibers[first_rank + lane].wait = Wait::kNone;
  }
  warp.arrived = 0;
}

CUDA_EMULATION_UNWATCHED inline uint64_t exchange(const char* intrinsic, unsigned mask, uint64_t bits, int source,
                                                  const void* site) {
  Emulator& e = emulator;
  Fiber& fiber = *e.current;
  const int lane = fiber.rank % kWarpLanes, first_rank = fiber.rank - lane;
  Warp& warp = e.warps[fiber.rank / kWarpLanes];
  if (mask != kFullWarp) fail("%s with mask 0x%08x: only full-warp shuffles are emulated", intrinsic, mask);
  if (first_rank + kWarpLanes > e.threads) fail("%s in a warp of fewer than 32 threads", intrinsic);
  if (warp.exited != 0) {
    fail("%s while lanes 0x%08x of the warp have exited: a shuffle names an exited lane", intrinsic, warp.exited);
  }
  warp.sent[lane] = bits;
  warp.source[lane] = source;
  warp.site[lane] = site;
  warp.arrived |= 1u << lane;
  fiber.wait = Wait::kShuffle;
  if (warp.arrived == kFullWarp) {
    complete_shuffle(warp, first_rank, intrinsic);
  } else {
    leave(false);
  }
  return warp.received[lane];
}

CUDA_EMULATION_UNWATCHED inline int lane() { return emulator.current->rank % kWarpLanes; }

// The lane whose value this lane reads, by the rules of shfl.sync: a source past the end of this
// lane's segment of `width` lanes gives the lane its own value.
CUDA_EMULATION_UNWATCHED inline int lane_to_read(int source, int width) {
  if (width < 1 || width > kWarpLanes || (width & (width - 1)) != 0) {
    fail("shuffle width %d is not a power of two <= 32", width);
  }
  const int segment_end = (lane() & ~(width - 1)) + width;
  return source >= segment_end ? lane() : source;
}

template <typename T>
CUDA_EMULATION_UNWATCHED T shuffle(const char* intrinsic, unsigned mask, T value, int source, const void* site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = exchange(intrinsic, mask, bits, source, site);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

CUDA_EMULATION_UNWATCHED inline void check_aligned(const char* intrinsic, const void* address, size_t alignment) {
  if (reinterpret_cast<uintptr_t>(address) % alignment != 0) {
    fail("%s of %zu-byte alignment at misaligned address %p (the GPU traps)", intrinsic, alignment, address);
  }
}

CUDA_EMULATION_UNWATCHED inline uint3 thread_index() { return emulator.current->index; }
CUDA_EMULATION_UNWATCHED inline uint3 block_index() { return emulator.block_index; }
CUDA_EMULATION_UNWATCHED inline dim3 block_dim() { return emulator.block_dim; }
CUDA_EMULATION_UNWATCHED inline dim3 grid_dim() { return emulator.grid_dim; }

// A launch: the kernel and its configuration, called with the kernel's arguments. Every thread
// gets its own copy of the arguments, as if read from the launch's parameter space.
template <typename... Params>
class Launch {
 public:
  Launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes)
      : name_(name), kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  template <typename... Args>
  void operator()(Args&&... arguments) const {
    const Bound bound{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(arguments)...)};
    run_grid(name_, grid_, block_, shared_bytes_, &run_thread, &bound);
  }

 private:
  struct Bound {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> arguments;
  };
  static void run_thread(const void* bound) {
    const Bound& launch = *static_cast<const Bound*>(bound);
    std::apply(launch.kernel, launch.arguments);
  }

  const char* name_;
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t shared_bytes_;
};

template <typename... Params>
Launch<Params...> launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                         cudaStream_t) {
  return Launch<Params...>(name, kernel, grid, block, shared_bytes);
}

}  // namespace cuda_emulation

#define EQUINORM_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::cuda_emulation::launch(#__VA_ARGS__, __VA_ARGS__, grid, block, shared_bytes, stream)

#define threadIdx (::cuda_emulation::thread_index())
#define blockIdx (::cuda_emulation::block_index())
#define blockDim (::cuda_emulation::block_dim())
#define gridDim (::cuda_emulation::grid_dim())

// The device's min/max, which host mode does not declare. Both operands must have one type: a
// mixed call, which the GPU resolves by conversion, is left to fail to compile here.
template <typename T>
std::enable_if_t<std::is_integral_v<T>, T> min(T a, T b) { return b < a ? b : a; }
template <typename T>
std::enable_if_t<std::is_integral_v<T>, T> max(T a, T b) { return a < b ? b : a; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

inline void __syncthreads() { cuda_emulation::block_barrier(); }
// Blocks run one after another, so every write is visible device-wide before the next block starts.
inline void __threadfence() {}

// Not inlined, so that the return address tells one call site (one shuffle instruction) from another.
template <typename T>
CUDA_EMULATION_UNWATCHED T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  using namespace cuda_emulation;
  const int source = lane_to_read(lane() + static_cast<int>(delta), width);
  return shuffle("__shfl_down_sync", mask, value, source, __builtin_return_address(0));
}
template <typename T>
CUDA_EMULATION_UNWATCHED T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  using namespace cuda_emulation;
  const int source = lane_to_read(lane() ^ lane_mask, width);
  return shuffle("__shfl_xor_sync", mask, value, source, __builtin_return_address(0));
}

// Read-only and cache-global loads: the GPU traps on a misaligned address.
namespace cuda_emulation {
template <typename T>
T aligned_load(const char* name, const T* address) {
  check_aligned(name, address, alignof(T));
  T value;
  std::memcpy(static_cast<void*>(&value), address, sizeof(T));
  return value;
}
}  // namespace cuda_emulation
template <typename T>
T __ldg(const T* address) { return cuda_emulation::aligned_load("__ldg", address); }
template <typename T>
T __ldcg(const T* address) { return cuda_emulation::aligned_load("__ldcg", address); }

// Integer atomics, relaxed like the GPU's: they order nothing else (that takes __threadfence).
template <typename T>
using IntegerOnly = std::enable_if_t<std::is_integral_v<T>, T>;
template <typename T>
IntegerOnly<T> atomicAdd(T* address, T value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }
template <typename T>
IntegerOnly<T> atomicSub(T* address, T value) { return __atomic_fetch_sub(address, value, __ATOMIC_RELAXED); }
template <typename T>
IntegerOnly<T> atomicExch(T* address, T value) { return __atomic_exchange_n(address, value, __ATOMIC_RELAXED); }
template <typename T>
IntegerOnly<T> atomicCAS(T* address, T expected, T desired) {
  __atomic_compare_exchange_n(address, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
template <typename T>
IntegerOnly<T> atomicMax(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
IntegerOnly<T> atomicMin(T* address, T value) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

// The runtime calls of the launchers. Work runs at launch, in stream order.
extern "C" {
inline cudaError_t cudaMemsetAsync(void* destination, int value, size_t bytes, cudaStream_t) {
  std::memset(destination, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = cuda_emulation::emulator.last_error;
  cuda_emulation::emulator.last_error = cudaSuccess;
  return error;
}
}
