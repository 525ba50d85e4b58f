// CUDA decode forward of the PROPER LoRA mixture (DESIGN.md section 1).
//
// Per token t with user u = u(t) (u = -1: no user, its terms are zero):
//   z_t = A_u x_t                                              [r_u]
//   l_t = W_r x_t + c_u + V_u z_t                              [K]
//   g_t = softmax over the top_k largest entries of l_t        [K]  (others 0)
//   y_t = y_in_t + s_g * sum_k g_tk * B_k (A_k x_t) + s_u * B_u z_t
// where y_in (optional) already holds x W0^T + b: the base GEMM is not done here.
//
// Two kernels on one stream:
//
// 1. _lora_mixture_shrink_kernel. Every token's "rank vector" is the product of x_t
//    with the rows [A_g (K*r rows); A_u(t) (r_u rows); W_r (K rows)]. Grid
//    (row blocks, token tiles, d_in splits). A warp owns kRowsPerWarp rows and a tile
//    of kTokTile tokens: it streams its rows over its slice of d_in with 16-byte
//    loads, keeps the loaded weight vectors in registers and reuses them for every
//    token of the tile (x comes through L1), then reduces each (row, token) sum with
//    warp shuffles and writes it to the fp32 workspace [splits, T, R]. Splitting d_in
//    over blockIdx.z fills the GPU when T is 1..8 and R is ~150 rows.
//
// 2. _lora_mixture_expand_kernel. Grid (d_out tiles, token tiles). Each block sums
//    the split partials of its tokens into shared memory (the rank vectors are tiny:
//    T*R*4 bytes, they stay in L2), computes the gate logits, the top-k mask and the
//    softmax in registers (one warp per token), scales the rank vector in place by
//    s_g * g_k (group part) and s_u (user part), then expands: a group of G lanes
//    owns an output row o, splits the K*r (and r_u) rank columns of that row
//    between its lanes with 16-byte loads of B_g[k, o, :] / B_u[u, o, :], reduces
//    with shuffles and writes y_out[t, o] = y_in[t, o] + delta in the input dtype.
//    The gate math is repeated by every d_out tile (K*R flops: negligible).
//
// The expand needs every token's complete rank vector: a grid-wide dependency.
// Recomputing the shrink in every expand block would re-read the K*r+r_u rows of d_in
// once per d_out tile, so the intermediate round-trips through L2 instead (KBs), in
// one of two launch modes (DecodeArgs::launch):
//
// kLaunchTwo (default): the two kernels above. On sm_90 the expand is launched with
//   programmatic dependent launch: the shrink signals griddepcontrol.launch_dependents
//   at its start, expand blocks get resident early, prefetch their B tiles into L2,
//   then block in griddepcontrol.wait until the shrink has finished and flushed. On
//   older GPUs it is a plain stream-ordered launch.
// kLaunchOne: _lora_mixture_fused_kernel, one cooperative launch of at most the
//   co-resident blocks: each block loops over shrink tiles, the grid meets at a
//   cooperative-groups grid barrier, then each block loops over expand tiles. One
//   launch, no second launch latency; the price is the barrier and a grid capped at
//   one wave. Which mode is faster is for benchmarks/run.py (providers cuda and
//   cuda-one) to say.
#ifdef PROPER_KERNELS_EMULATE
#include "emu/cuda_emu.h"  // CPU emulation build for CI (python/build_cuda.py --emulate)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cooperative_groups.h>
#define PK_GRID_SYNC() cooperative_groups::this_grid().sync()
// Hooks of the emulation build; nothing on a GPU.
#define PK_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#define PK_CHECK_ALIGNED(ptr) ((void)0)
#define PK_COUNT_LOAD(ptr, weight) ((void)0)
#define PK_KERNEL_NAME(name) ((void)0)
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "lora_mixture_decode.h"

