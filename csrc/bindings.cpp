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
#include <vector>

#include "lora_mixture_decode.h"

#ifdef PROPER_KERNELS_EMULATE
#include "emu/cuda_emu.h"
// csrc/emu/selftest.cpp
std::vector<std::string> pk_emu_run_selftest(const std::string& name, std::vector<float>* out);
std::vector<std::string> pk_emu_selftest_names();
#endif

namespace py = pybind11;
using proper_kernels::DecodeArgs;

// proper_kernels._C on a GPU build; the CPU emulation build (python/build_cuda.py
// --emulate) names it _C_emu and adds configure() / launches().
#ifndef PROPER_KERNELS_MODULE_NAME
#define PROPER_KERNELS_MODULE_NAME _C
#endif

PYBIND11_MODULE(PROPER_KERNELS_MODULE_NAME, m) {
  m.doc() =
      "CUDA decode kernel of the PROPER LoRA mixture (raw pointers, no torch). "
      "Use proper_kernels.ops.cuda_decode, which validates arguments.";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(proper_kernels::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(proper_kernels::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(proper_kernels::kBFloat16);
  m.attr("LAUNCH_TWO") = static_cast<int>(proper_kernels::kLaunchTwo);
  m.attr("LAUNCH_ONE") = static_cast<int>(proper_kernels::kLaunchOne);
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
         std::uintptr_t gates, std::uintptr_t workspace, int64_t workspace_bytes, int launch) {
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
        a.launch = launch;
        std::string err;
        {
#ifndef PROPER_KERNELS_EMULATE  // the emulator's state is global: keep the GIL there
          py::gil_scoped_release release;
#endif
          err = proper_kernels::decode_launch(a);
        }
#ifdef PROPER_KERNELS_EMULATE
        pk_emu::flush();  // the last launch is still pending (see cuda_emu.h, "Stream order")
#endif
        if (!err.empty()) throw std::runtime_error(err);
#ifdef PROPER_KERNELS_EMULATE
        const std::string fault = pk_emu::take_fault();
        if (!fault.empty()) throw std::runtime_error("proper_kernels._C_emu: kernel fault: " + fault);
#endif
      },
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("T"), py::arg("d_in"),
      py::arg("d_out"), py::arg("K"), py::arg("r"), py::arg("top_k"), py::arg("N"),
      py::arg("r_u"), py::arg("x"), py::arg("y_in"), py::arg("y_out"), py::arg("expert_A"),
      py::arg("expert_B"), py::arg("expert_scale"), py::arg("router_weight"),
      py::arg("user_logit_bias"), py::arg("user_ids"), py::arg("user_A"), py::arg("user_B"),
      py::arg("user_scale"), py::arg("user_router"), py::arg("gates"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("launch") = static_cast<int>(proper_kernels::kLaunchTwo),
      "Enqueue y_out = (y_in or 0) + delta on `stream` (see csrc/lora_mixture_decode.h). "
      "Pointers are ints; 0 means absent. user_ids must be int32. launch: LAUNCH_TWO "
      "(shrink + expand kernels) or LAUNCH_ONE (one cooperative kernel).");

#ifdef PROPER_KERNELS_EMULATE
  m.attr("EMULATED") = true;
  m.def(
      "configure",
      [](int sms, int cc_major, bool reverse, bool fail_pdl, bool capturing, int64_t max_dynamic_smem,
         int blocks_per_sm, bool pdl_early) {
        if (sms < 1) throw std::invalid_argument("sms must be >= 1");
        if (blocks_per_sm < 1) throw std::invalid_argument("blocks_per_sm must be >= 1");
        pk_emu::config.blocks_per_sm = blocks_per_sm;
        if (max_dynamic_smem < 0) throw std::invalid_argument("max_dynamic_smem must be >= 0");
        pk_emu::config.max_dynamic_smem = static_cast<size_t>(max_dynamic_smem);
        pk_emu::config.sms = sms;
        pk_emu::config.cc_major = cc_major;
        pk_emu::config.reverse = reverse;
        pk_emu::config.fail_pdl = fail_pdl;
        pk_emu::config.capturing = capturing;
        pk_emu::config.pdl_early = pdl_early;
      },
      py::arg("sms") = 132, py::arg("cc_major") = 9, py::arg("reverse") = false,
      py::arg("fail_pdl") = false, py::arg("capturing") = false,
      py::arg("max_dynamic_smem") = 48 * 1024, py::arg("blocks_per_sm") = 2, py::arg("pdl_early") = true,
      "Set the emulated device: SM count, compute capability major (>= 9 takes the PDL "
      "path), thread order within a block, a failing PDL launch, a capturing stream, the "
      "dynamic shared memory a launch may ask for, the register-limited blocks per SM (2: the "
      "decode kernels' launch bounds), and whether a PDL launch's first blocks run up to their "
      "wait before the launch they depend on. Every call resets what it omits.");
  m.def(
      "launches",
      [](bool clear) {
        py::list out;
        for (const auto& r : pk_emu::launches)
          out.append(py::dict(py::arg("kernel") = r.kernel,
                              py::arg("grid") = py::make_tuple(r.grid.x, r.grid.y, r.grid.z),
                              py::arg("block") = py::make_tuple(r.block.x, r.block.y, r.block.z),
                              py::arg("smem") = r.smem, py::arg("pdl") = r.pdl,
                              py::arg("cooperative") = r.cooperative,
                              py::arg("early_blocks") = r.early_blocks,
                              py::arg("weight_bytes") = r.weights.requested,
                              py::arg("weight_bytes_unique") = r.weights.unique,
                              py::arg("act_bytes") = r.activations.requested,
                              py::arg("act_bytes_unique") = r.activations.unique));
        if (clear) pk_emu::launches.clear();
        return out;
      },
      py::arg("clear") = true,
      "The launches made since the last clear, as dicts: kernel, grid, block, smem, pdl, "
      "cooperative, early_blocks (PDL: blocks run up to their wait before the launch they "
      "depend on), and the bytes of the kernel's global vector loads, requested and unique, "
      "of weights (weight_bytes*) and activations (act_bytes*).");
  m.def("selftest_names", &pk_emu_selftest_names, "Names of the emulator's self-test kernels.");
  m.def(
      "round_trip",
      [](const std::vector<float>& values, const std::string& dtype) {
        std::vector<float> out;
        out.reserve(values.size());
        for (float v : values) {
          if (dtype == "float16") {
            out.push_back(__half2float(__float2half_rn(v)));
          } else if (dtype == "bfloat16") {
            out.push_back(__bfloat162float(__float2bfloat16_rn(v)));
          } else {
            throw std::invalid_argument("dtype must be 'float16' or 'bfloat16'");
          }
        }
        return out;
      },
      py::arg("values"), py::arg("dtype"),
      "float -> dtype -> float through the emulator's conversions (to check them against torch).");
  m.def(
      "selftest",
      [](const std::string& name) {
        std::vector<float> out;
        const std::vector<std::string> res = pk_emu_run_selftest(name, &out);
        return py::make_tuple(res[0], res[1], out);
      },
      py::arg("name"),
      "Run one self-test kernel: (launch error name or '', fault or '', 64 outputs).");
#else
  m.attr("EMULATED") = false;
#endif
}
