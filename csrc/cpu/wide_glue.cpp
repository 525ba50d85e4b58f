// CPU kernels of the torch backend's wide variant (proper_kernels/ops/torch_backend.py):
// the per-token work between its GEMMs, fused into one pass over the tokens.
//
// The codes of a token t of user u = ids[t] (-1: no user) are one row of
// H = x [A_cat; A_u of all N users; W_r]^T, columns [h: K r | z: N r_u | l: K].
//
//   forward:  g = softmax(l + c_u + V_u z_u)   (over the top_k logits when 0 < top_k < K)
//             HG = [s_g g_k h_k | s_u z_u in user u's block, zero elsewhere]
//   backward: from e = dy [B_cat | B_u of all users] (unscaled) and the gates' own
//             gradient dg_ext, the gradient of the codes
//             dH = [s_g g_k e_k | s_u e_u + V_u^T dl in user u's block | dl]
//             with dg_k = s_g <e_k, h_k> + dg_ext_k and dl = g (dg - <g, dg>), and the
//             user logit bias's and the LoRA-aware router's gradients
//             dc_u = sum_t dl_t, dV_u = sum_t dl_t z_t^T over the tokens of user u.
//
// The GEMMs around these stay in ATen; wide_pack lays the adapters out for them.
// Everything here runs in the dtype of H (the compute dtype: float32, or float64); the
// per-user sums go in token order, one user after the other, so they are deterministic.
// Registered as torch.ops.proper_kernels_cpu.*; the module proper_kernels._cpu loads them.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Tokens per parallel chunk: below it one thread does the whole batch.
constexpr int64_t kGrain = 256;

void check_2d(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape [", rows, ", ",
              cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous CPU tensor");
}

struct Dims {
  int64_t T, K, r, r_u, N, Kr, RE, RH;
  bool router;
};

Dims dims_of(const at::Tensor& H, int64_t K, int64_t r, int64_t r_u, int64_t N, bool router) {
  TORCH_CHECK(H.dim() == 2, "H must be 2-D [T, K r + N r_u (+ K)], got ", H.sizes());
  TORCH_CHECK(K >= 0 && r >= 0 && r_u >= 0 && N >= 0, "K, r, r_u and N must be >= 0");
  Dims d{H.size(0), K, r, r_u, N, K * r, K * r + N * r_u, 0, router};
  d.RH = d.RE + (router ? K : 0);
  TORCH_CHECK(H.size(1) == d.RH, "H must have K r + N r_u", router ? " + K" : "", " = ", d.RH,
              " columns, got ", H.size(1));
  TORCH_CHECK(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble,
              "H must be float32 or float64, got ", H.scalar_type());
  TORCH_CHECK(H.is_contiguous() && H.device().is_cpu(), "H must be a contiguous CPU tensor");
  return d;
}

void check_ids(const at::Tensor& ids, int64_t T) {
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == T && ids.scalar_type() == at::kInt && ids.is_contiguous() &&
                  ids.device().is_cpu(),
              "ids must be a contiguous int32 CPU tensor of shape [", T, "], got ", ids.sizes(), " ",
              ids.scalar_type());
}

// The gates of one token from its logits lg[0..K): softmax over all of them, or over
// the top_k largest (ties keep the lower index, as a stable descending sort does).
template <typename scalar_t>
void gates(const scalar_t* lg, int64_t K, int64_t top_k, scalar_t* g) {
  const bool sparse = top_k > 0 && top_k < K;
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t k = 0; k < K; ++k) {
    bool keep = true;
    if (sparse) {
      int64_t rank = 0;
      for (int64_t q = 0; q < K; ++q) rank += (lg[q] > lg[k]) || (lg[q] == lg[k] && q < k);
      keep = rank < top_k;
    }
    g[k] = keep ? scalar_t(1) : scalar_t(0);
    if (keep) m = std::max(m, lg[k]);
  }
  scalar_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    g[k] = g[k] != scalar_t(0) ? std::exp(lg[k] - m) : scalar_t(0);
    sum += g[k];
  }
  for (int64_t k = 0; k < K; ++k) g[k] /= sum;
}

