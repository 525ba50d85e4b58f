// CPU kernels of the torch backend's wide variant (proper_kernels/ops/torch_backend.py).
//
// The wide variant's math: every token against every user of the bank, each token
// keeping its own user's terms. On the CPU the kernels skip the masked zeros: the group
// part (K experts, dense for every token) runs as ATen GEMMs, the user part as one
// gathered matrix-vector product per token on its own user's rows (as Punica's BGMV), so
// its cost follows the tokens, not the bank. For a token t of user u = ids[t] (-1: no
// user), with h = A_cat x_t and the router's l = W_r x_t from one GEMM:
//
//   forward:  z = A_u x_t                       (zero without a user)
//             g = softmax(l + c_u + V_u z)      (over the top_k logits when 0 < top_k < K)
//             y_t = W0 x_t + b + s_g B_cat (g (.) h) + s_u B_u z
//   backward: e_g = B_cat^T dy_t, e_u = B_u^T dy_t
//             dg_k = s_g <e_g,k, h_k> + dg_ext_k,  dl = g (dg - <g, dg>)
//             dh = s_g g (.) e_g,  dz = s_u e_u + V_u^T dl
//             dx_t = W0^T dy_t + [A_cat; W_r]^T [dh; dl] + A_u^T dz
//             dA_u += dz x_t^T, dB_u += s_u dy_t z^T, dc_u += dl, dV_u += dl z^T
//
// The per-user sums run over the tokens in order, so they are deterministic. Everything
// runs in the dtype of x (the compute dtype: float32 or float64). wide_pack lays the
// experts out for their GEMMs once: Sg = [A_cat; W_r], Eg = B_cat ([d_out, K r]); the
// user tensors are read in their own layouts (A_u [N, r_u, d_in], B_u [N, d_out, r_u],
// contiguous), each token's products on its own user's contiguous rows.
// wide_layer is the layer with its autograd node; the other ops are its parts.
// Registered as torch.ops.proper_kernels_cpu.*; importing proper_kernels._cpu loads them.
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
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using OptTensor = c10::optional<at::Tensor>;

// Tokens per parallel chunk: below it one thread does the whole batch.
constexpr int64_t kGrain = 16;

// Vector helpers, built for AVX2+FMA and for the baseline ISA; the loader picks one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PK_VECTOR __attribute__((target_clones("arch=haswell", "default")))
#else
#define PK_VECTOR
#endif

// Eight partial sums: a reduction the compiler can keep in one vector register.
template <typename T>
inline T dot_impl(const T* a, const T* b, int64_t n) {
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
  T out = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}
