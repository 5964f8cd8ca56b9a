// CPU kernels of the MoS linear op, and the schema of the extension's ops.
//
//   forward:  one pass over the experts builds W_a (n_out, n_in) and b_a, then the vendor GEMM.
//   backward: G = dy^T x by one GEMM; then one pass over the rows of G writes dE (all m slices,
//             zero outside the active slice), dbias and dbeta together, and rebuilds W_a (not
//             saved) from the same expert rows while they are in cache; then dx = dy @ W_a.
//             Rows are split across threads; sums over a row run in a fixed order, so the
//             gradients are bit-identical from run to run.
//
// beta arrives as (n_out, m) with any strides (layer-wise MoS passes a row stride of 0).
// The module's Python bindings are in csrc/mos_linear_autograd.cpp.
#include <torch/extension.h>

#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "mos_dot.h"

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace mos {
namespace {

using at::Tensor;

// out[k] = scale * g[k] for k < n, then zeros up to `width`.
template <typename acc_t, typename scalar_t>
__attribute__((target_clones("avx2,fma", "default")))
void scaled_row(const acc_t* __restrict__ g, acc_t scale, int64_t n, int64_t width,
                scalar_t* __restrict__ out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(scale * g[k]);
  std::fill(out + n, out + width, scalar_t(0));
}

// A fresh allocation over glibc's largest mmap threshold (32 MiB) is a new mapping every call,
// and the first write to each 4 KiB page of it faults, which dominated the m = 6 backward on the
// CPU (docs/results.md). Where the system leaves transparent huge pages to madvise (the usual
// default), asking for them turns those faults into one per 2 MiB. Advice only: errors ignored.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20, kMapped = uintptr_t{32} << 20;
  if (t.nbytes() < kMapped) return;  // smaller buffers are reused from the heap
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

struct Dims {
  int64_t tokens, n_out, n_in, m, n_max, k_max;
};

// A fresh CPU tensor without a trip through the dispatcher (the kernels below allocate several
// per call; at small sizes that is a measurable share of the host time).
Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype);
}

// The mixture's checks; x (tokens, n_in) is checked by check().
Dims check_mixture(const Tensor& experts, const Tensor& beta, const c10::optional<Tensor>& bias,
                   int64_t tokens, int64_t n_in) {
  TORCH_CHECK(experts.dim() == 3, "mos_linear: experts must be (m, N_max, K_max), got ",
              experts.sizes());
  TORCH_CHECK(beta.dim() == 2, "mos_linear: beta must be (n_out, m), got ", beta.sizes());
  Dims d{tokens, beta.size(0), n_in, experts.size(0), experts.size(1), experts.size(2)};
  TORCH_CHECK(beta.size(1) == d.m, "mos_linear: beta must have m = ", d.m, " columns");
  TORCH_CHECK(d.n_in <= d.k_max && d.n_out <= d.n_max, "mos_linear: active slice (", d.n_out,
              ", ", d.n_in, ") exceeds experts ", experts.sizes());
  TORCH_CHECK(experts.scalar_type() == beta.scalar_type(),
              "mos_linear: experts and beta must share one dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == experts.scalar_type(),
                "mos_linear: bias dtype must match the experts'");
    TORCH_CHECK((bias->dim() == 1 && bias->size(0) == d.n_max) ||
                    (bias->dim() == 2 && bias->size(0) == d.m && bias->size(1) == d.n_max),
                "mos_linear: bias must be (N_max,) or (m, N_max), got ", bias->sizes());
  }
  return d;
}

Dims check(const Tensor& x, const Tensor& experts, const Tensor& beta,
           const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "mos_linear: x must be (T, n_in), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == experts.scalar_type(),
              "mos_linear: x, experts and beta must share one dtype");
  return check_mixture(experts, beta, bias, x.size(0), x.size(1));
}

// beta in the accumulation type, contiguous (n_out, m): small, and it frees the loops below from
// strides and conversions.
template <typename scalar_t>
Tensor beta_as_acc(const Tensor& beta) {
  const auto acc_type = c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
  if (beta.scalar_type() == acc_type && beta.is_contiguous()) return beta;  // no op call
  return beta.to(acc_type).contiguous();
}