namespace proper_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks per SM the shrink and the single-launch kernel are compiled for (<= 128
// registers a thread): 16 warps in flight for a memory-bound loop. Left to itself,
// ptxas gives the single-launch kernel up to 157 registers, i.e. one block per SM
// and a cooperative grid of one block per SM; at 128 it spills 8-12 B in the
// 16-byte-vector bf16/fp16 instances (ptxas -v, sm_90 / sm_80).
constexpr int kMinBlocksPerSM = 2;
constexpr int kTokTile = 8;      // tokens per block (both kernels); == kWarps for the gate math
constexpr int kRowsPerWarp = 4;  // shrink rows per warp (register blocking of x)
constexpr int kOutPerThread = 2; // expand outputs per lane group (register blocking of h)
constexpr int kUnit = 256;       // d_in split granularity (multiple of 32 * VEC)
constexpr int kMaxSplits = 32;
constexpr int kKPerLane = kMaxExperts / 32;
static_assert(kTokTile == kWarps, "the gate math maps one warp to one token");

struct KernelParams {
  const void* x;
  const void* y_in;
  void* y_out;
  const void* expert_A;
  const void* expert_B;
  const void* router_weight;
  const void* user_logit_bias;
  const int* user_ids;
  const void* user_A;
  const void* user_B;
  const void* user_router;
  float* gates;
  float* ws;
  int T, d_in, d_out, K, r, top_k, N, r_u;
  int RG, RU, RW, R, Rp, Kp;  // rank layout: [0,RG) experts, [RG,RG+RU) user, then router
  int split_len;
  int splits;
  int group;  // expand: lanes per output row, power of two <= 32
  int prefetch;
  int g1x, g1y, g1z, g2x, g2y;  // tile grids of the shrink and the expand
  int nblocks;                  // blocks of the single cooperative launch
  float expert_scale, user_scale;
};

// ---- element conversions and vector loads -------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> { using type = uint4; };
template <>
struct RawVec<8> { using type = uint2; };
template <>
struct RawVec<4> { using type = unsigned int; };
template <>
struct RawVec<2> { using type = unsigned short; };

// Loads VEC consecutive elements (VEC * sizeof(T) bytes, aligned to that) as floats.
// kReadOnly selects the non-coherent read-only path, used for weights.
template <typename T, int VEC, bool kReadOnly>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[VEC]) {
  using Raw = typename RawVec<VEC * sizeof(T)>::type;
  Raw raw;
  const Raw* src = reinterpret_cast<const Raw*>(ptr);
  PK_COUNT_LOAD(src, kReadOnly);  // emulation: global-memory traffic of the vector loads
  if (kReadOnly) {
    raw = __ldg(src);
  } else {
    PK_CHECK_ALIGNED(src);
    raw = *src;
  }
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
}

// VEC floats from shared memory; 16-byte loads when the offset is a multiple of 4
// (guaranteed by the host: row stride Rp and the segment starts are multiples of VEC).
template <int VEC>
__device__ __forceinline__ void load_smem(const float* ptr, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4* src = reinterpret_cast<const float4*>(ptr + i);
      PK_CHECK_ALIGNED(src);
      const float4 v = *src;
      out[i] = v.x;
      out[i + 1] = v.y;
      out[i + 2] = v.z;
      out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = ptr[i];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// User of token t, or -1 for "no user" and for ids outside [0, N) (Python range-checks
// the ids, or the RoutingPlan did unless built with check=False; either way the kernel
// never dereferences an out-of-range adapter: such a token gets no user terms).
__device__ __forceinline__ int token_user(const KernelParams& p, int t) {
  if (p.user_ids == nullptr || t >= p.T) return -1;
  const int u = p.user_ids[t];
  return (u >= 0 && u < p.N) ? u : -1;
}

// Programmatic dependent launch (sm_90+); no-ops elsewhere and when the kernel was
// not launched with the programmatic-serialization attribute.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(PROPER_KERNELS_EMULATE)
  pk_emu_pdl_wait();  // the emulation runs early blocks before the shrink and parks them here
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* ptr) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
#else
  (void)ptr;
#endif
}

// ---- kernel 1: shrink -----------------------------------------------------------

// One shrink tile: row block bx, token tile by, d_in split bz. Warps without rows
// return at once (no block-level barrier in here).
template <typename T, int VEC>
__device__ __forceinline__ void shrink_tile(const KernelParams& p, int bx, int by, int bz) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int row0 = (bx * kWarps + warp) * kRowsPerWarp;
  if (row0 >= p.R) return;
  const int t0 = by * kTokTile;
  const int nt = min(kTokTile, p.T - t0);
  const int split = bz;
  const int64_t d_in = p.d_in;
  const int64_t e_begin = static_cast<int64_t>(split) * p.split_len;
  const int64_t e_end = min(d_in, e_begin + p.split_len);
  const T* x = static_cast<const T*>(p.x) + static_cast<int64_t>(t0) * d_in;

  // A row is either shared by all tokens (expert A, router) or per token (user A).
  const T* wrow[kRowsPerWarp];
  int urow[kRowsPerWarp];
  bool any_user = false;
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int rho = row0 + q;
    wrow[q] = nullptr;
    urow[q] = -1;
    if (rho < p.RG) {
      wrow[q] = static_cast<const T*>(p.expert_A) + static_cast<int64_t>(rho) * d_in;
    } else if (rho < p.RG + p.RU) {
      urow[q] = rho - p.RG;
      any_user = true;
    } else if (rho < p.R) {
      wrow[q] = static_cast<const T*>(p.router_weight) +
                static_cast<int64_t>(rho - p.RG - p.RU) * d_in;
    }
  }
  const T* ubase[kTokTile];
#pragma unroll
  for (int t = 0; t < kTokTile; ++t) {
    ubase[t] = nullptr;
    if (any_user && t < nt) {
      const int u = token_user(p, t0 + t);
      if (u >= 0)
        ubase[t] = static_cast<const T*>(p.user_A) + static_cast<int64_t>(u) * p.r_u * d_in;
    }
  }

  float acc[kRowsPerWarp][kTokTile];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q)