PK_VECTOR float dot(const float* a, const float* b, int64_t n) { return dot_impl(a, b, n); }
PK_VECTOR double dot(const double* a, const double* b, int64_t n) { return dot_impl(a, b, n); }
// y += a x
PK_VECTOR void axpy(float* y, const float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
PK_VECTOR void axpy(double* y, const double* x, double a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// On one user's B [m, n] (row-major: B_u[u] is [d_out, r_u]):
//   y[m] += a B z       (the expand of the code z)
//   e[n] += B^T v       (B^T of an output gradient v)
//   D[m, n] += a v z^T  (B's own gradient)
// n is a LoRA rank: the common ones get loops of a fixed length, which the compiler
// unrolls into vector registers.
template <int R, typename T>
inline void gemv_fixed(T* y, const T* B, const T* z, int64_t m, T a) {
  for (int64_t o = 0; o < m; ++o) {
    T s = 0;
    for (int j = 0; j < R; ++j) s += B[o * R + j] * z[j];
    y[o] += a * s;
  }
}
template <int R, typename T>
inline void gemv_t_fixed(T* e, const T* B, const T* v, int64_t m) {
  T acc[R] = {};
  for (int64_t o = 0; o < m; ++o)
    for (int j = 0; j < R; ++j) acc[j] += B[o * R + j] * v[o];
  for (int j = 0; j < R; ++j) e[j] += acc[j];
}
template <int R, typename T>
inline void ger_fixed(T* D, const T* v, const T* z, int64_t m, T a) {
  T za[R];
  for (int j = 0; j < R; ++j) za[j] = a * z[j];
  for (int64_t o = 0; o < m; ++o)
    for (int j = 0; j < R; ++j) D[o * R + j] += v[o] * za[j];
}
// f(std::integral_constant<int, n>) for the common LoRA ranks; false for the others.
template <typename F>
inline bool with_rank(int64_t n, F&& f) {
  switch (n) {
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 16: f(std::integral_constant<int, 16>{}); return true;
    case 32: f(std::integral_constant<int, 32>{}); return true;
  }
  return false;
}
template <typename T>
inline void gemv_impl(T* y, const T* B, const T* z, int64_t m, int64_t n, T a) {
  if (with_rank(n, [&](auto R) { gemv_fixed<R()>(y, B, z, m, a); })) return;
  for (int64_t o = 0; o < m; ++o) y[o] += a * dot_impl(B + o * n, z, n);
}
template <typename T>
inline void gemv_t_impl(T* e, const T* B, const T* v, int64_t m, int64_t n) {
  if (with_rank(n, [&](auto R) { gemv_t_fixed<R()>(e, B, v, m); })) return;
  for (int64_t o = 0; o < m; ++o)
    for (int64_t j = 0; j < n; ++j) e[j] += B[o * n + j] * v[o];
}
template <typename T>
inline void ger_impl(T* D, const T* v, const T* z, int64_t m, int64_t n, T a) {
  if (with_rank(n, [&](auto R) { ger_fixed<R()>(D, v, z, m, a); })) return;
  for (int64_t o = 0; o < m; ++o)
    for (int64_t j = 0; j < n; ++j) D[o * n + j] += a * v[o] * z[j];
}
PK_VECTOR void gemv(float* y, const float* B, const float* z, int64_t m, int64_t n, float a) { gemv_impl(y, B, z, m, n, a); }
PK_VECTOR void gemv(double* y, const double* B, const double* z, int64_t m, int64_t n, double a) { gemv_impl(y, B, z, m, n, a); }
PK_VECTOR void gemv_t(float* e, const float* B, const float* v, int64_t m, int64_t n) { gemv_t_impl(e, B, v, m, n); }
PK_VECTOR void gemv_t(double* e, const double* B, const double* v, int64_t m, int64_t n) { gemv_t_impl(e, B, v, m, n); }
PK_VECTOR void ger(float* D, const float* v, const float* z, int64_t m, int64_t n, float a) { ger_impl(D, v, z, m, n, a); }
PK_VECTOR void ger(double* D, const double* v, const double* z, int64_t m, int64_t n, double a) { ger_impl(D, v, z, m, n, a); }

// The gates of one token from its logits lg[0..K): softmax over all of them, or over
// the top_k largest (ties keep the lower index, as a stable descending sort does).
template <typename T>
void gates(const T* lg, int64_t K, int64_t top_k, T* g) {
  const bool sparse = top_k > 0 && top_k < K;
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) {
    bool keep = true;
    if (sparse) {
      int64_t rank = 0;
      for (int64_t q = 0; q < K; ++q) rank += (lg[q] > lg[k]) || (lg[q] == lg[k] && q < k);
      keep = rank < top_k;
    }
    g[k] = keep ? T(1) : T(0);
    if (keep) m = std::max(m, lg[k]);
  }
  T sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    g[k] = g[k] != T(0) ? std::exp(lg[k] - m) : T(0);
    sum += g[k];
  }
  for (int64_t k = 0; k < K; ++k) g[k] /= sum;
}

// The sizes of a call, and the checks that keep every read in bounds.
struct Dims {
  int64_t T, d_in, d_out, K, r, Kr, RH, r_u, N;
  bool router;
};

