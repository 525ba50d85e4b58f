// CPU emulation of the subset of CUDA that the decode kernel uses (its kernels in
// csrc/lora_mixture_decode_kernels.cuh, their launcher in csrc/lora_mixture_decode.cu).
//
// Why: CI has no GPU, yet the decode kernel is hand-written CUDA whose indexing,
// barriers and warp shuffles are the likeliest place for a bug. Built with the host
// compiler and -DPROPER_KERNELS_EMULATE (python/build_cuda.py --emulate), the *same*
// source runs on CPU tensors through the same host launch path (split planning,
// vector width choice, the PDL launch and its fallback), so tests compare it with
// the reference on awkward shapes without a GPU. Nothing of this is installed.
//
// Execution model. Blocks run one after another in launch order. The threads of a
// block are cooperative fibers on the calling OS thread (a register-saving stack
// switch in cuda_emu.cpp on x86-64, ucontext elsewhere): a thread runs
// until it reaches a barrier (__syncthreads, __syncwarp, or a warp shuffle, which is
// a warp barrier around a slot exchange) or returns, then the next runnable thread
// runs. So every thread finishes its whole phase before the threads after it start
// theirs: a read of shared memory that another thread has not yet written, because a
// barrier is missing, reads the poison the buffer was filled with (NaN) instead of
// racing silently. configure(reverse=true) runs the threads in the opposite order to
// expose the other direction of such a dependency.
//
// Faults are recorded, never aborted on, and reported by the binding as a Python
// exception: a block whose live threads all wait at barriers that cannot complete
// (deadlock, divergent barrier), threads of one warp meeting at different warp-level
// operations, a full-mask shuffle in a warp whose lanes exited early, a vector load
// that is not aligned to its size (a "misaligned address" fault on a GPU), a write
// past the end of the dynamic shared memory, and dynamic shared memory above the
// 48 KiB a launch gets without cudaFuncSetAttribute.
//
// Stream order and programmatic dependent launch (PDL). A launch does not run at
// once: it waits until the next operation on the stream. A plain launch (or a copy,
// or the end of the binding call) runs it first: stream order. A launch with the PDL
// attribute instead gets its first blocks resident and runs them up to
// griddepcontrol.wait (pk_emu_pdl_wait) *before* the pending launch runs, then lets
// them on, then runs its other blocks. That is the earliest a GPU may start a
// dependent whose primary triggers launch_dependents at its start (as the decode
// shrink does), so a dependent that reads the primary's output before its wait sees
// the old memory (the NaN-poisoned workspace) instead of the result.
// configure(pdl_early=false) runs launches in plain stream order.
//
// Not emulated: memory ordering between blocks (blocks never overlap here, the
// blocks of a cooperative launch interleave only at its grid barrier, and those of a
// PDL launch only at its wait), the real throughput, and anything the decode kernel
// does not use. The emulator's state is
// global: one emulated launch at a time per process (the binding keeps the GIL).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CUDART_VERSION 0

using std::max;
using std::min;

// ---- vector and element types ----------------------------------------------------

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };

// 16-bit floats as bits, converted by hand (round to nearest even, as the CUDA
// intrinsics): portable to any host compiler, no _Float16 needed.
struct __half { std::uint16_t bits; };
struct __nv_bfloat16 { std::uint16_t bits; };
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit element types");