// One row of W_a: w[k] = sum_i b[i] * e[i * expert_stride + k]. Chunks of kChunk columns are
// summed over the experts in a register-sized buffer and stored once; the clones let the same
// binary use AVX2 and FMA where the CPU has them (plain SSE2 loops were clearly slower at m = 6).
constexpr int64_t kChunk = 64;

template <typename scalar_t, typename acc_t, int64_t kLen>
inline void mix_chunk(const scalar_t* __restrict__ e, int64_t expert_stride,
                      const acc_t* __restrict__ b, int64_t m, int64_t len,
                      scalar_t* __restrict__ w) {
  const int64_t n = kLen > 0 ? kLen : len;  // a constant trip count keeps acc in registers
  acc_t acc[kChunk];
  for (int64_t k = 0; k < n; ++k) acc[k] = b[0] * static_cast<acc_t>(e[k]);
  for (int64_t i = 1; i < m; ++i) {
    const scalar_t* ei = e + i * expert_stride;
    const acc_t bi = b[i];
    for (int64_t k = 0; k < n; ++k) acc[k] += bi * static_cast<acc_t>(ei[k]);
  }
  for (int64_t k = 0; k < n; ++k) w[k] = static_cast<scalar_t>(acc[k]);
}

template <typename scalar_t, typename acc_t>
__attribute__((target_clones("avx2,fma", "default")))
void mix_row(const scalar_t* __restrict__ e, int64_t expert_stride, const acc_t* __restrict__ b,
             int64_t m, int64_t n, scalar_t* __restrict__ w) {
  int64_t k0 = 0;
  for (; k0 + kChunk <= n; k0 += kChunk)
    mix_chunk<scalar_t, acc_t, kChunk>(e + k0, expert_stride, b, m, kChunk, w + k0);
  if (k0 < n) mix_chunk<scalar_t, acc_t, 0>(e + k0, expert_stride, b, m, n - k0, w + k0);
}

// W_a[o, k] = sum_i beta[o, i] E[i, o, k] for o < n_out, k < n_in; b_a likewise for a per-expert
// bias. Rows are independent, so they are split across threads.
template <typename scalar_t>
std::pair<Tensor, Tensor> combine(const Tensor& experts_in, const Tensor& beta,
                                  const c10::optional<Tensor>& bias, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor experts = experts_in.stride(2) == 1 ? experts_in : experts_in.contiguous();
  const Tensor beta_acc = beta_as_acc<scalar_t>(beta);
  Tensor weight = new_cpu({d.n_out, d.n_in}, experts.scalar_type());
  const scalar_t* E = experts.const_data_ptr<scalar_t>();
  const acc_t* B = beta_acc.const_data_ptr<acc_t>();
  scalar_t* W = weight.mutable_data_ptr<scalar_t>();
  const int64_t s0 = experts.stride(0), s1 = experts.stride(1), m = d.m, K = d.n_in;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * m));

  at::parallel_for(0, d.n_out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) mix_row(E + o * s1, s0, B + o * m, m, K, W + o * K);
  });

  Tensor mixed_bias;
  if (bias.has_value() && bias->dim() == 1) {
    mixed_bias = bias->narrow(0, 0, d.n_out);
  } else if (bias.has_value()) {
    const Tensor bias_c = bias->contiguous();
    const scalar_t* Bias = bias_c.const_data_ptr<scalar_t>();
    mixed_bias = new_cpu({d.n_out}, experts.scalar_type());
    scalar_t* b_a = mixed_bias.mutable_data_ptr<scalar_t>();
    for (int64_t o = 0; o < d.n_out; ++o) {
      acc_t acc = 0;
      for (int64_t i = 0; i < m; ++i) acc += B[o * m + i] * static_cast<acc_t>(Bias[i * d.n_max + o]);
      b_a[o] = static_cast<scalar_t>(acc);
    }
  }
  return {weight, mixed_bias};
}

