// pybind11 bindings of the CUDA decode kernel: module proper_kernels._C.
//
// Everything crosses as Python ints and floats (device pointers, sizes, the dtype
// enum, the stream handle), so this module neither includes nor links torch and keeps
// working across torch releases. It links only the CUDA runtime (statically).
// The Python side (proper_kernels/ops/cuda_decode.py) validates every argument before
// calling lora_mixture_decode; the C++ side re-checks sizes and never trusts user ids.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lora_mixture_decode.h"

namespace py = pybind11;
using proper_kernels::DecodeArgs;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "CUDA decode kernel of the PROPER LoRA mixture (raw pointers, no torch). "
      "Use proper_kernels.ops.cuda_decode, which validates arguments.";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(proper_kernels::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(proper_kernels::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(proper_kernels::kBFloat16);
  m.attr("MAX_TOKENS") = proper_kernels::kMaxTokens;
  m.attr("MAX_EXPERTS") = proper_kernels::kMaxExperts;
  m.attr("MAX_RANK_TOTAL") = proper_kernels::kMaxRankTotal;

  m.def("built_archs", &proper_kernels::built_archs,
        "Architectures compiled in, e.g. ['sm_80', 'sm_90', 'compute_90'].");
  m.def("cuda_runtime_version", &proper_kernels::cuda_runtime_version,
        "CUDART_VERSION the extension was built with (e.g. 13000).");
  m.def("cuda_driver_version", &proper_kernels::cuda_driver_version,
        "Version of the installed driver (0 when none is found).");

  m.def(
      "workspace_bytes",
      [](int device, int64_t T, int64_t d_in, int64_t K, int64_t r, int64_t r_u,
         bool has_router) {
        std::string err;
        const int64_t n = proper_kernels::decode_workspace_bytes(device, T, d_in, K, r, r_u,
                                                                 has_router, &err);
        if (n < 0) throw std::runtime_error(err);
        return n;
      },
      py::arg("device"), py::arg("T"), py::arg("d_in"), py::arg("K"), py::arg("r"),
      py::arg("r_u"), py::arg("has_router"),
      "Bytes of fp32 workspace lora_mixture_decode needs for these sizes on this device.");

  m.def(
      "lora_mixture_decode",
      [](int dtype, int device, std::uintptr_t stream, int64_t T, int64_t d_in, int64_t d_out,
         int64_t K, int64_t r, int64_t top_k, int64_t N, int64_t r_u, std::uintptr_t x,
         std::uintptr_t y_in, std::uintptr_t y_out, std::uintptr_t expert_A,
         std::uintptr_t expert_B, float expert_scale, std::uintptr_t router_weight,
         std::uintptr_t user_logit_bias, std::uintptr_t user_ids, std::uintptr_t user_A,
         std::uintptr_t user_B, float user_scale, std::uintptr_t user_router,
         std::uintptr_t gates, std::uintptr_t workspace, int64_t workspace_bytes) {
        DecodeArgs a;
        a.dtype = dtype;
        a.device = device;
        a.stream = stream;
        a.T = T;
        a.d_in = d_in;
        a.d_out = d_out;
        a.K = K;
        a.r = r;
        a.top_k = top_k;
        a.N = N;
        a.r_u = r_u;
        a.x = x;
        a.y_in = y_in;
        a.y_out = y_out;
        a.expert_A = expert_A;
        a.expert_B = expert_B;
        a.expert_scale = expert_scale;
        a.router_weight = router_weight;
        a.user_logit_bias = user_logit_bias;
        a.user_ids = user_ids;
        a.user_A = user_A;
        a.user_B = user_B;
        a.user_scale = user_scale;
        a.user_router = user_router;
        a.gates = gates;
        a.workspace = workspace;
        a.workspace_bytes = workspace_bytes;
        std::string err;
        {
          py::gil_scoped_release release;
          err = proper_kernels::decode_launch(a);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("T"), py::arg("d_in"),
      py::arg("d_out"), py::arg("K"), py::arg("r"), py::arg("top_k"), py::arg("N"),
      py::arg("r_u"), py::arg("x"), py::arg("y_in"), py::arg("y_out"), py::arg("expert_A"),
      py::arg("expert_B"), py::arg("expert_scale"), py::arg("router_weight"),
      py::arg("user_logit_bias"), py::arg("user_ids"), py::arg("user_A"), py::arg("user_B"),
      py::arg("user_scale"), py::arg("user_router"), py::arg("gates"), py::arg("workspace"),
      py::arg("workspace_bytes"),
      "Enqueue y_out = (y_in or 0) + delta on `stream` (see csrc/lora_mixture_decode.h). "
      "Pointers are ints; 0 means absent. user_ids must be int32.");
}