inline float __half2float(__half h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  std::uint32_t man = h.bits & 0x3ffu;
  std::uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);  // inf, nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;  // zero
  } else {  // subnormal man * 2^-24: normalise
    std::uint32_t e = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --e;
    }
    u = sign | (e << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return __half{static_cast<std::uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (a >= 0x477ff000u) return __half{static_cast<std::uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (a >= 0x38800000u) {  // a normal half: round the mantissa at bit 13, rebias 127 -> 15
    const std::uint32_t m = a + 0xfffu + ((a >> 13) & 1u);
    return __half{static_cast<std::uint16_t>(sign | ((m - 0x38000000u) >> 13))};
  }
  if (a < 0x33000000u) return __half{sign};  // below half the smallest subnormal (2^-25): zero
  const std::uint32_t e = a >> 23;                    // 102 .. 112
  const std::uint32_t man = (a & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - e;               // to units of 2^-24
  std::uint32_t q = man >> shift;
  const std::uint32_t rem = man & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return __half{static_cast<std::uint16_t>(sign | q)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even, NaN stays NaN
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<std::uint16_t>(u >> 16)};
}

// ---- runtime types ---------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
typedef struct pk_emu_stream* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrCooperativeLaunch = 95,
};
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaLaunchAttributeID {
  cudaLaunchAttributeCooperative = 2,
  cudaLaunchAttributeProgrammaticStreamSerialization = 6,
};
union cudaLaunchAttributeValue {
  char pad[64];
  int cooperative;
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

#if defined(__x86_64__) && !defined(PK_EMU_USE_UCONTEXT)
#define PK_EMU_FAST_SWITCH 1
// csrc/emu/cuda_emu.cpp: saves the callee-saved registers, *save_sp = rsp, rsp = load_sp.
extern "C" void pk_emu_switch(void** save_sp, void* load_sp);
#endif

namespace pk_emu {

// The emulated device; python/build_cuda.py's emulator module exposes it as
// configure(...). Defaults: an H100 SXM (132 SMs, sm_90, so the PDL path is taken).
struct Config {
  int sms = 132;
  int cc_major = 9;
  bool reverse = false;       // run a block's threads last to first
  bool fail_pdl = false;      // make the programmatic-dependent launch fail (fallback path)
  bool capturing = false;     // report the stream as being captured into a graph
  bool pdl_early = true;      // run a PDL launch's first blocks up to their wait before the previous launch
  size_t max_dynamic_smem = 48 * 1024;
  size_t smem_per_sm = 228 * 1024;
  // Register-limited blocks per SM, which the emulation cannot compute: 2 is what the
  // decode kernels' __launch_bounds__(256, 2) give on a GPU.
  int blocks_per_sm = 2;
};
inline Config config;

// Bytes requested by a launch's global vector loads (load_vec in the decode kernel):
// weights (the read-only path) and activations apart, each as requested (every load
// counted) and unique (each address once). requested / unique is the re-read factor
// that L1/L2 must absorb; unique is what HBM has to deliver at least once.
struct Traffic {
  std::uint64_t requested = 0, unique = 0;
  std::unordered_set<std::uintptr_t> seen;  // load start addresses (one load size per launch)
  void add(std::uintptr_t addr, size_t bytes) {
    requested += bytes;
    if (seen.insert(addr).second) unique += bytes;
  }
};

struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t smem = 0;
  bool pdl = false;
  bool cooperative = false;
  long long early_blocks = 0;  // PDL: blocks run up to their wait before the primary ran
  Traffic weights, activations;
};
inline std::vector<LaunchRecord> launches;  // every launch since the last clear
inline LaunchRecord* running = nullptr;     // the launch being emulated
inline std::string fault;                   // first fault since the last take_fault()
inline cudaError_t last_error = cudaSuccess;

inline void record_fault(const std::string& msg) {
  if (fault.empty()) fault = msg;
}
inline std::string take_fault() {
  std::string f;
  f.swap(fault);
  return f;
}

struct Barrier {
  int expected = 0;
  int arrived = 0;
  std::uint64_t gen = 0;
  const char* site = nullptr;  // the operation the waiting threads are in
};

struct Fiber {
#ifdef PK_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  std::unique_ptr<char[]> stack;  // kStackBytes, left uninitialised: pages commit as used
  struct Block* block = nullptr;
  unsigned shuffles = 0;  // parity picks the shuffle slot bank
  dim3 thread_idx;
  int linear = 0, lane = 0, warp = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  std::uint64_t wait_gen = 0;
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<int> warp_live;
  std::vector<std::uint64_t> slot[2];  // one shuffle slot per thread, two banks
  std::vector<unsigned char> smem;  // dynamic shared memory + guard
  size_t smem_bytes = 0;
  const std::function<void()>* body = nullptr;
};

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kSmemGuard = 256;
constexpr unsigned char kPoison = 0xff;  // float NaN, int -1

inline thread_local Block* cur_block = nullptr;
inline thread_local Fiber* cur_fiber = nullptr;
inline thread_local std::vector<Fiber> fibers;
inline thread_local Barrier* grid_bar = nullptr;  // set during a cooperative launch
// Set while a PDL launch's first blocks run before the launch it depends on: its wait
// parks threads until gen turns 1 (the primary has run).
inline thread_local Barrier* pdl_bar = nullptr;
// Fibers of a launch that runs while the blocks of a PDL launch wait for it.
inline thread_local std::vector<Fiber> primary_fibers;
#ifdef PK_EMU_FAST_SWITCH
inline thread_local void* sched_sp = nullptr;
inline void to_scheduler(Fiber* f) { pk_emu_switch(&f->sp, sched_sp); }
inline void to_fiber(Fiber* f) { pk_emu_switch(&sched_sp, f->sp); }
#else
inline thread_local ucontext_t sched_ctx;
inline void to_scheduler(Fiber* f) { swapcontext(&f->ctx, &sched_ctx); }
inline void to_fiber(Fiber* f) { swapcontext(&sched_ctx, &f->ctx); }
#endif

inline std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.block_idx.x) + "," + std::to_string(b.block_idx.y) + "," +
         std::to_string(b.block_idx.z) + ")";
}

inline std::string where() {
  if (cur_block == nullptr || cur_fiber == nullptr) return "host";
  return block_name(*cur_block) + " thread " + std::to_string(cur_fiber->linear);
}

inline void release(Barrier& bar) {
  bar.arrived = 0;
  bar.site = nullptr;
  ++bar.gen;
}

// Arrive at `bar` and wait until every live thread it counts has arrived.
inline void arrive_and_wait(Barrier& bar, const char* site) {
  Fiber* f = cur_fiber;
  if (bar.arrived > 0 && bar.site != site)
    record_fault(where() + " reached " + site + " while other threads of its group wait at " + bar.site +
                 " (divergent barrier)");
  if (bar.arrived == 0) bar.site = site;
  if (++bar.arrived == bar.expected) {
    release(bar);
    return;
  }
  f->waiting = &bar;
  f->wait_gen = bar.gen;
  to_scheduler(f);
  f->waiting = nullptr;
}

inline void drop(Barrier& bar) {  // an exited thread no longer counts
  --bar.expected;
  if (bar.arrived > 0 && bar.arrived == bar.expected) release(bar);
}

inline void fiber_main() {
  (*cur_block->body)();
  Fiber* f = cur_fiber;
  f->done = true;
  drop(cur_block->block_bar);
  drop(cur_block->warp_bar[f->warp]);
  --cur_block->warp_live[f->warp];
  if (grid_bar != nullptr) drop(*grid_bar);
#ifdef PK_EMU_FAST_SWITCH
  to_scheduler(f);  // never resumed
  __builtin_unreachable();
#endif
  // ucontext: returning resumes uc_link, the scheduler
}

// A fresh fiber starts in fiber_main on its own stack.
inline void start_fiber(Fiber& f) {
#ifdef PK_EMU_FAST_SWITCH
  std::uintptr_t top = reinterpret_cast<std::uintptr_t>(f.stack.get() + kStackBytes) & ~std::uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                   // fiber_main's return address: never used
  *--sp = reinterpret_cast<void*>(&fiber_main);      // where pk_emu_switch returns to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &sched_ctx;
  makecontext(&f.ctx, fiber_main, 0);
#endif
}

template <typename V>
inline void check_aligned(const V* ptr, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % sizeof(V) != 0)
    record_fault(where() + ": misaligned " + std::to_string(sizeof(V)) + "-byte " + what + " at address " +
                 std::to_string(reinterpret_cast<std::uintptr_t>(ptr)));
}