void expect(const OptTensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype, bool contiguous = true) {
  if (!t) return;
  TORCH_CHECK(t->sizes() == shape, name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, name, " must be ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(!contiguous || t->is_contiguous(), name, " must be contiguous");
}

Dims check(const at::Tensor& x, const OptTensor& W0, const OptTensor& b, const OptTensor& Sg, const OptTensor& Eg,
           const OptTensor& A_u, const OptTensor& B_u, const at::Tensor& ids, const OptTensor& c, const OptTensor& V,
           int64_t K, int64_t r, int64_t r_u, int64_t N, int64_t d_out, bool router, bool transposed = false) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous 2-D CPU tensor");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "x must be float32 or float64, got ", dt);
  TORCH_CHECK(K >= 0 && r >= 0 && r_u >= 0 && N >= 0 && d_out >= 0, "K, r, r_u, N and d_out must be >= 0");
  Dims d{x.size(0), x.size(1), d_out, K, r, K * r, K * r + (router ? K : 0), r_u, N, router};
  TORCH_CHECK(!W0 || (W0->dim() == 2 && W0->size(0) == d_out && W0->size(1) == d.d_in && W0->scalar_type() == dt &&
                      W0->device().is_cpu()),
              "W0 must be a CPU tensor [", d_out, ", ", d.d_in, "] of x's dtype");
  TORCH_CHECK(!b || (b->dim() == 1 && b->size(0) == d_out && b->scalar_type() == dt && b->device().is_cpu()),
              "b must be a CPU tensor [", d_out, "] of x's dtype");
  TORCH_CHECK(Sg.has_value() == (K > 0) && Eg.has_value() == (K > 0), "Sg and Eg come with experts (K > 0)");
  expect(Sg, "Sg", {d.RH, d.d_in}, dt);
  expect(Eg, "Eg", {d_out, d.Kr}, dt);
  TORCH_CHECK(A_u.has_value() == (r_u > 0) && B_u.has_value() == (r_u > 0), "A_u and B_u come with r_u > 0");
  expect(A_u, "A_u", {N, r_u, d.d_in}, dt);
  // transposed: B_u is the view [N, d_out, r_u] of a contiguous [N, r_u, d_out]
  expect(B_u, "B_u", {N, d_out, r_u}, dt, !transposed);
  TORCH_CHECK(!transposed || !B_u || B_u->transpose(1, 2).is_contiguous(), "B_u^T must be contiguous");
  expect(c, "c", {N, K}, dt);
  expect(V, "V", {N, K, r_u}, dt);
  TORCH_CHECK(!(c || V) || K > 0, "c and V need experts");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == d.T && ids.scalar_type() == at::kInt && ids.is_contiguous() &&
                  ids.device().is_cpu(),
              "ids must be a contiguous int32 CPU tensor of shape [", d.T, "], got ", ids.sizes(), " ",
              ids.scalar_type());
  // A user id out of range would read past the user rows.
  const int32_t* p = ids.data_ptr<int32_t>();
  for (int64_t t = 0; t < d.T; ++t)
    TORCH_CHECK(p[t] >= -1 && p[t] < N, "ids[", t, "] = ", p[t], " is outside [-1, ", N, ")");
  return d;
}