template <typename scalar_t>
void fwd_impl(const Dims& d, const scalar_t* H, const int32_t* ids, const scalar_t* c, const scalar_t* V,
              int64_t top_k, double s_g, double s_u, scalar_t* HG, scalar_t* G) {
  at::parallel_for(0, d.T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> lg(d.K);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* h = H + t * d.RH;
      scalar_t* o = HG + t * d.RE;
      const int64_t u = ids[t];
      const scalar_t* z = u >= 0 ? h + d.Kr + u * d.r_u : nullptr;
      if (d.r_u) {
        std::fill(o + d.Kr, o + d.RE, scalar_t(0));
        if (z)
          for (int64_t j = 0; j < d.r_u; ++j) o[d.Kr + u * d.r_u + j] = scalar_t(s_u) * z[j];
      }
      if (!d.K) continue;
      for (int64_t k = 0; k < d.K; ++k) {
        scalar_t l = d.router ? h[d.RE + k] : scalar_t(0);
        if (u >= 0 && c) l += c[u * d.K + k];
        if (z && V) {
          const scalar_t* v = V + (u * d.K + k) * d.r_u;
          for (int64_t j = 0; j < d.r_u; ++j) l += v[j] * z[j];
        }
        lg[k] = l;
      }
      scalar_t* g = G + t * d.K;
      gates(lg.data(), d.K, top_k, g);
      for (int64_t k = 0; k < d.K; ++k) {
        const scalar_t a = scalar_t(s_g) * g[k];
        for (int64_t j = 0; j < d.r; ++j) o[k * d.r + j] = a * h[k * d.r + j];
      }
    }
  });
}

template <typename scalar_t>
void bwd_impl(const Dims& d, const scalar_t* H, const scalar_t* E, const scalar_t* G, const scalar_t* DG,
              const int32_t* ids, const scalar_t* V, double s_g, double s_u, scalar_t* DH, scalar_t* DL,
              scalar_t* DC, scalar_t* DV) {
  at::parallel_for(0, d.T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> dg(d.K);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* h = H + t * d.RH;
      const scalar_t* e = E + t * d.RE;
      const scalar_t* g = G + t * d.K;
      scalar_t* o = DH + t * d.RH;
      scalar_t* dl = DL + t * d.K;
      const int64_t u = ids[t];
      if (d.K) {
        scalar_t gdg = 0;
        for (int64_t k = 0; k < d.K; ++k) {
          scalar_t s = 0;
          for (int64_t j = 0; j < d.r; ++j) s += e[k * d.r + j] * h[k * d.r + j];
          dg[k] = scalar_t(s_g) * s + (DG ? DG[t * d.K + k] : scalar_t(0));
          gdg += g[k] * dg[k];
        }
        for (int64_t k = 0; k < d.K; ++k) {
          dl[k] = g[k] * (dg[k] - gdg);
          const scalar_t a = scalar_t(s_g) * g[k];
          for (int64_t j = 0; j < d.r; ++j) o[k * d.r + j] = a * e[k * d.r + j];
          if (d.router) o[d.RE + k] = dl[k];
        }
      }
      if (d.r_u) {
        std::fill(o + d.Kr, o + d.RE, scalar_t(0));
        if (u >= 0) {
          scalar_t* dz = o + d.Kr + u * d.r_u;
          const scalar_t* eu = e + d.Kr + u * d.r_u;
          for (int64_t j = 0; j < d.r_u; ++j) dz[j] = scalar_t(s_u) * eu[j];
          if (V)
            for (int64_t k = 0; k < d.K; ++k) {
              const scalar_t* v = V + (u * d.K + k) * d.r_u;
              for (int64_t j = 0; j < d.r_u; ++j) dz[j] += v[j] * dl[k];
            }
        }
      }
    }
  });
  // Per-user sums, in token order: deterministic.
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t u = ids[t];
    if (u < 0) continue;
    const scalar_t* dl = DL + t * d.K;
    if (DC)
      for (int64_t k = 0; k < d.K; ++k) DC[u * d.K + k] += dl[k];
    if (DV) {
      const scalar_t* z = H + t * d.RH + d.Kr + u * d.r_u;
      for (int64_t k = 0; k < d.K; ++k)
        for (int64_t j = 0; j < d.r_u; ++j) DV[(u * d.K + k) * d.r_u + j] += dl[k] * z[j];
    }
  }
}