// Runs the given blocks' threads as fibers until all have returned (or a deadlock).
// One block at a time for a normal launch; every block of the grid together for a
// cooperative one, whose grid barrier then counts all their threads. `primary`: the
// launch a PDL launch depends on, run (on the other fiber pool) when no live thread
// of these blocks can go on because some wait at pk_emu_pdl_wait, or after they all
// returned.
inline void run_blocks(std::vector<Block>& blocks, int nthreads, Barrier* grid,
                       std::function<void()>* primary = nullptr) {
  const int total = nthreads * static_cast<int>(blocks.size());
  if (static_cast<int>(fibers.size()) < total) fibers.resize(total);
  const int nwarps = (nthreads + 31) / 32;
  for (size_t bi = 0; bi < blocks.size(); ++bi) {
    Block& b = blocks[bi];
    b.block_bar = Barrier{};
    b.block_bar.expected = nthreads;
    b.warp_bar.assign(nwarps, Barrier{});
    b.warp_live.assign(nwarps, 0);
    b.slot[0].assign(nthreads, 0);
    b.slot[1].assign(nthreads, 0);
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[bi * nthreads + i];
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
      f.block = &b;
      f.linear = i;
      f.thread_idx = dim3(i % b.block_dim.x, (i / b.block_dim.x) % b.block_dim.y, i / (b.block_dim.x * b.block_dim.y));
      f.warp = i / 32;
      f.lane = i % 32;
      f.done = false;
      f.waiting = nullptr;
      f.shuffles = 0;
      ++b.warp_bar[f.warp].expected;
      ++b.warp_live[f.warp];
      start_fiber(f);
    }
  }
  if (grid != nullptr) {
    *grid = Barrier{};
    grid->expected = total;
  }
  grid_bar = grid;
  Barrier pdl_wait_bar;
  pdl_bar = primary != nullptr ? &pdl_wait_bar : nullptr;
  // The primary runs on the other pool (swapping the buffers moves no Fiber, so the
  // waiting ones stay where their stacks point); what it resets is put back.
  auto run_primary = [&]() {
    std::function<void()> run = std::move(*primary);
    *primary = nullptr;
    Barrier* const g = grid_bar;
    fibers.swap(primary_fibers);
    run();
    fibers.swap(primary_fibers);
    grid_bar = g;
    ++pdl_wait_bar.gen;  // releases the waiting threads
  };
  int live = total;
  while (live > 0) {
    bool ran = false;
    for (int n = 0; n < total; ++n) {
      Fiber& f = fibers[config.reverse ? total - 1 - n : n];
      if (f.done || (f.waiting != nullptr && f.waiting->gen == f.wait_gen)) continue;
      cur_fiber = &f;
      cur_block = f.block;
      to_fiber(&f);
      ran = true;
      if (f.done) --live;
    }
    if (!ran && primary != nullptr && *primary) {
      run_primary();
      continue;
    }
    if (!ran) {
      Fiber* w = nullptr;
      for (int i = 0; i < total && w == nullptr; ++i)
        if (!fibers[i].done) w = &fibers[i];
      cur_fiber = w;
      cur_block = w->block;
      record_fault(where() + ": deadlock, " + std::to_string(live) + " live threads wait at barriers that cannot " +
                   "complete (first waits at " + (w->waiting->site ? w->waiting->site : "?") + ")");
      break;  // the waiting fibers are abandoned; their stacks are reused
    }
  }
  if (primary != nullptr && *primary) run_primary();  // nobody waited for it
  cur_fiber = nullptr;
  cur_block = nullptr;
  grid_bar = nullptr;
  pdl_bar = nullptr;
  for (const Block& b : blocks) {
    for (size_t i = 0; i < kSmemGuard; ++i) {
      if (b.smem[b.smem.size() - kSmemGuard + i] != kPoison) {
        record_fault(block_name(b) + " wrote past its " + std::to_string(b.smem_bytes) +
                     " bytes of dynamic shared memory");
        break;
      }
    }
  }
}