template <typename T>
const T* ptr(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

template <typename T>
void forward_tokens(const Dims& d, const T* X, const int32_t* ids, const T* Hg, const T* Au, const T* Bu, const T* C,
                    const T* V, bool transposed, int64_t top_k, T s_g, T s_u, T* Y, T* HGg, T* Z, T* G) {
  at::parallel_for(0, d.T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> lg(d.K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t u = ids[t];
      T* z = Z + t * d.r_u;
      for (int64_t j = 0; j < d.r_u; ++j) z[j] = u >= 0 ? dot(Au + (u * d.r_u + j) * d.d_in, X + t * d.d_in, d.d_in) : T(0);
      if (d.K) {
        const T* h = Hg + t * d.RH;
        for (int64_t k = 0; k < d.K; ++k) {
          T l = d.router ? h[d.Kr + k] : T(0);
          if (u >= 0 && C) l += C[u * d.K + k];
          if (u >= 0 && V) l += dot(V + (u * d.K + k) * d.r_u, z, d.r_u);
          lg[k] = l;
        }
        T* g = G + t * d.K;
        gates(lg.data(), d.K, top_k, g);
        for (int64_t k = 0; k < d.K; ++k)
          for (int64_t i = 0; i < d.r; ++i) HGg[t * d.Kr + k * d.r + i] = s_g * g[k] * h[k * d.r + i];
      }
      if (u >= 0 && d.r_u) {
        const T* Bw = Bu + u * d.d_out * d.r_u;
        if (transposed)  // B_u[u]^T: r_u contiguous rows of d_out
          for (int64_t j = 0; j < d.r_u; ++j) axpy(Y + t * d.d_out, Bw + j * d.d_out, s_u * z[j], d.d_out);
        else
          gemv(Y + t * d.d_out, Bw, z, d.d_out, d.r_u, s_u);
      }
    }
  });
}