void check_users(const Dims& d, const at::Tensor& ids, const c10::optional<at::Tensor>& c,
                 const c10::optional<at::Tensor>& V, at::ScalarType dtype) {
  check_ids(ids, d.T);
  if (c) check_2d(*c, "c", d.N, d.K, dtype);
  if (V) {
    TORCH_CHECK(d.r_u > 0, "V needs user codes (r_u > 0)");
    TORCH_CHECK(V->dim() == 3 && V->size(0) == d.N && V->size(1) == d.K && V->size(2) == d.r_u,
                "V must have shape [", d.N, ", ", d.K, ", ", d.r_u, "], got ", V->sizes());
    TORCH_CHECK(V->scalar_type() == dtype && V->is_contiguous() && V->device().is_cpu(),
                "V must be a contiguous CPU tensor of H's dtype");
  }
  // A user id out of range would read past c, V and the code blocks.
  const int32_t* p = ids.data_ptr<int32_t>();
  for (int64_t t = 0; t < d.T; ++t)
    TORCH_CHECK(p[t] >= -1 && p[t] < d.N, "ids[", t, "] = ", p[t], " is outside [-1, ", d.N, ")");
}

std::tuple<at::Tensor, at::Tensor> wide_forward(const at::Tensor& H, const at::Tensor& ids,
                                                const c10::optional<at::Tensor>& c,
                                                const c10::optional<at::Tensor>& V, int64_t K, int64_t r,
                                                int64_t r_u, int64_t N, bool router, int64_t top_k, double s_g,
                                                double s_u) {
  const Dims d = dims_of(H, K, r, r_u, N, router);
  check_users(d, ids, c, V, H.scalar_type());
  at::Tensor HG = at::empty({d.T, d.RE}, H.options());
  at::Tensor G = at::empty({d.T, d.K}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "wide_forward", [&] {
    fwd_impl<scalar_t>(d, H.data_ptr<scalar_t>(), ids.data_ptr<int32_t>(), c ? c->data_ptr<scalar_t>() : nullptr,
                       V ? V->data_ptr<scalar_t>() : nullptr, top_k, s_g, s_u, HG.data_ptr<scalar_t>(),
                       G.data_ptr<scalar_t>());
  });
  return {HG, G};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wide_backward(
    const at::Tensor& H, const at::Tensor& E, const at::Tensor& G, const c10::optional<at::Tensor>& dg,
    const at::Tensor& ids, const c10::optional<at::Tensor>& V, int64_t K, int64_t r, int64_t r_u, int64_t N,
    bool router, double s_g, double s_u, bool need_dc, bool need_dV) {
  const Dims d = dims_of(H, K, r, r_u, N, router);
  const auto dtype = H.scalar_type();
  check_users(d, ids, c10::nullopt, V, dtype);
  check_2d(E, "e", d.T, d.RE, dtype);
  check_2d(G, "g", d.T, d.K, dtype);
  if (dg) check_2d(*dg, "dg", d.T, d.K, dtype);
  TORCH_CHECK(!need_dV || V, "need_dV needs V");
  at::Tensor DH = at::empty({d.T, d.RH}, H.options());
  at::Tensor DL = at::empty({d.T, d.K}, H.options());
  at::Tensor DC = need_dc ? at::zeros({d.N, d.K}, H.options()) : at::empty({0}, H.options());
  at::Tensor DV = need_dV ? at::zeros({d.N, d.K, d.r_u}, H.options()) : at::empty({0}, H.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "wide_backward", [&] {
    bwd_impl<scalar_t>(d, H.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                       dg ? dg->data_ptr<scalar_t>() : nullptr, ids.data_ptr<int32_t>(),
                       V ? V->data_ptr<scalar_t>() : nullptr, s_g, s_u, DH.data_ptr<scalar_t>(),
                       DL.data_ptr<scalar_t>(), need_dc ? DC.data_ptr<scalar_t>() : nullptr,
                       need_dV ? DV.data_ptr<scalar_t>() : nullptr);
  });
  return {DH, DL, DC, DV};
}

// The GEMM operands of the wide variant in dtype `dtype`: S = [A_cat; A_u of all users;
// W_r] ([K r + N r_u (+ K), d_in]) and E = [B_cat | B_u of all users] ([d_out, K r +
// N r_u]), each block copied once from the tensors' own layouts (E's rows gather
// `rank`-long runs: B[m, o, :] is E[o, m rank : (m + 1) rank]).
std::tuple<at::Tensor, at::Tensor> wide_pack(const c10::optional<at::Tensor>& A_g,
                                             const c10::optional<at::Tensor>& B_g,
                                             const c10::optional<at::Tensor>& W_r,
                                             const c10::optional<at::Tensor>& A_u,
                                             const c10::optional<at::Tensor>& B_u, at::ScalarType dtype) {
  TORCH_CHECK(A_g.has_value() == B_g.has_value() && A_u.has_value() == B_u.has_value(),
              "A and B come in pairs");
  TORCH_CHECK(A_g || A_u, "wide_pack needs experts or user LoRAs");
  const at::Tensor& A0 = A_g ? *A_g : *A_u;
  const at::Tensor& B0 = B_g ? *B_g : *B_u;
  const int64_t d_in = A0.size(-1), d_out = B0.size(1);
  int64_t rows = 0, cols = 0;
  for (const auto* t : {&A_g, &A_u})
    if (*t) {
      TORCH_CHECK((*t)->dim() == 3 && (*t)->size(2) == d_in, "A must be [M, rank, d_in]");
      rows += (*t)->size(0) * (*t)->size(1);
    }
  for (const auto* t : {&B_g, &B_u})
    if (*t) {
      TORCH_CHECK((*t)->dim() == 3 && (*t)->size(1) == d_out, "B must be [M, d_out, rank]");
      cols += (*t)->size(0) * (*t)->size(2);
    }
  TORCH_CHECK(rows == cols, "A and B ranks differ");
  if (W_r) TORCH_CHECK(W_r->dim() == 2 && W_r->size(1) == d_in, "W_r must be [K, d_in]");
  const int64_t K = W_r ? W_r->size(0) : 0;
  auto opts = A0.options().dtype(dtype);
  at::Tensor S = at::empty({rows + K, d_in}, opts);
  at::Tensor E = at::empty({d_out, cols}, opts);
  int64_t row = 0;
  for (const auto* src : {&A_g, &A_u, &W_r}) {
    if (!*src) continue;
    const at::Tensor& A = **src;
    const int64_t n = A.numel() / d_in;
    at::Tensor dst = S.narrow(0, row, n);
    if (A.is_contiguous() && A.scalar_type() == dtype)
      std::memcpy(dst.data_ptr(), A.data_ptr(), A.nbytes());
    else
      dst.copy_(A.reshape({n, d_in}));
    row += n;
  }
  int64_t col = 0;
  for (const auto* pair : {&B_g, &B_u}) {
    if (!*pair) continue;
    const at::Tensor& B = **pair;
    const int64_t M = B.size(0), rank = B.size(2);
    if (B.is_contiguous() && B.scalar_type() == dtype) {
      AT_DISPATCH_FLOATING_TYPES(dtype, "wide_pack", [&] {
        const scalar_t* src = B.data_ptr<scalar_t>();
        scalar_t* out = E.data_ptr<scalar_t>() + col;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t o = 0; o < d_out; ++o)
            std::memcpy(out + o * cols + m * rank, src + (m * d_out + o) * rank, rank * sizeof(scalar_t));
      });
    } else {
      E.narrow(1, col, M * rank).view({d_out, M, rank}).copy_(B.permute({1, 0, 2}));
    }
    col += M * rank;
  }
  return {S, E};
}