// Blocks that fit on one SM at once (threads, shared memory, and the configured
// register limit), as the occupancy API says.
inline int blocks_per_sm(int threads, size_t smem) {
  int n = std::min({2048 / std::max(1, threads), 32, config.blocks_per_sm});
  if (smem > 0) n = std::min<int>(n, static_cast<int>(config.smem_per_sm / (smem + 1024)));
  return std::max(n, 0);
}

// Whether the device would accept a launch of this shape (checked at launch time,
// before the launch runs).
inline cudaError_t check_launch(const cudaLaunchConfig_t& cfg, bool cooperative) {
  const dim3 g = cfg.gridDim, bd = cfg.blockDim;
  const long long nthreads = static_cast<long long>(bd.x) * bd.y * bd.z;
  if (nthreads < 1 || nthreads > 1024 || bd.z > 64 || g.x < 1 || g.y < 1 || g.z < 1 || g.y > 65535 ||
      g.z > 65535 || g.x > 2147483647u)
    return cudaErrorInvalidConfiguration;
  if (cfg.dynamicSmemBytes > config.max_dynamic_smem) return cudaErrorInvalidValue;
  const long long nblocks = static_cast<long long>(g.x) * g.y * g.z;
  if (cooperative && nblocks > static_cast<long long>(blocks_per_sm(static_cast<int>(nthreads), cfg.dynamicSmemBytes)) * config.sms)
    return cudaErrorCooperativeLaunchTooLarge;
  return cudaSuccess;
}

