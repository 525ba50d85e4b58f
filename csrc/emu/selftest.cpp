// Self-tests of the CPU emulation (csrc/emu/cuda_emu.h): small kernels, one correct
// and the others each with the bug the emulator claims to catch, so that
// tests/test_cuda_decode.py can show that a clean emulated run of the decode kernel
// means something. Compiled only into the emulation module _C_emu.
#include <string>
#include <vector>

#include "emu/cuda_emu.h"

namespace pk_emu_selftest {

struct Params {
  float* out;           // [64]
  const float* buf;     // 16-byte aligned scratch of 64 floats
  float* mid;           // [64], NaN before the PDL cases' producer runs
  int case_id;
};

enum Case : int {
  kReduceOk = 0,
  kMissingBarrier,
  kDivergentBarrier,
  kShuffleAfterExit,
  kMixedWarpOps,
  kMisalignedLoad,
  kSmemOverflow,
  kTooMuchSmem,
  kPdlWaitRead,   // producer, then a PDL consumer that reads mid after its wait
  kPdlEarlyRead,  // the same consumer reading mid before its wait
  kCount,
};
const char* const kNames[kCount] = {"reduce_ok",      "missing_barrier", "divergent_barrier", "shuffle_after_exit",
                                    "mixed_warp_ops", "misaligned_load", "smem_overflow",     "too_much_smem",
                                    "pdl_wait_read",  "pdl_early_read"};

__global__ void selftest_kernel(Params p) {
  PK_DYNAMIC_SMEM(float, smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  switch (p.case_id) {
    case kReduceOk: {  // block-wide: smem exchange behind a barrier, then warp sums
      smem[tid] = static_cast<float>(tid);
      __syncthreads();
      float v = smem[63 - tid];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      p.out[tid] = v;  // sum of the other warp's ids: 1520 for warp 0, 496 for warp 1
      break;
    }
    case kMissingBarrier:  // reads a neighbour's slot with no barrier: poison (NaN)
      smem[tid] = static_cast<float>(tid);
      p.out[tid] = smem[(tid + 1) & 63];
      break;
    case kDivergentBarrier:  // half a warp at __syncwarp, the other half at __syncthreads
      if (lane < 16) {
        __syncwarp();
      } else {
        __syncthreads();
      }
      p.out[tid] = 1.f;
      break;
    case kShuffleAfterExit: {  // lane 5 has returned; a full-mask shuffle needs it
      if (lane == 5) return;
      p.out[tid] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      break;
    }
    case kMixedWarpOps:  // lanes of one warp meet at different warp-level operations
      if (lane < 16) {
        __syncwarp();
        p.out[tid] = 0.f;
      } else {
        p.out[tid] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
      }
      break;
    case kMisalignedLoad: {  // a 16-byte load 4 bytes past an aligned address
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p.buf + 1));
      p.out[tid] = static_cast<float>(v.x & 1u);
      break;
    }
    case kSmemOverflow:  // 64 bytes of dynamic shared memory; element 16 is past them
      if (tid == 0) smem[16] = 1.f;
      p.out[tid] = 0.f;
      break;
    default:
      p.out[tid] = 0.f;
  }
}

// The PDL cases: the producer writes mid, the consumer (launched with the PDL
// attribute) copies it to out, after or before griddepcontrol.wait.
__global__ void producer_kernel(Params p) { p.mid[threadIdx.x] = 2.f * threadIdx.x; }

__global__ void consumer_kernel(Params p) {
  const int tid = threadIdx.x;
  float v = 0.f;
  if (p.case_id == kPdlEarlyRead) v = p.mid[tid];
  pk_emu_pdl_wait();
  if (p.case_id == kPdlWaitRead) v = p.mid[tid];
  p.out[tid] = v;
}

}  // namespace pk_emu_selftest

// Runs one named case on one block of 64 threads. Returns the launch error name (""
// on success) followed by the fault ("" when none); *out gets the 64 outputs.
std::vector<std::string> pk_emu_run_selftest(const std::string& name, std::vector<float>* out) {
  using namespace pk_emu_selftest;
  int id = -1;
  for (int i = 0; i < kCount; ++i)
    if (name == kNames[i]) id = i;
  if (id < 0) return {"unknown self-test " + name, ""};
  out->assign(64, -1.f);
  alignas(16) float buf[64] = {};
  std::vector<float> mid(64, std::nanf(""));
  Params p{out->data(), buf, mid.data(), id};
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1);
  cfg.blockDim = dim3(64);
  cudaError_t e;
  if (id == kPdlWaitRead || id == kPdlEarlyRead) {
    PK_KERNEL_NAME("producer");
    e = cudaLaunchKernelEx(&cfg, producer_kernel, p);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    PK_KERNEL_NAME("consumer");
    if (e == cudaSuccess) e = cudaLaunchKernelEx(&cfg, consumer_kernel, p);
  } else {
    cfg.dynamicSmemBytes = id == kSmemOverflow ? 64 : (id == kTooMuchSmem ? 64 * 1024 : 64 * sizeof(float));
    PK_KERNEL_NAME("selftest");
    e = cudaLaunchKernelEx(&cfg, selftest_kernel, p);
  }
  pk_emu::flush();
  cudaGetLastError();
  return {e == cudaSuccess ? "" : cudaGetErrorName(e), pk_emu::take_fault()};
}

std::vector<std::string> pk_emu_selftest_names() {
  using namespace pk_emu_selftest;
  return std::vector<std::string>(kNames, kNames + kCount);
}