// One strategy here: combine-then-GEMM ("auto" means it too).
void check_strategy(c10::string_view strategy) {
  TORCH_CHECK_VALUE(strategy == "auto" || strategy == "combine",
                    "mos_linear (cpu): strategy must be 'auto' or 'combine', got '", strategy,
                    "'");
}

Tensor forward_cpu(const Tensor& x, const Tensor& experts, const Tensor& beta,
                   const c10::optional<Tensor>& bias, c10::string_view strategy) {
  check_strategy(strategy);
  const Dims d = check(x, experts, beta, bias);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mos_forward", [&] {
    auto [weight, mixed_bias] = combine<scalar_t>(experts, beta, bias, d);
    return mixed_bias.defined() ? at::addmm(mixed_bias, x, weight.t()) : at::mm(x, weight.t());
  });
}

// One pass over the rows o < N_max of the experts' gradient. Row o < n_out, for each expert i:
//   dE[i, o, k]  = beta[o, i] * G[o, k]          (k < n_in; zero for n_in <= k < K_max)
//   dbeta[o, i]  = sum_k G[o, k] E[i, o, k] + s[o] * bias[i, o]
//   dbias[i, o]  = beta[o, i] * s[o]
// and, when `weight` is defined, W_a's row o as combine() writes it (for dx). Rows
// n_out <= o < N_max of dE and dbias are zero. Undefined outputs are skipped.
template <typename scalar_t>
void weight_grad_epilogue(const Tensor& grad_rows, const Tensor& row_sums, const Tensor& experts,
                          const Tensor& beta_acc, const c10::optional<Tensor>& bias, const Dims& d,
                          Tensor& d_experts, Tensor& d_beta, Tensor& d_bias, Tensor& weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool want_e = d_experts.defined(), want_beta = d_beta.defined(), want_bias = d_bias.defined();
  scalar_t* W = weight.defined() ? weight.mutable_data_ptr<scalar_t>() : nullptr;
  const bool expert_bias = bias.has_value() && bias->dim() == 2;
  const acc_t* G = grad_rows.defined() ? grad_rows.const_data_ptr<acc_t>() : nullptr;
  const acc_t* S = row_sums.defined() ? row_sums.const_data_ptr<acc_t>() : nullptr;
  const acc_t* B = beta_acc.const_data_ptr<acc_t>();
  const scalar_t* E = experts.const_data_ptr<scalar_t>();
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  const scalar_t* Bias = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dE = want_e ? d_experts.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* dBeta = want_beta ? d_beta.mutable_data_ptr<acc_t>() : nullptr;
  scalar_t* dBias = want_bias ? d_bias.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t m = d.m, K = d.n_in, k_max = d.k_max, n_max = d.n_max;
  const int64_t s0 = experts.stride(0), s1 = experts.stride(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k_max * m));

  at::parallel_for(0, n_max, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const bool active = o < d.n_out;
      if (W != nullptr && active) mix_row(E + o * s1, s0, B + o * m, m, K, W + o * K);
      for (int64_t i = 0; i < m; ++i) {
        if (want_e)
          scaled_row(active ? G + o * K : G, active ? B[o * m + i] : acc_t(0), active ? K : 0,
                     k_max, dE + (i * n_max + o) * k_max);
        if (want_bias && expert_bias)
          dBias[i * n_max + o] = active ? static_cast<scalar_t>(B[o * m + i] * S[o]) : scalar_t(0);
        if (want_beta && active) {
          acc_t total = dot<acc_t>(G + o * K, E + i * s0 + o * s1, K);
          if (Bias != nullptr && expert_bias) total += S[o] * static_cast<acc_t>(Bias[i * n_max + o]);
          dBeta[o * m + i] = total;
        }
      }
      if (want_bias && !expert_bias) dBias[o] = active ? static_cast<scalar_t>(S[o]) : scalar_t(0);
    }
  });
}