// Blocks of a PDL launch that run before the launch they depend on: the resident
// ones, capped so that the fibers of a big grid stay affordable (any subset is an
// order a GPU may produce).
constexpr long long kMaxEarlyBlocks = 64;

// Runs a checked launch. `primary` (for a PDL launch): the pending launch it depends on.
inline void run_grid(const cudaLaunchConfig_t& cfg, const std::function<void()>& body, bool cooperative,
                     std::function<void()>* primary) {
  const dim3 g = cfg.gridDim, bd = cfg.blockDim;
  const int nthreads = static_cast<int>(bd.x * bd.y * bd.z);
  long long early = 0;
  if (primary != nullptr && *primary) {
    const long long resident = static_cast<long long>(blocks_per_sm(nthreads, cfg.dynamicSmemBytes)) * config.sms;
    early = std::max(1LL, std::min({kMaxEarlyBlocks, resident, static_cast<long long>(g.x) * g.y * g.z}));
    if (running != nullptr) running->early_blocks = early;
  }
  std::vector<Block> blocks;
  auto add_block = [&](unsigned x, unsigned y, unsigned z) {
    blocks.emplace_back();
    Block& b = blocks.back();
    b.block_dim = bd;
    b.grid_dim = g;
    b.body = &body;
    b.smem_bytes = cfg.dynamicSmemBytes;
    b.block_idx = dim3(x, y, z);
    b.smem.assign(((cfg.dynamicSmemBytes + 15) / 16) * 16 + kSmemGuard, kPoison);
  };
  Barrier grid;
  long long n = 0;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x, ++n) {
        add_block(x, y, z);
        if (cooperative) continue;
        if (n + 1 < early) continue;  // gather the early blocks
        run_blocks(blocks, nthreads, nullptr, n < early ? primary : nullptr);
        blocks.clear();
        if (!fault.empty()) return;  // reported through take_fault()
      }
  if (cooperative) run_blocks(blocks, nthreads, &grid, primary);
}

// The launch that has not run yet (see "Stream order" at the top).
inline std::function<void()> pending;