#pragma unroll
    for (int t = 0; t < kTokTile; ++t) acc[q][t] = 0.f;

  if (!any_user) {
    // Shared rows: load the weight vectors once, use them for every token.
    for (int64_t e = e_begin + lane * VEC; e < e_end; e += 32 * VEC) {
      float w[kRowsPerWarp][VEC];
#pragma unroll
      for (int q = 0; q < kRowsPerWarp; ++q) {
        if (wrow[q] != nullptr) {
          load_vec<T, VEC, true>(wrow[q] + e, w[q]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) w[q][i] = 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < kTokTile; ++t) {
        if (t < nt) {
          float xv[VEC];
          load_vec<T, VEC, false>(x + t * d_in + e, xv);
#pragma unroll
          for (int q = 0; q < kRowsPerWarp; ++q)
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[q][t] = fmaf(w[q][i], xv[i], acc[q][t]);
        }
      }
    }
  } else {
    // The warp touches the user block: each token reads its own user's rows.
    for (int64_t e = e_begin + lane * VEC; e < e_end; e += 32 * VEC) {
#pragma unroll
      for (int t = 0; t < kTokTile; ++t) {
        if (t < nt) {
          float xv[VEC];
          load_vec<T, VEC, false>(x + t * d_in + e, xv);
#pragma unroll
          for (int q = 0; q < kRowsPerWarp; ++q) {
            const T* ptr = wrow[q];
            if (ptr == nullptr && urow[q] >= 0 && ubase[t] != nullptr)
              ptr = ubase[t] + static_cast<int64_t>(urow[q]) * d_in;
            if (ptr != nullptr) {
              float w[VEC];
              load_vec<T, VEC, true>(ptr + e, w);
#pragma unroll
              for (int i = 0; i < VEC; ++i) acc[q][t] = fmaf(w[i], xv[i], acc[q][t]);
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int rho = row0 + q;
    if (rho >= p.R) break;  // uniform over the warp
#pragma unroll
    for (int t = 0; t < kTokTile; ++t) {
      if (t < nt) {
        const float s = warp_sum(acc[q][t]);
        if (lane == 0)
          p.ws[(static_cast<int64_t>(split) * p.T + t0 + t) * p.R + rho] = s;
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    _lora_mixture_shrink_kernel(const KernelParams p) {
  pdl_launch_dependents();
  shrink_tile<T, VEC>(p, blockIdx.x, blockIdx.y, blockIdx.z);
}

// ---- kernel 2: gates + expand ---------------------------------------------------

// One expand tile: d_out tile bx, token tile by. Starts with block-wide writes of
// shared memory: a caller running several tiles in one block must put a barrier
// between them.
template <typename T, int VEC>
__device__ __forceinline__ void expand_tile(const KernelParams& p, float4* smem_raw, int bx, int by) {
  float* s_v = reinterpret_cast<float*>(smem_raw);  // [kTokTile][Rp] rank vectors
  float* s_g = s_v + kTokTile * p.Rp;                // [kTokTile][Kp] logits, then gates
  int* s_uid = reinterpret_cast<int*>(s_g + kTokTile * p.Kp);  // [kTokTile]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int t0 = by * kTokTile;
  const int nt = min(kTokTile, p.T - t0);
  const int G = p.group;
  const int g = tid & (G - 1);
  const int nslots = kThreads / G;
  const int o_first = bx * nslots * kOutPerThread + tid / G;
  const int64_t d_out = p.d_out;
  const T* Bg = static_cast<const T*>(p.expert_B);
  const T* Bu = static_cast<const T*>(p.user_B);
  const int cpr = p.r / VEC;  // 16-byte chunks per expert row of B_g
  const int n_chunks = p.RG > 0 ? p.K * cpr : 0;
  const int n_chunks_u = p.r_u / VEC;

  // user_ids and the weights were written before the shrink started: safe to read
  // before the dependency wait.
  if (tid < kTokTile) s_uid[tid] = tid < nt ? token_user(p, t0 + tid) : -1;
  if (p.prefetch) {
    for (int c = g; c < n_chunks; c += G) {
      const int k = c / cpr;
      const int i = (c - k * cpr) * VEC;
#pragma unroll
      for (int j = 0; j < kOutPerThread; ++j) {
        const int64_t o = o_first + j * nslots;
        if (o < d_out) prefetch_l2(Bg + (k * d_out + o) * p.r + i);
      }
    }
  }
  pdl_wait();

  // Rank vectors of this block's tokens: sum of the shrink's d_in splits.
  for (int idx = tid; idx < kTokTile * p.R; idx += kThreads) {
    const int t = idx / p.R;
    const int rho = idx - t * p.R;
    float s = 0.f;
    if (t < nt) {
      const float* src = p.ws + static_cast<int64_t>(t0 + t) * p.R + rho;
      for (int sp = 0; sp < p.splits; ++sp) s += src[static_cast<int64_t>(sp) * p.T * p.R];
    }
    s_v[t * p.Rp + rho] = s;
  }
  __syncthreads();

  // Gates, one warp per token; then scale the rank vector in place:
  // group part by s_g * g_k, user part by s_u (0 for u = -1).
  if (warp < nt) {
    const int t = warp;
    const int u = s_uid[t];
    float* v = s_v + t * p.Rp;
    float* gl = s_g + t * p.Kp;
    if (p.K > 0) {
      for (int k = lane; k < p.K; k += 32) {
        float l = p.RW > 0 ? v[p.RG + p.RU + k] : 0.f;
        if (u >= 0 && p.user_logit_bias != nullptr)
          l += to_float(static_cast<const T*>(p.user_logit_bias)[static_cast<int64_t>(u) * p.K + k]);
        if (u >= 0 && p.user_router != nullptr && p.RU > 0) {
          const T* Vr = static_cast<const T*>(p.user_router) +
                        (static_cast<int64_t>(u) * p.K + k) * p.r_u;
          for (int j = 0; j < p.r_u; ++j) l = fmaf(to_float(Vr[j]), v[p.RG + j], l);
        }
        gl[k] = l;
      }
      __syncwarp();
      // top_k: logit k survives if fewer than top_k logits beat it (ties: lower index
      // wins). Softmax over the survivors with the max subtracted.
      float lk[kKPerLane];
      bool keep[kKPerLane];
      float m = -INFINITY;
#pragma unroll
      for (int s = 0; s < kKPerLane; ++s) {
        const int k = lane + 32 * s;
        keep[s] = false;
        lk[s] = 0.f;
        if (k < p.K) {
          lk[s] = gl[k];
          int rank = 0;
          if (p.top_k < p.K) {
            for (int j = 0; j < p.K; ++j) {
              const float lj = gl[j];
              rank += (lj > lk[s]) || (lj == lk[s] && j < k);
            }
          }
          keep[s] = rank < p.top_k;
          if (keep[s]) m = fmaxf(m, lk[s]);
        }
      }
      m = warp_max(m);
      float ex[kKPerLane];
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < kKPerLane; ++s) {
        ex[s] = keep[s] ? expf(lk[s] - m) : 0.f;
        sum += ex[s];
      }
      sum = warp_sum(sum);
      const float inv = 1.f / sum;
      __syncwarp();  // every lane has read the logits
#pragma unroll
      for (int s = 0; s < kKPerLane; ++s) {
        const int k = lane + 32 * s;
        if (k < p.K) {
          const float gate = ex[s] * inv;
          gl[k] = gate;
          if (p.gates != nullptr && bx == 0)
            p.gates[static_cast<int64_t>(t0 + t) * p.K + k] = gate;
        }
      }
      __syncwarp();
      for (int rho = lane; rho < p.RG; rho += 32) v[rho] *= p.expert_scale * gl[rho / p.r];
    }
    for (int j = lane; j < p.RU; j += 32) v[p.RG + j] = u >= 0 ? v[p.RG + j] * p.user_scale : 0.f;
  }
  __syncthreads();

  // Expand: lane group (G lanes) <-> output rows o_first + j * nslots.
  float acc[kOutPerThread][kTokTile];
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j)
#pragma unroll
    for (int t = 0; t < kTokTile; ++t) acc[j][t] = 0.f;

  for (int c = g; c < n_chunks; c += G) {
    const int k = c / cpr;
    const int i = (c - k * cpr) * VEC;
    float w[kOutPerThread][VEC];
#pragma unroll
    for (int j = 0; j < kOutPerThread; ++j) {
      const int64_t o = o_first + j * nslots;
      if (o < d_out) {
        load_vec<T, VEC, true>(Bg + (k * d_out + o) * p.r + i, w[j]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) w[j][e] = 0.f;
      }
    }
#pragma unroll
    for (int t = 0; t < kTokTile; ++t) {
      if (t < nt) {
        float h[VEC];
        load_smem<VEC>(s_v + t * p.Rp + k * p.r + i, h);
#pragma unroll
        for (int j = 0; j < kOutPerThread; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][t] = fmaf(w[j][e], h[e], acc[j][t]);
      }
    }
  }
  for (int c = g; c < n_chunks_u; c += G) {
    const int i = c * VEC;
#pragma unroll
    for (int t = 0; t < kTokTile; ++t) {
      const int u = s_uid[t];
      if (t < nt && u >= 0) {
        float h[VEC];
        load_smem<VEC>(s_v + t * p.Rp + p.RG + i, h);
        const T* base = Bu + static_cast<int64_t>(u) * d_out * p.r_u + i;
#pragma unroll
        for (int j = 0; j < kOutPerThread; ++j) {
          const int64_t o = o_first + j * nslots;
          if (o < d_out) {
            float w[VEC];
            load_vec<T, VEC, true>(base + o * p.r_u, w);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[j][t] = fmaf(w[e], h[e], acc[j][t]);
          }
        }
      }
    }
  }

  // Reduce over the G lanes of a group (aligned, power of two: xor stays inside).
  for (int off = G >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int j = 0; j < kOutPerThread; ++j)
#pragma unroll
      for (int t = 0; t < kTokTile; ++t)
        if (t < nt) acc[j][t] += __shfl_xor_sync(0xffffffffu, acc[j][t], off);
  }

  const T* y_in = static_cast<const T*>(p.y_in);
  T* y_out = static_cast<T*>(p.y_out);
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) {
    const int64_t o = o_first + j * nslots;
    if (o >= d_out) continue;
#pragma unroll
    for (int t = 0; t < kTokTile; ++t) {
      if (t < nt && (t & (G - 1)) == g) {
        const int64_t idx = static_cast<int64_t>(t0 + t) * d_out + o;
        const float base = y_in != nullptr ? to_float(y_in[idx]) : 0.f;
        y_out[idx] = from_float<T>(base + acc[j][t]);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    _lora_mixture_expand_kernel(const KernelParams p) {
  PK_DYNAMIC_SMEM(float4, smem_raw);
  expand_tile<T, VEC>(p, smem_raw, blockIdx.x, blockIdx.y);
}

// ---- the single launch: shrink, grid barrier, expand ---------------------------------

// launch = "one": a cooperative grid of p.nblocks (at most the co-resident blocks)
// runs every shrink tile, meets at a grid-wide barrier (which also orders the
// workspace writes before the reads), then every expand tile. No PDL, no prefetch.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    _lora_mixture_fused_kernel(const KernelParams p) {
  PK_DYNAMIC_SMEM(float4, smem_raw);
  const int n1 = p.g1x * p.g1y * p.g1z;
  for (int w = blockIdx.x; w < n1; w += p.nblocks)
    shrink_tile<T, VEC>(p, w % p.g1x, (w / p.g1x) % p.g1y, w / (p.g1x * p.g1y));
  PK_GRID_SYNC();
  const int n2 = p.g2x * p.g2y;
  for (int w = blockIdx.x; w < n2; w += p.nblocks) {
    if (w != static_cast<int>(blockIdx.x)) __syncthreads();  // the last tile is done with shared memory
    expand_tile<T, VEC>(p, smem_raw, w % p.g2x, w / p.g2x);
  }
}

// ---- host side --------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

cudaError_t device_attr(int device, cudaDeviceAttr attr, int* value) {
  return cudaDeviceGetAttribute(value, attr, device);
}

std::string cuda_msg(const char* what, cudaError_t err) {
  return std::string("proper_kernels._C: ") + what + ": " + cudaGetErrorName(err) + " (" +
         cudaGetErrorString(err) + ")";
}

struct Layout {
  int64_t RG, RU, RW, R;
};

std::string check_sizes(int64_t T, int64_t d_in, int64_t K, int64_t r, int64_t r_u,
                        bool has_router, Layout* lay) {
  if (T < 1 || T > kMaxTokens) return "T must be in [1, " + std::to_string(kMaxTokens) + "]";
  if (d_in < 1 || d_in > (int64_t{1} << 30)) return "d_in out of range";
  if (K < 0 || K > kMaxExperts) return "K must be in [0, " + std::to_string(kMaxExperts) + "]";
  if (K > 0 && r < 1) return "expert rank r must be >= 1 when K > 0";
  if (r_u < 0) return "user rank r_u must be >= 0";
  if (has_router && K == 0) return "router_weight needs experts (K > 0)";
  lay->RG = K > 0 ? K * r : 0;
  lay->RU = r_u;
  lay->RW = has_router ? K : 0;
  lay->R = lay->RG + lay->RU + lay->RW;
  if (lay->R > kMaxRankTotal)
    return "K*r + r_u + K (router) = " + std::to_string(lay->R) + " exceeds " +
           std::to_string(kMaxRankTotal);
  return "";
}

// d_in split of the shrink: enough blocks to cover ~2 waves of the SMs.
void plan_splits(int64_t T, int64_t d_in, int64_t R, int sms, int* splits, int* split_len) {
  const int64_t row_blocks = ceil_div(R, int64_t{kWarps} * kRowsPerWarp);
  const int64_t tiles = ceil_div(T, kTokTile);
  const int64_t units = ceil_div(d_in, kUnit);
  int64_t s = ceil_div(2 * static_cast<int64_t>(sms), std::max<int64_t>(1, row_blocks * tiles));
  s = std::max<int64_t>(1, std::min<int64_t>({s, units, kMaxSplits}));
  const int64_t per = ceil_div(units, s);
  *split_len = static_cast<int>(per * kUnit);
  *splits = static_cast<int>(ceil_div(units, per));
}

// fp32 split partials of the shrink: [splits, T, R].
int64_t workspace_need(int splits, int64_t T, int64_t R) {
  return static_cast<int64_t>(splits) * T * R * static_cast<int64_t>(sizeof(float));
}

int sm_count(int device, std::string* err) {
  int sms = 0;
  cudaError_t e = device_attr(device, cudaDevAttrMultiProcessorCount, &sms);
  if (e != cudaSuccess) {
    *err = cuda_msg("cudaDeviceGetAttribute(multiProcessorCount)", e);
    return -1;
  }
  return sms;
}

bool pdl_disabled_by_env() {
  const char* v = std::getenv("PROPER_KERNELS_DISABLE_PDL");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

enum class LaunchAttr { kNone, kPdl, kCooperative };

// One launch through cudaLaunchKernelEx. kPdl: the kernel may start before the
// previous one in the stream ends and must call pdl_wait before reading its output.
// kCooperative: all blocks co-resident, grid barriers allowed. Returns the error.
cudaError_t launch_kernel(void (*kernel)(KernelParams), const char* name, dim3 grid, size_t smem,
                          cudaStream_t stream, LaunchAttr attr, const KernelParams& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute a[1];
  if (attr == LaunchAttr::kPdl) {
    a[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a[0].val.programmaticStreamSerializationAllowed = 1;
  } else {
    a[0].id = cudaLaunchAttributeCooperative;
    a[0].val.cooperative = 1;
  }
  cfg.attrs = a;
  cfg.numAttrs = attr == LaunchAttr::kNone ? 0 : 1;
  PK_KERNEL_NAME(name);
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

template <typename T, int VEC>
std::string launch_typed(KernelParams p, size_t smem, cudaStream_t stream, bool pdl, bool one, int sms) {
  const dim3 grid1(p.g1x, p.g1y, p.g1z), grid2(p.g2x, p.g2y, 1);
  if (one) {
    int per_sm = 0;
    cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, _lora_mixture_fused_kernel<T, VEC>,
                                                                  kThreads, smem);
    if (e != cudaSuccess) return cuda_msg("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
    if (per_sm < 1) return "launch='one': the single-launch kernel does not fit on an SM";
    const int64_t tiles = std::max<int64_t>(int64_t{p.g1x} * p.g1y * p.g1z, int64_t{p.g2x} * p.g2y);
    p.nblocks = static_cast<int>(std::min<int64_t>(tiles, int64_t{per_sm} * sms));
    p.prefetch = 0;
    e = launch_kernel(_lora_mixture_fused_kernel<T, VEC>, "fused", dim3(p.nblocks), smem, stream,
                      LaunchAttr::kCooperative, p);
    if (e != cudaSuccess) return cuda_msg("single (cooperative) kernel launch", e);
    return "";
  }
  cudaError_t e = launch_kernel(_lora_mixture_shrink_kernel<T, VEC>, "shrink", grid1, 0, stream, LaunchAttr::kNone, p);
  if (e != cudaSuccess) return cuda_msg("shrink kernel launch", e);
  e = launch_kernel(_lora_mixture_expand_kernel<T, VEC>, "expand", grid2, smem, stream,
                    pdl ? LaunchAttr::kPdl : LaunchAttr::kNone, p);
  if (e != cudaSuccess && pdl) {
    cudaGetLastError();  // clear; fall back to a plain stream-ordered launch
    p.prefetch = 0;
    e = launch_kernel(_lora_mixture_expand_kernel<T, VEC>, "expand", grid2, smem, stream, LaunchAttr::kNone, p);
  }
  if (e != cudaSuccess) return cuda_msg("expand kernel launch", e);
  return "";
}

// VEC in elements: 16 bytes, 8 bytes or one element.
template <typename T>
std::string dispatch_vec(int vec_bytes, const KernelParams& p, size_t smem, cudaStream_t s, bool pdl, bool one,
                         int sms) {
  constexpr int V16 = 16 / sizeof(T);
  constexpr int V8 = 8 / sizeof(T);
  if (vec_bytes == 16) return launch_typed<T, V16>(p, smem, s, pdl, one, sms);
  if (vec_bytes == 8) return launch_typed<T, V8>(p, smem, s, pdl, one, sms);
  return launch_typed<T, 1>(p, smem, s, pdl, one, sms);
}

}  // namespace

int64_t decode_workspace_bytes(int device, int64_t T, int64_t d_in, int64_t K, int64_t r,
                               int64_t r_u, bool has_router, std::string* err) {
  Layout lay;
  *err = check_sizes(T, d_in, K, r, r_u, has_router, &lay);
  if (!err->empty()) return -1;
  if (lay.R == 0) return 0;
  const int sms = sm_count(device, err);
  if (sms < 0) return -1;
  int splits = 1, split_len = 0;
  plan_splits(T, d_in, lay.R, sms, &splits, &split_len);
  return workspace_need(splits, T, lay.R);
}

std::string decode_launch(const DecodeArgs& a) {
  Layout lay;
  std::string err = check_sizes(a.T, a.d_in, a.K, a.r, a.r_u, a.router_weight != 0, &lay);
  if (!err.empty()) return err;
  if (a.d_out < 0 || a.d_out > (int64_t{1} << 30)) return "d_out out of range";
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16)
    return "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)";
  // d_out = 0: nothing to write (y_out, expert_B and user_B may be empty, i.e. 0), but
  // the gates are still computed (one expand tile per token tile).
  const bool has_out = a.d_out > 0;
  if (a.x == 0 || (has_out && a.y_out == 0)) return "x and y_out must be given";
  if (a.K > 0 && (a.expert_A == 0 || (has_out && a.expert_B == 0))) return "K > 0 needs expert_A and expert_B";
  if (a.K > 0 && (a.top_k < 1 || a.top_k > a.K)) return "top_k must be in [1, K]";
  if (a.r_u > 0 && (a.N < 1 || a.user_A == 0 || (has_out && a.user_B == 0) || a.user_ids == 0))
    return "r_u > 0 needs N >= 1, user_A, user_B and user_ids";
  if ((a.user_logit_bias != 0 || a.user_router != 0) && (a.N < 1 || a.user_ids == 0 || a.K == 0))
    return "user_logit_bias / user_router need N >= 1, user_ids and experts";
  if (a.user_router != 0 && a.r_u == 0) return "user_router needs user adapters (r_u > 0)";
  if (a.launch != kLaunchTwo && a.launch != kLaunchOne) return "launch must be 0 (two kernels) or 1 (one cooperative kernel)";

  DeviceGuard guard(static_cast<int>(a.device));
  if (guard.err != cudaSuccess) return cuda_msg("cudaSetDevice", guard.err);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int esize = a.dtype == kFloat32 ? 4 : 2;

  if (lay.R == 0) {  // nothing to add: y_out = y_in (or 0)
    if (a.y_out != a.y_in && has_out) {
      const size_t bytes = static_cast<size_t>(a.T * a.d_out * esize);
      cudaError_t e = a.y_in != 0
                          ? cudaMemcpyAsync(reinterpret_cast<void*>(a.y_out),
                                            reinterpret_cast<const void*>(a.y_in), bytes,
                                            cudaMemcpyDeviceToDevice, stream)
                          : cudaMemsetAsync(reinterpret_cast<void*>(a.y_out), 0, bytes, stream);
      if (e != cudaSuccess) return cuda_msg("copy of y_in", e);
    }
    return "";
  }

  const int sms = sm_count(static_cast<int>(a.device), &err);
  if (sms < 0) return err;
  int cc_major = 0;
  cudaError_t e = device_attr(static_cast<int>(a.device), cudaDevAttrComputeCapabilityMajor, &cc_major);
  if (e != cudaSuccess) return cuda_msg("cudaDeviceGetAttribute(computeCapabilityMajor)", e);
  if (a.launch == kLaunchOne) {
    int coop = 0;
    e = device_attr(static_cast<int>(a.device), cudaDevAttrCooperativeLaunch, &coop);
    if (e != cudaSuccess) return cuda_msg("cudaDeviceGetAttribute(cooperativeLaunch)", e);
    if (!coop) return "launch='one' needs cooperative launches, which this device does not support";
  }

  int splits = 1, split_len = 0;
  plan_splits(a.T, a.d_in, lay.R, sms, &splits, &split_len);
  const int64_t ws_need = workspace_need(splits, a.T, lay.R);
  if (a.workspace == 0 || a.workspace_bytes < ws_need)
    return "workspace too small: need " + std::to_string(ws_need) + " bytes, got " +
           std::to_string(a.workspace_bytes);

  // Widest vector every streamed operand allows: sizes and base addresses.
  auto fits = [&](int bytes) {
    const int v = bytes / esize;
    if (v < 1 || bytes % esize != 0) return false;
    if (a.d_in % v != 0) return false;
    if (a.K > 0 && a.r % v != 0) return false;
    if (a.r_u > 0 && a.r_u % v != 0) return false;
    const std::uintptr_t ptrs[] = {a.x, a.expert_A, a.expert_B, a.router_weight, a.user_A, a.user_B};
    for (std::uintptr_t ptr : ptrs)
      if (ptr % static_cast<std::uintptr_t>(bytes) != 0) return false;
    return true;
  };
  const int vec_bytes = fits(16) ? 16 : (fits(8) ? 8 : esize);
  const int vec = vec_bytes / esize;

  KernelParams p = {};
  p.x = reinterpret_cast<const void*>(a.x);
  p.y_in = reinterpret_cast<const void*>(a.y_in);
  p.y_out = reinterpret_cast<void*>(a.y_out);
  p.expert_A = reinterpret_cast<const void*>(a.expert_A);
  p.expert_B = reinterpret_cast<const void*>(a.expert_B);
  p.router_weight = reinterpret_cast<const void*>(a.router_weight);
  p.user_logit_bias = reinterpret_cast<const void*>(a.user_logit_bias);
  p.user_ids = reinterpret_cast<const int*>(a.user_ids);
  p.user_A = reinterpret_cast<const void*>(a.user_A);
  p.user_B = reinterpret_cast<const void*>(a.user_B);
  p.user_router = reinterpret_cast<const void*>(a.user_router);
  p.gates = reinterpret_cast<float*>(a.gates);
  p.ws = reinterpret_cast<float*>(a.workspace);
  p.T = static_cast<int>(a.T);
  p.d_in = static_cast<int>(a.d_in);
  p.d_out = static_cast<int>(a.d_out);
  p.K = static_cast<int>(a.K);
  p.r = a.K > 0 ? static_cast<int>(a.r) : 0;
  p.top_k = static_cast<int>(a.K > 0 ? a.top_k : 0);
  p.N = static_cast<int>(a.N);
  p.r_u = static_cast<int>(a.r_u);
  p.RG = static_cast<int>(lay.RG);
  p.RU = static_cast<int>(lay.RU);
  p.RW = static_cast<int>(lay.RW);
  p.R = static_cast<int>(lay.R);
  p.Rp = static_cast<int>(ceil_div(lay.R, 4) * 4);
  p.Kp = static_cast<int>(std::max<int64_t>(1, a.K));
  p.split_len = split_len;
  p.splits = splits;
  p.expert_scale = a.expert_scale;
  p.user_scale = a.user_scale;

  // Lanes per output row: grow G until the expand grid covers ~2 waves or G reaches
  // the number of 16-byte chunks of the widest B row.
  const int64_t tiles = ceil_div(a.T, kTokTile);
  const int64_t max_chunks = std::max<int64_t>({1, lay.RG / vec, lay.RU / vec});
  int G = 1;
  while (G < 32 && G < max_chunks &&
         ceil_div(a.d_out, int64_t{kThreads / G} * kOutPerThread) * tiles < 2 * sms)
    G *= 2;
  p.group = G;
  // PDL on sm_90+, except while the stream is being captured into a CUDA graph (the
  // graph already removes the launch gap; a failed launch would poison the capture).
  bool pdl = cc_major >= 9 && !pdl_disabled_by_env();
  if (pdl) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &cap) != cudaSuccess) {
      cudaGetLastError();
      pdl = false;
    } else if (cap != cudaStreamCaptureStatusNone) {
      pdl = false;
    }
  }
  p.prefetch = pdl ? 1 : 0;

  p.g1x = static_cast<int>(ceil_div(lay.R, int64_t{kWarps} * kRowsPerWarp));
  p.g1y = static_cast<int>(tiles);
  p.g1z = splits;
  p.g2x = static_cast<int>(std::max<int64_t>(1, ceil_div(a.d_out, int64_t{kThreads / G} * kOutPerThread)));
  p.g2y = static_cast<int>(tiles);
  const size_t smem = (static_cast<size_t>(kTokTile) * p.Rp + static_cast<size_t>(kTokTile) * p.Kp) *
                          sizeof(float) + kTokTile * sizeof(int);

  const bool one = a.launch == kLaunchOne;
  switch (a.dtype) {
    case kFloat32:
      return dispatch_vec<float>(vec_bytes, p, smem, stream, pdl, one, sms);
    case kFloat16:
      return dispatch_vec<__half>(vec_bytes, p, smem, stream, pdl, one, sms);
    default:
      return dispatch_vec<__nv_bfloat16>(vec_bytes, p, smem, stream, pdl, one, sms);
  }
}

std::vector<std::string> built_archs() {
  std::vector<std::string> out;
#ifdef PROPER_KERNELS_EMULATE
  out.push_back("cpu-emulation");
#endif
#ifdef __CUDA_ARCH_LIST__
  const int archs[] = {__CUDA_ARCH_LIST__};
  for (int a : archs) out.push_back("sm_" + std::to_string(a / 10));
#endif
#ifdef PROPER_KERNELS_PTX_ARCHS
  // "90" or "90,100": architectures that also carry PTX for JIT on newer GPUs.
  std::string ptx = PROPER_KERNELS_PTX_ARCHS;
  size_t start = 0;
  while (start < ptx.size()) {
    size_t end = ptx.find(',', start);
    if (end == std::string::npos) end = ptx.size();
    if (end > start) out.push_back("compute_" + ptx.substr(start, end - start));
    start = end + 1;
  }
#endif
  return out;
}

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace proper_kernels