// The layer's forward: (y, Hg = x Sg^T, HGg = s_g g (.) h, Z, G); tensors absent from
// the layer come back empty. `transposed`: B_u [N, d_out, r_u] is the transposed view of
// a contiguous [N, r_u, d_out] (the expand then reads contiguous rows of d_out; the
// inference layout).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wide_layer_forward(
    const at::Tensor& x, const OptTensor& W0, const OptTensor& b, const OptTensor& Sg, const OptTensor& Eg,
    const OptTensor& A_u, const OptTensor& B_u, const at::Tensor& ids, const OptTensor& c, const OptTensor& V,
    int64_t K, int64_t r, int64_t r_u, int64_t N, int64_t d_out, bool router, int64_t top_k, double s_g, double s_u,
    bool transposed) {
  at::AutoDispatchBelowADInplaceOrView guard;  // the caller differentiates; nothing is recorded here
  const Dims d = check(x, W0, b, Sg, Eg, A_u, B_u, ids, c, V, K, r, r_u, N, d_out, router, transposed);
  at::Tensor y;
  if (W0)
    y = at::linear(x, *W0, b);
  else if (b)
    y = b->expand({d.T, d_out}).clone();
  else
    y = at::zeros({d.T, d_out}, x.options());
  at::Tensor Hg = K ? at::mm(x, Sg->t()) : at::empty({d.T, 0}, x.options());
  at::Tensor HGg = at::empty({d.T, d.Kr}, x.options());
  at::Tensor Z = at::empty({d.T, r_u}, x.options());
  at::Tensor G = at::empty({d.T, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "wide_layer_forward", [&] {
    forward_tokens<scalar_t>(d, x.data_ptr<scalar_t>(), ids.data_ptr<int32_t>(), Hg.data_ptr<scalar_t>(),
                             ptr<scalar_t>(A_u), ptr<scalar_t>(B_u), ptr<scalar_t>(c), ptr<scalar_t>(V), transposed, top_k,
                             scalar_t(s_g), scalar_t(s_u), y.data_ptr<scalar_t>(), HGg.data_ptr<scalar_t>(),
                             Z.data_ptr<scalar_t>(), G.data_ptr<scalar_t>());
  });
  if (K) y.addmm_(HGg, Eg->t());
  return {y, Hg, HGg, Z, G};
}

// The layer's backward but for W0's and b's own gradients: (dx, dSg = [dh; dl]^T x,
// dEg = dy^T HGg, dA_u, dB_u, dc, dV), each undefined where not asked for.
std::vector<at::Tensor> wide_layer_backward(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& W0, const OptTensor& Sg, const OptTensor& Eg,
    const OptTensor& A_u, const OptTensor& B_u, const at::Tensor& Hg, const at::Tensor& HGg, const at::Tensor& Z,
    const at::Tensor& G, const OptTensor& dg, const at::Tensor& ids, const OptTensor& V, int64_t K, int64_t r,
    int64_t r_u, int64_t N, bool router, double s_g, double s_u, bool need_x, bool need_Sg, bool need_Eg,
    bool need_Au, bool need_Bu, bool need_c, bool need_V) {
  at::AutoDispatchBelowADInplaceOrView guard;  // the caller differentiates; nothing is recorded here
  TORCH_CHECK(dy.dim() == 2, "dy must be 2-D [T, d_out], got ", dy.sizes());
  const int64_t d_out = dy.size(1);
  const Dims d = check(x, W0, c10::nullopt, Sg, Eg, A_u, B_u, ids, c10::nullopt, V, K, r, r_u, N, d_out, router);
  const auto dt = x.scalar_type();
  expect(dy, "dy", {d.T, d_out}, dt, false);
  expect(Hg, "Hg", {d.T, d.RH}, dt);
  expect(HGg, "HGg", {d.T, d.Kr}, dt);
  expect(Z, "Z", {d.T, r_u}, dt);
  expect(G, "g", {d.T, K}, dt);
  expect(dg, "dg", {d.T, K}, dt);
  const at::Tensor dyc = dy.contiguous();
  const auto opts = x.options();
  at::Tensor dEg = need_Eg && K ? at::mm(dyc.t(), HGg) : at::Tensor();
  at::Tensor eg = K ? at::mm(dyc, *Eg) : at::Tensor();
  at::Tensor dx;
  if (need_x) dx = W0 ? at::mm(dyc, *W0) : at::zeros({d.T, d.d_in}, opts);
  at::Tensor dHg = at::empty({d.T, d.RH}, opts), DL = at::empty({d.T, K}, opts), DZ = at::empty({d.T, r_u}, opts);
  at::Tensor dA_u = need_Au && r_u ? at::zeros({N, r_u, d.d_in}, opts) : at::Tensor();
  at::Tensor dB_u = need_Bu && r_u ? at::zeros({N, d_out, r_u}, opts) : at::Tensor();
  at::Tensor dc = need_c && K ? at::zeros({N, K}, opts) : at::Tensor();
  at::Tensor dV = need_V && K && r_u ? at::zeros({N, K, r_u}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "wide_layer_backward", [&] {
    using T = scalar_t;
    const T *X = x.data_ptr<T>(), *DY = dyc.data_ptr<T>(), *H = Hg.data_ptr<T>(), *Zp = Z.data_ptr<T>(),
            *Gp = G.data_ptr<T>(), *EG = K ? eg.data_ptr<T>() : nullptr, *Au = ptr<T>(A_u), *Bu = ptr<T>(B_u),
            *Vp = ptr<T>(V), *DG = dg ? dg->data_ptr<T>() : nullptr;
    const int32_t* id = ids.data_ptr<int32_t>();
    T *DH = dHg.data_ptr<T>(), *dl_all = DL.data_ptr<T>(), *dz_all = DZ.data_ptr<T>();
    T* DX = need_x ? dx.data_ptr<T>() : nullptr;
    const T sg = T(s_g), su = T(s_u);
    // Per token: its own rows only (no two tokens write the same memory).
    at::parallel_for(0, d.T, kGrain, [&](int64_t begin, int64_t end) {
      std::vector<T> dgk(K);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t u = id[t];
        T* dl = dl_all + t * K;
        if (K) {
          const T *e = EG + t * d.Kr, *h = H + t * d.RH, *g = Gp + t * K;
          T gdg = 0;
          for (int64_t k = 0; k < K; ++k) {
            dgk[k] = sg * dot(e + k * r, h + k * r, r) + (DG ? DG[t * K + k] : T(0));
            gdg += g[k] * dgk[k];
          }
          T* o = DH + t * d.RH;
          for (int64_t k = 0; k < K; ++k) {
            dl[k] = g[k] * (dgk[k] - gdg);
            for (int64_t i = 0; i < r; ++i) o[k * r + i] = sg * g[k] * e[k * r + i];
            if (router) o[d.Kr + k] = dl[k];
          }
        }
        T* dz = dz_all + t * r_u;
        std::fill(dz, dz + r_u, T(0));
        if (u < 0 || !r_u) continue;
        gemv_t(dz, Bu + u * d_out * r_u, DY + t * d_out, d_out, r_u);  // B_u^T dy_t
        for (int64_t j = 0; j < r_u; ++j) {
          dz[j] *= su;
          if (Vp)
            for (int64_t k = 0; k < K; ++k) dz[j] += Vp[(u * K + k) * r_u + j] * dl[k];
          if (DX) axpy(DX + t * d.d_in, Au + (u * r_u + j) * d.d_in, dz[j], d.d_in);
        }
      }
    });
    // Per-user sums, in token order: deterministic.
    T *dA = need_Au && r_u ? dA_u.data_ptr<T>() : nullptr, *dB = need_Bu && r_u ? dB_u.data_ptr<T>() : nullptr;
    T *dC = dc.defined() ? dc.data_ptr<T>() : nullptr, *dVp = dV.defined() ? dV.data_ptr<T>() : nullptr;
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t u = id[t];
      if (u < 0) continue;
      const T *z = Zp + t * r_u, *dz = dz_all + t * r_u, *dl = dl_all + t * K;
      if (dA)
        for (int64_t j = 0; j < r_u; ++j) axpy(dA + (u * r_u + j) * d.d_in, X + t * d.d_in, dz[j], d.d_in);
      if (dB) ger(dB + u * d_out * r_u, DY + t * d_out, z, d_out, r_u, su);
      if (dC)
        for (int64_t k = 0; k < K; ++k) dC[u * K + k] += dl[k];
      if (dVp)
        for (int64_t k = 0; k < K; ++k) axpy(dVp + (u * K + k) * r_u, z, dl[k], r_u);
    }
  });
  at::Tensor dSg;
  if (K) {
    if (need_x) dx.addmm_(dHg, *Sg);
    if (need_Sg) dSg = at::mm(dHg.t(), x);
  }
  return {dx, dSg, dEg, dA_u, dB_u, dc, dV};
}