// Runs the pending launch: every stream operation, and the binding at the end of a
// call, does this first.
inline void flush() {
  if (!pending) return;
  std::function<void()> run = std::move(pending);
  pending = nullptr;
  run();
}

// Name of the next launch, for the launch log (set by PK_KERNEL_NAME in the launcher).
inline thread_local const char* next_kernel_name = nullptr;

}  // namespace pk_emu

// ---- device built-ins --------------------------------------------------------------

#define threadIdx (::pk_emu::cur_fiber->thread_idx)
#define blockIdx (::pk_emu::cur_block->block_idx)
// blockDim / gridDim are not provided: the kernel does not use them, and as macros
// they would clash with the cudaLaunchConfig_t fields of the same names.

// Dynamic shared memory of the running block (extern __shared__ T name[] on a GPU).
#define PK_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(::pk_emu::cur_block->smem.data())

// Vector loads check their alignment (a GPU faults on a misaligned one).
#define PK_CHECK_ALIGNED(ptr) ::pk_emu::check_aligned((ptr), "load")

// Global vector loads are counted per launch (see Traffic).
#define PK_COUNT_LOAD(ptr, weight) ::pk_emu::count_load((ptr), (weight))
namespace pk_emu {
template <typename V>
inline void count_load(const V* ptr, bool weight) {
  if (running == nullptr) return;
  (weight ? running->weights : running->activations).add(reinterpret_cast<std::uintptr_t>(ptr), sizeof(V));
}
}  // namespace pk_emu

inline void __syncthreads() { ::pk_emu::arrive_and_wait(::pk_emu::cur_block->block_bar, "__syncthreads"); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::pk_emu::record_fault(::pk_emu::where() + ": only full-mask __syncwarp is emulated");
  ::pk_emu::arrive_and_wait(::pk_emu::cur_block->warp_bar[::pk_emu::cur_fiber->warp], "__syncwarp");
}

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable<V>::value, "shuffle of a 4- or 8-byte value");
  pk_emu::Block& b = *pk_emu::cur_block;
  pk_emu::Fiber& f = *pk_emu::cur_fiber;
  if (mask != 0xffffffffu)
    pk_emu::record_fault(pk_emu::where() + ": only full-mask __shfl_xor_sync is emulated");
  if (b.warp_live[f.warp] != 32)
    pk_emu::record_fault(pk_emu::where() + ": __shfl_xor_sync(0xffffffff) in warp " + std::to_string(f.warp) +
                         " with only " + std::to_string(b.warp_live[f.warp]) + " live lanes");
  // Two slot banks, alternating: a lane writes bank (n % 2) at its n-th shuffle only
  // after every lane passed the barrier of shuffle n - 1, i.e. finished reading
  // shuffle n - 2 from that bank. One barrier per shuffle.
  std::vector<std::uint64_t>& bank = b.slot[f.shuffles++ & 1u];
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  bank[f.linear] = bits;
  pk_emu::arrive_and_wait(b.warp_bar[f.warp], "__shfl_xor_sync");
  const int src = f.warp * 32 + ((f.lane ^ lane_mask) & 31);
  V out;
  std::memcpy(&out, &bank[src], sizeof(V));
  return out;
}

// cooperative_groups::this_grid().sync() on a GPU: every thread of a cooperative launch.
inline void pk_emu_grid_sync() {
  if (::pk_emu::grid_bar == nullptr) {
    ::pk_emu::record_fault(::pk_emu::where() + ": grid sync in a launch that is not cooperative");
    return;
  }
  ::pk_emu::arrive_and_wait(*::pk_emu::grid_bar, "grid sync");
}
#define PK_GRID_SYNC() pk_emu_grid_sync()

template <typename V>
inline V __ldg(const V* ptr) {
  pk_emu::check_aligned(ptr, "read-only load");
  return *ptr;
}

