// Host side of the CUDA decode forward (lora_mixture_decode.h): the argument and size
// checks, the d_in split of the shrink and its workspace, the widest vector every
// operand allows, the lanes per output row of the expand, and the launches. The
// kernels are in lora_mixture_decode_kernels.cuh.
//
// The expand needs every token's complete rank vector: a grid-wide dependency.
// Recomputing the shrink in every expand block would re-read the K*r+r_u rows of d_in
// once per d_out tile, so the intermediate round-trips through L2 instead (KBs), in
// one of two launch modes (DecodeArgs::launch):
//
// kLaunchTwo (default): the shrink kernel, then the expand kernel. On sm_90 the expand is launched with
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

#include "lora_mixture_decode_kernels.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace proper_kernels {
namespace {

constexpr int kUnit = 256;       // d_in split granularity (multiple of 32 * VEC)
constexpr int kMaxSplits = 32;

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