// The experts' GEMM operands in `dtype`: Sg = [A_cat; W_r] ([K r (+ K), d_in]) and
// Eg = B_cat ([d_out, K r]), each copied once from the tensors' own layouts.
std::tuple<at::Tensor, at::Tensor> wide_pack(const at::Tensor& A_g, const at::Tensor& B_g, const OptTensor& W_r,
                                             at::ScalarType dtype) {
  at::AutoDispatchBelowADInplaceOrView guard;  // layouts, read by the kernels: never differentiated
  TORCH_CHECK(A_g.dim() == 3 && B_g.dim() == 3 && B_g.size(0) == A_g.size(0) && B_g.size(2) == A_g.size(1),
              "A_g [K, r, d_in] and B_g [K, d_out, r] expected");
  const int64_t K = A_g.size(0), r = A_g.size(1), d_in = A_g.size(2), d_out = B_g.size(1);
  TORCH_CHECK(!W_r || (W_r->dim() == 2 && W_r->size(0) == K && W_r->size(1) == d_in), "W_r must be [K, d_in]");
  at::Tensor Sg = at::empty({K * r + (W_r ? K : 0), d_in}, A_g.options().dtype(dtype));
  Sg.narrow(0, 0, K * r).copy_(A_g.reshape({K * r, d_in}));
  if (W_r) Sg.narrow(0, K * r, K).copy_(*W_r);
  at::Tensor Eg = at::empty({d_out, K, r}, Sg.options());
  Eg.copy_(B_g.permute({1, 0, 2}));
  return {Sg, Eg.view({d_out, K * r})};
}