// One wide layer: y = x W0^T + b + HG E^T with H = x S^T and (HG, g) = wide_forward(H).
// x, W0, b, S, E in the compute dtype. Returns (y, H, HG, g).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wide_layer_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& W0, const c10::optional<at::Tensor>& b,
    const at::Tensor& S, const at::Tensor& E, const at::Tensor& ids, const c10::optional<at::Tensor>& c,
    const c10::optional<at::Tensor>& V, int64_t K, int64_t r, int64_t r_u, int64_t N, bool router, int64_t top_k,
    double s_g, double s_u) {
  TORCH_CHECK(x.dim() == 2 && S.dim() == 2 && E.dim() == 2 && S.size(1) == x.size(1),
              "x [T, d_in], S [R, d_in] and E [d_out, R'] expected");
  const int64_t T = x.size(0), d_out = E.size(0);
  at::Tensor y;
  if (W0)
    y = at::linear(x, *W0, b);
  else if (b)
    y = b->expand({T, d_out}).clone();
  else
    y = at::zeros({T, d_out}, x.options());
  at::Tensor H = at::mm(x, S.t());
  auto [HG, G] = wide_forward(H, ids, c, V, K, r, r_u, N, router, top_k, s_g, s_u);
  y.addmm_(HG, E.t());
  return {y, H, HG, G};
}

