// Device code of the CUDA decode forward of the PROPER LoRA mixture (DESIGN.md
// section 1): the kernels, their device functions and the parameter block they share
// with the host side. lora_mixture_decode.cu includes it (the only translation unit
// that does, hence the internal linkage) and plans and launches the kernels.
//
// Per token t with user u = u(t) (u = -1: no user, its terms are zero):
//   z_t = A_u x_t                                              [r_u]
//   l_t = W_r x_t + c_u + V_u z_t                              [K]
//   g_t = softmax over the top_k largest entries of l_t        [K]  (others 0)
//   y_t = y_in_t + s_g * sum_k g_tk * B_k (A_k x_t) + s_u * B_u z_t
// where y_in (optional) already holds x W0^T + b: the base GEMM is not done here.
//
// Three kernels, built from two tile functions (shrink_tile, expand_tile):
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
// 3. _lora_mixture_fused_kernel (launch = "one"): one cooperative grid runs every
//    shrink tile, meets at a grid barrier, then runs every expand tile.
#pragma once

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

#include <cmath>
#include <cstdint>

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
constexpr int kKPerLane = kMaxExperts / 32;
static_assert(kTokTile == kWarps, "the gate math maps one warp to one token");

// Everything a kernel reads, by value; filled by decode_launch (lora_mixture_decode.cu).
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

// VEC weights at base + row_start + col as floats; VEC zeros when !valid (nothing is
// read then, and base may be null).
template <typename T, int VEC>
__device__ __forceinline__ void load_weight_or_zero(bool valid, const T* base, int64_t row_start, int64_t col,
                                                    float (&out)[VEC]) {
  if (valid) {
    load_vec<T, VEC, true>(base + row_start + col, out);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = 0.f;
  }
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

// acc + sum_i a[i] * b[i], one fused multiply-add at a time in index order.
template <int VEC>
__device__ __forceinline__ float fma_vec(const float (&a)[VEC], const float (&b)[VEC], float acc) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc = fmaf(a[i], b[i], acc);
  return acc;
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

// f(t, xv) for each token t < nt of a tile, xv the VEC elements of x_t at column e
// (x points at the tile's first token).
template <typename T, int VEC, typename F>
__device__ __forceinline__ void for_each_token_x(const T* x, int64_t d_in, int64_t e, int nt, F&& f) {
#pragma unroll
  for (int t = 0; t < kTokTile; ++t) {
    if (t < nt) {
      float xv[VEC];
      load_vec<T, VEC, false>(x + t * d_in + e, xv);
      f(t, xv);
    }
  }
}

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
      for (int q = 0; q < kRowsPerWarp; ++q) load_weight_or_zero<T, VEC>(wrow[q] != nullptr, wrow[q], 0, e, w[q]);
      for_each_token_x<T, VEC>(x, d_in, e, nt, [&](int t, const float (&xv)[VEC]) {
#pragma unroll
        for (int q = 0; q < kRowsPerWarp; ++q) acc[q][t] = fma_vec<VEC>(w[q], xv, acc[q][t]);
      });
    }
  } else {
    // The warp touches the user block: each token reads its own user's rows.
    for (int64_t e = e_begin + lane * VEC; e < e_end; e += 32 * VEC) {
      for_each_token_x<T, VEC>(x, d_in, e, nt, [&](int t, const float (&xv)[VEC]) {
#pragma unroll
        for (int q = 0; q < kRowsPerWarp; ++q) {
          const T* ptr = wrow[q];
          if (ptr == nullptr && urow[q] >= 0 && ubase[t] != nullptr)
            ptr = ubase[t] + static_cast<int64_t>(urow[q]) * d_in;
          if (ptr != nullptr) {
            float w[VEC];
            load_vec<T, VEC, true>(ptr + e, w);
            acc[q][t] = fma_vec<VEC>(w, xv, acc[q][t]);
          }
        }
      });
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
      load_weight_or_zero<T, VEC>(o < d_out, Bg, (k * d_out + o) * p.r, i, w[j]);
    }
#pragma unroll
    for (int t = 0; t < kTokTile; ++t) {
      if (t < nt) {
        float h[VEC];
        load_smem<VEC>(s_v + t * p.Rp + k * p.r + i, h);
#pragma unroll
        for (int j = 0; j < kOutPerThread; ++j) acc[j][t] = fma_vec<VEC>(w[j], h, acc[j][t]);
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
            acc[j][t] = fma_vec<VEC>(w, h, acc[j][t]);
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

}  // namespace
}  // namespace proper_kernels