// The layer with its autograd in C++: inputs x, W0, b, then the 7 adapter tensors (A_g,
// B_g, W_r, c, A_u, B_u, V: the gradients go to them; the user ones contiguous), then
// wide_pack's layouts (read, never differentiated), the ids and the sizes. Every
// floating input is in x's dtype (float32 or float64). Outputs y and the gates.
class WideLayerFunction : public torch::autograd::Function<WideLayerFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const OptTensor& W0, const OptTensor& b,
      const OptTensor& A_g, const OptTensor& B_g, const OptTensor& W_r, const OptTensor& c, const OptTensor& A_u,
      const OptTensor& B_u, const OptTensor& V, const OptTensor& Sg, const OptTensor& Eg, const at::Tensor& ids,
      int64_t K, int64_t r, int64_t r_u, int64_t N, int64_t d_out, int64_t top_k, double s_g, double s_u) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, Hg, HGg, Z, G] =
        wide_layer_forward(x, W0, b, Sg, Eg, A_u, B_u, ids, c, V, K, r, r_u, N, d_out, W_r.has_value(), top_k, s_g, s_u,
                           false);
    auto opt = [](const OptTensor& t) { return t ? *t : at::Tensor(); };
    ctx->save_for_backward({x, opt(W0), opt(Sg), opt(Eg), opt(A_u), opt(B_u), Hg, HGg, Z, G, ids, opt(V)});
    // needs_input_grad counts the tensors given (an absent optional is no input): the
    // index of each of the 10 differentiable arguments among them, or -1.
    std::vector<int64_t> index;
    int64_t given = 0;
    for (bool present : {true, W0.has_value(), b.has_value(), A_g.has_value(), B_g.has_value(), W_r.has_value(),
                         c.has_value(), A_u.has_value(), B_u.has_value(), V.has_value()})
      index.push_back(present ? given++ : -1);
    ctx->saved_data["index"] = index;
    ctx->saved_data["sizes"] = std::vector<int64_t>{K, r, r_u, N, W_r.has_value()};
    ctx->saved_data["scales"] = std::vector<double>{s_g, s_u};
    return {y, G};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The per-token loops are invisible to autograd: a graph of this backward would
    // give wrong second derivatives, so none is built (as @once_differentiable refuses).
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "proper_kernels' CPU kernels differentiate once: a backward with create_graph=True (higher-order "
                "gradients) needs backend='reference' (or PROPER_KERNELS_CPU_KERNELS=0, whose torch ops also "
                "refuse a second derivative)");
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &Hg = s[6], &HGg = s[7], &Z = s[8], &G = s[9], &ids = s[10];
    auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(c10::nullopt); };
    const auto sz = ctx->saved_data["sizes"].toIntVector();
    const auto sc = ctx->saved_data["scales"].toDoubleVector();
    const auto index = ctx->saved_data["index"].toIntVector();
    const int64_t K = sz[0], r = sz[1], r_u = sz[2], N = sz[3], Kr = K * r, d_in = x.size(1);
    const bool router = sz[4];
    auto need = [&](int i) { return index[i] >= 0 && ctx->needs_input_grad(index[i]); };
    torch::autograd::variable_list out(21);
    bool any = false;
    for (int i = 0; i < 10; ++i) any = any || need(i);
    if (!any) return out;
    const int64_t d_out = s[3].defined() ? s[3].size(0) : (s[5].defined() ? s[5].size(1) : grads[0].size(1));
    at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros({x.size(0), d_out}, x.options());
    OptTensor dg;
    if (grads[1].defined() && K) dg = grads[1].contiguous();
    auto g = wide_layer_backward(dy, x, opt(s[1]), opt(s[2]), opt(s[3]), opt(s[4]), opt(s[5]), Hg, HGg, Z, G, dg,
                                 ids, opt(s[11]), K, r, r_u, N, router, sc[0], sc[1], need(0),
                                 need(3) || need(5), need(4), need(7), need(8), need(6), need(9));
    if (need(0)) out[0] = g[0];
    if (need(1)) out[1] = at::mm(dy.t(), x);
    if (need(2)) out[2] = dy.sum(0);
    if (need(3)) out[3] = g[1].narrow(0, 0, Kr).view({K, r, d_in});
    if (need(4)) out[4] = g[2].view({d_out, K, r}).permute({1, 0, 2});
    if (need(5)) out[5] = g[1].narrow(0, Kr, K);
    if (need(6)) out[6] = g[5];
    if (need(7)) out[7] = g[3];
    if (need(8)) out[8] = g[4];
    if (need(9)) out[9] = g[6];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> wide_layer(const at::Tensor& x, const OptTensor& W0, const OptTensor& b,
                                              const OptTensor& A_g, const OptTensor& B_g, const OptTensor& W_r,
                                              const OptTensor& c, const OptTensor& A_u, const OptTensor& B_u,
                                              const OptTensor& V, const OptTensor& Sg, const OptTensor& Eg,
                                              const at::Tensor& ids, int64_t K, int64_t r, int64_t r_u, int64_t N,
                                              int64_t d_out, int64_t top_k, double s_g, double s_u) {
  auto out = WideLayerFunction::apply(x, W0, b, A_g, B_g, W_r, c, A_u, B_u, V, Sg, Eg, ids, K, r, r_u, N, d_out,
                                      top_k, s_g, s_u);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(proper_kernels_cpu, m) {
  m.def("wide_pack(Tensor A_g, Tensor B_g, Tensor? W_r, ScalarType dtype) -> (Tensor, Tensor)");
  m.def(
      "wide_layer_forward(Tensor x, Tensor? W0, Tensor? b, Tensor? Sg, Tensor? Eg, Tensor? A_u, Tensor? B_u, "
      "Tensor ids, Tensor? c, Tensor? V, int K, int r, int r_u, int N, int d_out, bool router, int top_k, float s_g, "
      "float s_u, bool transposed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "wide_layer_backward(Tensor dy, Tensor x, Tensor? W0, Tensor? Sg, Tensor? Eg, Tensor? A_u, Tensor? B_u, "
      "Tensor Hg, Tensor HGg, Tensor Z, Tensor g, Tensor? dg, Tensor ids, Tensor? V, int K, int r, int r_u, int N, "
      "bool router, float s_g, float s_u, bool need_x, bool need_Sg, bool need_Eg, bool need_Au, bool need_Bu, "
      "bool need_c, bool need_V) -> Tensor[]");
  m.def(
      "wide_layer(Tensor x, Tensor? W0, Tensor? b, Tensor? A_g, Tensor? B_g, Tensor? W_r, Tensor? c, Tensor? A_u, "
      "Tensor? B_u, Tensor? V, Tensor? Sg, Tensor? Eg, Tensor ids, int K, int r, int r_u, int N, int d_out, "
      "int top_k, float s_g, float s_u) -> (Tensor, Tensor)");
}

// wide_layer's autograd is WideLayerFunction: the op is one autograd node, whatever runs
// inside. The others are its parts, differentiated by it: autograd passes them by (and
// they record nothing inside), so their outputs stay out of the graph.
TORCH_LIBRARY_IMPL(proper_kernels_cpu, CompositeImplicitAutograd, m) { m.impl("wide_layer", &wide_layer); }

TORCH_LIBRARY_IMPL(proper_kernels_cpu, Autograd, m) {
  for (const char* name : {"wide_pack", "wide_layer_forward", "wide_layer_backward"})
    m.impl(name, torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(proper_kernels_cpu, CPU, m) {
  m.impl("wide_pack", &wide_pack);
  m.impl("wide_layer_forward", &wide_layer_forward);
  m.impl("wide_layer_backward", &wide_layer_backward);
}

// A Python module of no attributes: importing proper_kernels._cpu loads this library,
// whose static initialisers register the ops above.
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu",
                              "CPU kernels of proper_kernels (torch.ops.proper_kernels_cpu)", -1, nullptr};
PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