// Its backward without the base weight's own gradients: (dx, dS = dH^T x, dE = dy^T HG,
// dc, dV), each undefined where not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wide_layer_backward(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& W0, const at::Tensor& S,
    const at::Tensor& E, const at::Tensor& H, const at::Tensor& HG, const at::Tensor& G,
    const c10::optional<at::Tensor>& dg, const at::Tensor& ids, const c10::optional<at::Tensor>& V, int64_t K,
    int64_t r, int64_t r_u, int64_t N, bool router, double s_g, double s_u, bool need_x, bool need_S, bool need_E,
    bool need_dc, bool need_dV) {
  at::Tensor dE = need_E ? at::mm(dy.t(), HG) : at::Tensor();
  at::Tensor e = at::mm(dy, E);
  auto [dH, dl, dc, dV] = wide_backward(H, e, G, dg, ids, V, K, r, r_u, N, router, s_g, s_u, need_dc, need_dV);
  at::Tensor dx;
  if (need_x) {
    dx = W0 ? at::mm(dy, *W0) : at::zeros({x.size(0), x.size(1)}, x.options());
    dx.addmm_(dH, S);
  }
  at::Tensor dS = need_S ? at::mm(dH.t(), x) : at::Tensor();
  return {dx, dS, dE, need_dc ? dc : at::Tensor(), need_dV ? dV : at::Tensor()};
}