// dE, dbeta and dbias (undefined where not wanted) from G (grad_rows) and the column
// sums of dy (row_sums), both in the accumulation type: the part of the backward that
// backward_cpu and combine_backward_cpu share. A defined `weight` (n_out, n_in) receives W_a.
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> weight_side_grads(const Tensor& grad_rows,
                                                     const Tensor& row_sums, const Tensor& experts,
                                                     const Tensor& beta,
                                                     const c10::optional<Tensor>& bias,
                                                     const Dims& d, bool want_e, bool want_beta,
                                                     bool want_bias, Tensor weight = Tensor()) {
  const auto acc_type = c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
  Tensor e_out = want_e ? new_cpu(experts.sizes(), experts.scalar_type()) : Tensor();
  if (e_out.defined()) advise_huge_pages(e_out);
  Tensor beta_out = want_beta ? new_cpu({d.n_out, d.m}, acc_type) : Tensor();
  Tensor bias_out = want_bias ? new_cpu(bias->sizes(), bias->scalar_type()) : Tensor();
  weight_grad_epilogue<scalar_t>(grad_rows, row_sums, experts, beta_as_acc<scalar_t>(beta), bias,
                                 d, e_out, beta_out, bias_out, weight);
  if (want_beta && acc_type != beta.scalar_type()) beta_out = beta_out.to(beta.scalar_type());
  return {e_out, beta_out, bias_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(const Tensor& dy, const Tensor& x,
                                                        const Tensor& experts_in, const Tensor& beta,
                                                        const c10::optional<Tensor>& bias,
                                                        std::array<bool, 4> needs,
                                                        c10::string_view strategy) {
  check_strategy(strategy);
  const Dims d = check(x, experts_in, beta, bias);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == d.tokens && dy.size(1) == d.n_out,
              "mos_linear backward: dy must be (", d.tokens, ", ", d.n_out, "), got ", dy.sizes());
  const bool want_bias = needs[3] && bias.has_value();
  const Tensor experts = experts_in.stride(2) == 1 ? experts_in : experts_in.contiguous();
  // Gradients not asked for come back undefined (None in Python).
  Tensor d_x, d_experts, d_beta, d_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mos_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    if (!(needs[1] || needs[2] || want_bias)) {
      if (needs[0]) d_x = at::mm(dy, combine<scalar_t>(experts, beta, c10::nullopt, d).first);
      return;
    }
    // The column sums of dy: read for the bias gradient, and for dbeta with a per-expert bias.
    const bool expert_bias = bias.has_value() && bias->dim() == 2;
    Tensor row_sums;
    if (want_bias || (needs[2] && expert_bias))
      row_sums = std::is_same_v<scalar_t, acc_t> ? at::sum(dy, 0)
                                                 : dy.sum(0, /*keepdim=*/false, acc_type);
    Tensor grad_rows;  // G = dy^T x in the accumulation type, (n_out, n_in)
    if (needs[1] || needs[2]) {
      grad_rows = std::is_same_v<scalar_t, acc_t> ? at::mm(dy.t(), x)
                                                  : at::mm(dy.t().to(acc_type), x.to(acc_type));
      grad_rows = grad_rows.contiguous();
    }
    // dx needs W_a again: the epilogue rebuilds it row by row while those expert rows are in
    // cache for dbeta, instead of a separate pass over the m expert slices.
    Tensor weight = needs[0] ? new_cpu({d.n_out, d.n_in}, experts.scalar_type()) : Tensor();
    std::tie(d_experts, d_beta, d_bias) = weight_side_grads<scalar_t>(
        grad_rows, row_sums, experts, beta, bias, d, needs[1], needs[2], want_bias, weight);
    if (needs[0]) d_x = at::mm(dy, weight);
  });
  return {d_x, d_experts, d_beta, d_bias};
}