// ---- runtime API ---------------------------------------------------------------------

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = pk_emu::config.sms; break;
    case cudaDevAttrComputeCapabilityMajor: *v = pk_emu::config.cc_major; break;
    case cudaDevAttrCooperativeLaunch: *v = 1; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorCooperativeLaunchTooLarge: return "cudaErrorCooperativeLaunchTooLarge";
    default: return "cudaErrorLaunchFailure";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = pk_emu::last_error;
  pk_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  pk_emu::flush();
  std::memmove(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t) {
  pk_emu::flush();
  std::memset(dst, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* s) {
  *s = pk_emu::config.capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

template <typename... Params>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*)(Params...), int threads, size_t smem) {
  *n = pk_emu::blocks_per_sm(threads, smem);
  return cudaSuccess;
}

// Checks the launch, logs it, and leaves it pending (see "Stream order" at the top);
// a PDL launch with a pending primary runs at once, around it. Kernel faults are
// left in pk_emu::fault for the binding to raise.
template <typename... Params, typename... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Params...), Args&&... args) {
  bool pdl = false, cooperative = false;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
        cfg->attrs[i].val.programmaticStreamSerializationAllowed)
      pdl = true;
    if (cfg->attrs[i].id == cudaLaunchAttributeCooperative && cfg->attrs[i].val.cooperative) cooperative = true;
  }
  const char* name = pk_emu::next_kernel_name != nullptr ? pk_emu::next_kernel_name : "kernel";
  pk_emu::next_kernel_name = nullptr;
  cudaError_t e = pdl && pk_emu::config.fail_pdl ? cudaErrorNotSupported : pk_emu::check_launch(*cfg, cooperative);
  if (e != cudaSuccess) {
    pk_emu::last_error = e;
    return e;
  }
  pk_emu::LaunchRecord rec;
  rec.kernel = name;
  rec.grid = cfg->gridDim;
  rec.block = cfg->blockDim;
  rec.smem = cfg->dynamicSmemBytes;
  rec.pdl = pdl;
  rec.cooperative = cooperative;
  pk_emu::launches.push_back(rec);
  const size_t index = pk_emu::launches.size() - 1;
  // Everything by value, as CUDA copies the launch (the caller's config and arguments
  // may be gone when it runs).
  const cudaLaunchConfig_t c = *cfg;
  const std::tuple<std::decay_t<Params>...> held(std::forward<Args>(args)...);
  auto run = [c, held, kernel, cooperative, index](std::function<void()>* primary) {
    pk_emu::LaunchRecord* const outer = pk_emu::running;  // a PDL launch's, while its primary runs
    pk_emu::running = &pk_emu::launches.at(index);
    const std::function<void()> body = [&]() { std::apply(kernel, held); };
    pk_emu::run_grid(c, body, cooperative, primary);
    std::unordered_set<std::uintptr_t>().swap(pk_emu::running->weights.seen);  // keep the counts only
    std::unordered_set<std::uintptr_t>().swap(pk_emu::running->activations.seen);
    pk_emu::running = outer;
  };
  if (pdl && pk_emu::config.pdl_early && pk_emu::pending) {
    std::function<void()> primary = std::move(pk_emu::pending);
    pk_emu::pending = nullptr;
    run(&primary);
    return cudaSuccess;
  }
  pk_emu::flush();
  pk_emu::pending = [run]() { run(nullptr); };
  return cudaSuccess;
}

// griddepcontrol.wait: parks the thread while a PDL launch's early blocks run before
// the launch it depends on; a no-op otherwise.
inline void pk_emu_pdl_wait() {
  ::pk_emu::Barrier* const bar = ::pk_emu::pdl_bar;
  if (bar == nullptr || bar->gen > 0) return;
  ::pk_emu::Fiber* const f = ::pk_emu::cur_fiber;
  f->waiting = bar;
  f->wait_gen = bar->gen;
  ::pk_emu::to_scheduler(f);
  f->waiting = nullptr;
}

#define PK_KERNEL_NAME(name) (::pk_emu::next_kernel_name = (name))