// The wide layer with its autograd in C++: inputs x, W0, b, then the 7 adapter
// tensors (A_g, B_g, W_r, c, A_u, B_u, V: gradients flow to them), then their packed
// forms (S, E, and c, V in the compute dtype: read, never differentiated), the ids and
// the sizes. Every floating input is in one dtype (float32 or float64). Outputs y, g.
class WideLayerFunction : public torch::autograd::Function<WideLayerFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& W0,
      const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& A_g, const c10::optional<at::Tensor>& B_g,
      const c10::optional<at::Tensor>& W_r, const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& A_u,
      const c10::optional<at::Tensor>& B_u, const c10::optional<at::Tensor>& V, const at::Tensor& S,
      const at::Tensor& E, const c10::optional<at::Tensor>& c_cd, const c10::optional<at::Tensor>& V_cd,
      const at::Tensor& ids, int64_t K, int64_t r, int64_t r_u, int64_t N, int64_t top_k, double s_g, double s_u) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool router = W_r.has_value();
    auto [y, H, HG, G] = wide_layer_forward(x, W0, b, S, E, ids, c_cd, V_cd, K, r, r_u, N, router, top_k, s_g, s_u);
    ctx->save_for_backward({x, W0 ? *W0 : at::Tensor(), S, E, H, HG, G, ids, V_cd ? *V_cd : at::Tensor()});
    ctx->saved_data["sizes"] = std::vector<int64_t>{K, r, r_u, N, router, c.has_value()};
    // needs_input_grad counts the tensors given (an absent optional is no input):
    // the index of each of the 10 differentiable arguments among them, or -1.
    std::vector<int64_t> index;
    int64_t given = 0;
    for (bool present : {true, W0.has_value(), b.has_value(), A_g.has_value(), B_g.has_value(), W_r.has_value(),
                         c.has_value(), A_u.has_value(), B_u.has_value(), V.has_value()})
      index.push_back(present ? given++ : -1);
    ctx->saved_data["index"] = index;
    ctx->saved_data["scales"] = std::vector<double>{s_g, s_u};
    return {y, G};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &W0 = saved[1], &S = saved[2], &E = saved[3], &H = saved[4], &HG = saved[5],
                     &G = saved[6], &ids = saved[7], &V = saved[8];
    const auto sz = ctx->saved_data["sizes"].toIntVector();
    const auto sc = ctx->saved_data["scales"].toDoubleVector();
    const int64_t K = sz[0], r = sz[1], r_u = sz[2], N = sz[3], Kr = K * r, R = E.size(1);
    const bool router = sz[4], has_c = sz[5];
    const auto index = ctx->saved_data["index"].toIntVector();
    auto need = [&](int i) { return index[i] >= 0 && ctx->needs_input_grad(index[i]); };
    at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros({x.size(0), E.size(0)}, x.options());
    c10::optional<at::Tensor> dg;
    if (grads[1].defined() && K) dg = grads[1].contiguous();
    const bool need_S = need(3) || need(7) || need(5), need_E = need(4) || need(8);
    if (!need_S && !need_E && !need(0) && !need(6) && !need(9) && !need(1) && !need(2))
      return torch::autograd::variable_list(22);
    auto [dx, dS, dE, dc, dV] = wide_layer_backward(
        dy, x, W0.defined() ? c10::optional<at::Tensor>(W0) : c10::nullopt, S, E, H, HG, G, dg, ids,
        V.defined() ? c10::optional<at::Tensor>(V) : c10::nullopt, K, r, r_u, N, router, sc[0], sc[1], need(0), need_S,
        need_E, need(6) && has_c, need(9) && V.defined());
    const int64_t d_in = x.size(1), d_out = E.size(0);
    torch::autograd::variable_list out(22);
    if (need(0)) out[0] = dx;
    if (need(1)) out[1] = at::mm(dy.t(), x);
    if (need(2)) out[2] = dy.sum(0);
    if (need(3) && K) out[3] = dS.narrow(0, 0, Kr).view({K, r, d_in});
    if (need(4) && K) out[4] = dE.narrow(1, 0, Kr).view({d_out, K, r}).permute({1, 0, 2});
    if (need(5) && router) out[5] = dS.narrow(0, R, K);
    if (need(6)) out[6] = dc;
    if (need(7) && r_u) out[7] = dS.narrow(0, Kr, N * r_u).view({N, r_u, d_in});
    if (need(8) && r_u) out[8] = dE.narrow(1, Kr, N * r_u).view({d_out, N, r_u}).permute({1, 0, 2});
    if (need(9)) out[9] = dV;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> wide_layer(
    const at::Tensor& x, const c10::optional<at::Tensor>& W0, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& A_g, const c10::optional<at::Tensor>& B_g, const c10::optional<at::Tensor>& W_r,
    const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& A_u, const c10::optional<at::Tensor>& B_u,
    const c10::optional<at::Tensor>& V, const at::Tensor& S, const at::Tensor& E,
    const c10::optional<at::Tensor>& c_cd, const c10::optional<at::Tensor>& V_cd, const at::Tensor& ids, int64_t K,
    int64_t r, int64_t r_u, int64_t N, int64_t top_k, double s_g, double s_u) {
  auto out = WideLayerFunction::apply(x, W0, b, A_g, B_g, W_r, c, A_u, B_u, V, S, E, c_cd, V_cd, ids, K, r, r_u, N,
                                      top_k, s_g, s_u);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(proper_kernels_cpu, m) {
  m.def(
      "wide_layer(Tensor x, Tensor? W0, Tensor? b, Tensor? A_g, Tensor? B_g, Tensor? W_r, Tensor? c, Tensor? A_u, "
      "Tensor? B_u, Tensor? V, Tensor S, Tensor E, Tensor? c_cd, Tensor? V_cd, Tensor ids, int K, int r, int r_u, "
      "int N, int top_k, float s_g, float s_u) -> (Tensor, Tensor)");
  m.def(
      "wide_layer_forward(Tensor x, Tensor? W0, Tensor? b, Tensor S, Tensor E, Tensor ids, Tensor? c, Tensor? V, "
      "int K, int r, int r_u, int N, bool router, int top_k, float s_g, float s_u) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "wide_layer_backward(Tensor dy, Tensor x, Tensor? W0, Tensor S, Tensor E, Tensor H, Tensor HG, Tensor g, "
      "Tensor? dg, Tensor ids, Tensor? V, int K, int r, int r_u, int N, bool router, float s_g, float s_u, "
      "bool need_x, bool need_S, bool need_E, bool need_dc, bool need_dV) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "wide_pack(Tensor? A_g, Tensor? B_g, Tensor? W_r, Tensor? A_u, Tensor? B_u, ScalarType dtype) -> "
      "(Tensor, Tensor)");
  m.def(
      "wide_forward(Tensor H, Tensor ids, Tensor? c, Tensor? V, int K, int r, int r_u, int N, bool router, "
      "int top_k, float s_g, float s_u) -> (Tensor, Tensor)");
  m.def(
      "wide_backward(Tensor H, Tensor e, Tensor g, Tensor? dg, Tensor ids, Tensor? V, int K, int r, int r_u, "
      "int N, bool router, float s_g, float s_u, bool need_dc, bool need_dV) -> (Tensor, Tensor, Tensor, Tensor)");
}

// wide_layer's autograd is WideLayerFunction: the op is one autograd node, whatever runs
// inside. The others are its parts, differentiated by it (or by the Python
// TorchMixtureFunction): autograd passes through them and leaves their outputs out of
// the graph.
TORCH_LIBRARY_IMPL(proper_kernels_cpu, CompositeImplicitAutograd, m) { m.impl("wide_layer", &wide_layer); }

TORCH_LIBRARY_IMPL(proper_kernels_cpu, Autograd, m) {
  for (const char* name : {"wide_pack", "wide_forward", "wide_backward", "wide_layer_forward", "wide_layer_backward"})
    m.impl(name, torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(proper_kernels_cpu, CPU, m) {
  m.impl("wide_pack", &wide_pack);
  m.impl("wide_layer_forward", &wide_layer_forward);
  m.impl("wide_layer_backward", &wide_layer_backward);
  m.impl("wide_forward", &wide_forward);
  m.impl("wide_backward", &wide_backward);
}

// A Python module of no attributes: importing proper_kernels._cpu loads this library,
// whose static initialisers register the ops above.
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu", "CPU kernels of proper_kernels (torch.ops.proper_kernels_cpu)",
                              -1, nullptr};
PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