// W_a (n_out, n_in) and, for a per-expert bias, b_a (n_out,); b_a undefined (None in Python)
// otherwise (a shared bias is sliced by the caller: an op's outputs may not alias its inputs).
std::tuple<Tensor, Tensor> combine_cpu(const Tensor& experts, const Tensor& beta,
                                       const c10::optional<Tensor>& bias, int64_t n_in) {
  const Dims d = check_mixture(experts, beta, bias, 0, n_in);
  const bool expert_bias = bias.has_value() && bias->dim() == 2;
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, experts.scalar_type(),
                                         "mos_combine", [&] {
    const c10::optional<Tensor> mixed = expert_bias ? bias : c10::nullopt;
    auto [weight, mixed_bias] = combine<scalar_t>(experts, beta, mixed, d);
    return std::make_tuple(weight, expert_bias ? mixed_bias : Tensor());
  });
}

// The experts', beta's and per-expert bias's gradients from those of W_a (d_weight, (n_out, n_in))
// and b_a (d_mixed_bias, (n_out,); used only with a per-expert bias): the backward epilogue with
// G = d_weight and the column sums of dy = d_mixed_bias.
std::tuple<Tensor, Tensor, Tensor> combine_backward_cpu(const Tensor& d_weight,
                                                        const c10::optional<Tensor>& d_mixed_bias,
                                                        const Tensor& experts_in,
                                                        const Tensor& beta,
                                                        const c10::optional<Tensor>& bias,
                                                        std::array<bool, 3> needs) {
  TORCH_CHECK(d_weight.dim() == 2, "mos_combine backward: d_weight must be (n_out, n_in), got ",
              d_weight.sizes());
  const Dims d = check_mixture(experts_in, beta, bias, 0, d_weight.size(1));
  TORCH_CHECK(d_weight.size(0) == d.n_out && d_weight.scalar_type() == experts_in.scalar_type(),
              "mos_combine backward: d_weight must be (", d.n_out, ", ", d.n_in, ") ",
              experts_in.scalar_type(), ", got ", d_weight.sizes(), " ", d_weight.scalar_type());
  const bool expert_bias = bias.has_value() && bias->dim() == 2;
  TORCH_CHECK(!expert_bias || (d_mixed_bias.has_value() && d_mixed_bias->dim() == 1 &&
                               d_mixed_bias->size(0) == d.n_out),
              "mos_combine backward: a per-expert bias needs d_mixed_bias of shape (", d.n_out,
              ",)");
  const bool want_bias = needs[2] && expert_bias;
  const Tensor experts = experts_in.stride(2) == 1 ? experts_in : experts_in.contiguous();
  Tensor d_experts, d_beta, d_bias;  // undefined (None in Python) where not wanted
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, experts.scalar_type(),
                                  "mos_combine_backward", [&] {
    const auto acc_type = c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
    if (!(needs[0] || needs[1] || want_bias)) return;
    const Tensor grad_rows = d_weight.to(acc_type).contiguous();
    const Tensor row_sums = expert_bias ? d_mixed_bias->to(acc_type).contiguous() : Tensor();
    std::tie(d_experts, d_beta, d_bias) = weight_side_grads<scalar_t>(
        grad_rows, row_sums, experts, beta, expert_bias ? bias : c10::nullopt, d, needs[0],
        needs[1], want_bias);
  });
  return {d_experts, d_beta, d_bias};
}

}  // namespace

TORCH_LIBRARY(mos_kernels_ext, m) {
  // strategy: "auto", "one_pass" or "combine" (what each device's kernels take is theirs to
  // check). Gradients not asked for in `needs` come back undefined (None in Python).
  m.def("forward(Tensor x, Tensor experts, Tensor beta, Tensor? bias, str strategy='auto') "
        "-> Tensor");
  m.def("backward(Tensor dy, Tensor x, Tensor experts, Tensor beta, Tensor? bias, bool[4] needs, "
        "str strategy='auto') -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("combine(Tensor experts, Tensor beta, Tensor? bias, int n_in) -> (Tensor, Tensor)");
  m.def("combine_backward(Tensor d_weight, Tensor? d_mixed_bias, Tensor experts, Tensor beta, "
        "Tensor? bias, bool[3] needs) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mos_kernels_ext, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("combine_backward", &combine_backward_cpu);
}

}  // namespace mos
