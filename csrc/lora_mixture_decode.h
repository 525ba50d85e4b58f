// Host interface of the CUDA decode kernel for the PROPER LoRA mixture.
//
// This header is plain C++ (no CUDA, no torch): csrc/bindings.cpp includes it and is
// compiled by the host compiler, csrc/lora_mixture_decode.cu implements it and is
// compiled by nvcc. Device pointers and the stream travel as integers, so the Python
// extension never links torch and survives torch ABI changes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace proper_kernels {

// Element type of every floating tensor of one call (x, y, weights). Accumulation is
// always fp32; gates are always fp32.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the decode forward is launched: two kernels (shrink, then gates + expand; the
// second with programmatic dependent launch on sm_90), or one cooperative kernel that
// runs both phases with a grid-wide barrier between them.
enum Launch : int { kLaunchTwo = 0, kLaunchOne = 1 };

// Limits of the decode kernel (checked again in Python before any pointer is used).
constexpr int64_t kMaxTokens = 4096;     // T: the decode path is for small batches
constexpr int64_t kMaxExperts = 64;      // K
constexpr int64_t kMaxRankTotal = 1024;  // K*r + r_u (+ K with a router): rank rows of the shrink

// All arguments of one call. Sizes: x [T, d_in], y_in/y_out [T, d_out],
// expert_A [K, r, d_in], expert_B [K, d_out, r], router_weight [K, d_in],
// user_logit_bias [N, K], user_ids int32 [T], user_A [N, r_u, d_in],
// user_B [N, d_out, r_u], user_router [N, K, r_u], gates fp32 [T, K].
// Every tensor is dense row-major (contiguous). A pointer of 0 means "absent":
// K = 0 means no experts, r_u = 0 no user adapters, N = 0 no user tensors at all;
// d_out = 0 writes nothing (y_out, expert_B, user_B may be 0) but still the gates.
// y_out = (y_in ? y_in : 0) + delta; y_in == y_out is the add-into-y variant.
struct DecodeArgs {
  int dtype = kBFloat16;
  int device = 0;
  std::uintptr_t stream = 0;
  int64_t T = 0, d_in = 0, d_out = 0;
  int64_t K = 0, r = 0, top_k = 0;  // top_k in [1, K]; top_k == K is dense softmax
  int64_t N = 0, r_u = 0;
  std::uintptr_t x = 0, y_in = 0, y_out = 0;
  std::uintptr_t expert_A = 0, expert_B = 0;
  float expert_scale = 1.f;
  std::uintptr_t router_weight = 0, user_logit_bias = 0;
  std::uintptr_t user_ids = 0;
  std::uintptr_t user_A = 0, user_B = 0;
  float user_scale = 1.f;
  std::uintptr_t user_router = 0;
  std::uintptr_t gates = 0;
  std::uintptr_t workspace = 0;
  int64_t workspace_bytes = 0;
  int launch = kLaunchTwo;
};

// Bytes of fp32 scratch the launch needs (split-d_in partial sums of the shrink).
// Returns -1 and fills *err on bad sizes or a CUDA error.
int64_t decode_workspace_bytes(int device, int64_t T, int64_t d_in, int64_t K, int64_t r,
                               int64_t r_u, bool has_router, std::string* err);

// Enqueues the decode forward on args.stream. Returns "" on success, else a message.
std::string decode_launch(const DecodeArgs& args);

// Architectures compiled into this binary, e.g. {"sm_80", "sm_90", "compute_90"}.
std::vector<std::string> built_archs();

// CUDA runtime version the extension was built with (e.g. 13000), and the driver's.
int cuda_runtime_version();
int cuda_driver_version();

}  // namespace proper_kernels
