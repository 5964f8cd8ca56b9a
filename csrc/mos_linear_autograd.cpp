// The eager entry points, one autograd node each with its backward in C++, and the module's
// Python bindings:
//
//   _C.linear(x, experts, beta, bias, out_features, strategy)      mos_kernels.mos_linear
//   _C.routed_linear(x, experts, bias, arch, w1, b1, w2, b2, n_out, layerwise, strategy)
//       MoSLinear's router (Linear, ReLU, Linear, softmax over the experts) and the op together
//
// A Python autograd.Function, the Python dispatch of a torch.library custom op and the autograd
// nodes of a router built from torch modules each cost microseconds of host time per call, and
// tens of them add up to more than a small layer's kernels take on a GPU. These nodes do the
// contract's checks, the reshapes and the router in C++, and call the extension's forward and
// backward ops (the CPU or CUDA kernels) through the dispatcher below autograd.
//
// torch.compile does not see them: while compiling, mos_kernels takes the torch.library custom op
// (mos_kernels/ops.py), which calls the same kernels. Their errors are terse: on any error the
// Python caller takes its plain path, whose checks raise the contract's errors naming the
// argument (and which runs the same kernels where the input is valid).
#include <torch/extension.h>

#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "mos_dot.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace mos {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Tensor call_forward(const Tensor& x, const Tensor& experts, const Tensor& beta,
                    const Tensor& bias, c10::string_view strategy) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mos_kernels_ext::forward", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&,
                        const std::optional<Tensor>&, c10::string_view)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, experts, beta, bias.defined() ? std::optional<Tensor>(bias) : std::nullopt,
                 strategy);
}

Grads call_backward(const Tensor& dy, const Tensor& x, const Tensor& experts, const Tensor& beta,
                    const Tensor& bias, std::array<bool, 4> needs, c10::string_view strategy) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mos_kernels_ext::backward", "")
          .typed<Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const std::optional<Tensor>&, std::array<bool, 4>, c10::string_view)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(dy, x, experts, beta,
                 bias.defined() ? std::optional<Tensor>(bias) : std::nullopt, needs, strategy);
}

struct Shape {
  int64_t n_out, n_in, m;
};

// The contract of mos_kernels/_contract.py, for tensors: x (..., n_in), experts (m, N_max,
// K_max), beta (n_out, m) or (m,) with out_features, bias undefined, (N_max,) or (m, N_max); one
// floating dtype, one device. beta's rows and columns as the kernels see them: (n_out, m).
Shape check_contract(const Tensor& x, const Tensor& experts, int64_t beta_rows,
                     int64_t beta_cols, const Tensor& bias) {
  TORCH_CHECK_TYPE(x.is_floating_point(), "mos_linear: x must be a floating-point tensor");
  TORCH_CHECK_VALUE(experts.dim() == 3 && x.dim() >= 1, "mos_linear: bad experts or x rank");
  for (const Tensor* t : {&experts, &bias}) {
    if (!t->defined()) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "mos_linear: dtypes differ");
    TORCH_CHECK_VALUE(t->device() == x.device(), "mos_linear: devices differ");
  }
  const int64_t m = experts.size(0), n_max = experts.size(1), k_max = experts.size(2);
  const int64_t n_in = x.size(-1);
  TORCH_CHECK_VALUE(m >= 1 && n_max >= 1 && k_max >= 1 && n_in >= 1 && n_in <= k_max,
                    "mos_linear: x does not fit the experts");
  TORCH_CHECK_VALUE(beta_cols == m && beta_rows >= 1 && beta_rows <= n_max,
                    "mos_linear: beta does not fit the experts");
  TORCH_CHECK_VALUE(!bias.defined() || (bias.dim() == 1 && bias.size(0) == n_max) ||
                        (bias.dim() == 2 && bias.size(0) == m && bias.size(1) == n_max),
                    "mos_linear: bad bias shape");
  return {beta_rows, n_in, m};
}

// x as (tokens, n_in), and the output's shape: x's with n_out last.
Tensor flat(const Tensor& x, int64_t n_in) {
  return x.dim() == 2 ? x : x.reshape({-1, n_in});
}

// The output's gradient as (tokens, n_out).
Tensor as_rows(const Tensor& dy, int64_t tokens, int64_t n_out) {
  return dy.dim() == 2 ? dy : dy.reshape({tokens, n_out});
}

Tensor shaped_like(const Tensor& y2d, const Tensor& x, int64_t n_out) {
  if (x.dim() == 2) return y2d;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n_out;
  // Not a view for autograd: y2d is this node's own fresh output.
  return at::_unsafe_view(y2d, sizes);
}

// ---------------------------------------------------------------------------- linear

// Inputs x, experts, beta and, when present, bias: the node's edges 0..3 (an absent optional
// tensor has no edge).
struct LinearNode : public torch::autograd::Function<LinearNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& experts,
                        const Tensor& beta, const std::optional<Tensor>& bias_in,
                        std::optional<int64_t> out_features, c10::string_view strategy) {
    const Tensor bias = bias_in.value_or(Tensor());
    TORCH_CHECK_VALUE(beta.dim() == 1 || beta.dim() == 2, "mos_linear: bad beta rank");
    TORCH_CHECK_TYPE(beta.scalar_type() == x.scalar_type() && beta.device() == x.device(),
                     "mos_linear: beta's dtype or device differs from x's");
    const bool layerwise = beta.dim() == 1;
    TORCH_CHECK_VALUE(layerwise ? out_features.has_value()
                                : !out_features || *out_features == beta.size(0),
                      "mos_linear: out_features does not fit beta");
    const Shape s = check_contract(x, experts, layerwise ? *out_features : beta.size(0),
                                   beta.size(-1), bias);
    const Tensor x2d = flat(x, s.n_in);
    const Tensor beta_rows = layerwise ? beta.expand({s.n_out, s.m}) : beta;
    Tensor y = call_forward(x2d, experts, beta_rows, bias, strategy);
    ctx->save_for_backward({x2d, experts, beta_rows, bias});
    ctx->saved_data["strategy"] = std::string(strategy);
    ctx->saved_data["x_sizes"] = x.dim() == 2 ? c10::IValue() : c10::IValue(x.sizes());
    ctx->saved_data["beta_sizes"] = layerwise ? c10::IValue(beta.sizes()) : c10::IValue();
    return shaped_like(y, x, s.n_out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x2d = saved[0], &experts = saved[1], &beta_rows = saved[2], &bias = saved[3];
    const Tensor dy = as_rows(grads[0], x2d.size(0), beta_rows.size(0));
    const std::array<bool, 4> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    ctx->needs_input_grad(2),
                                    bias.defined() && ctx->needs_input_grad(3)};
    auto [dx, d_experts, d_beta, d_bias] = call_backward(
        dy, x2d, experts, beta_rows, bias, needs, ctx->saved_data["strategy"].toStringView());
    const c10::IValue& x_sizes = ctx->saved_data["x_sizes"];
    if (dx.defined() && !x_sizes.isNone()) dx = dx.view(x_sizes.toIntVector());
    const c10::IValue& beta_sizes = ctx->saved_data["beta_sizes"];
    // Layer-wise beta went in expanded (row stride 0): its gradient is the sum over the rows,
    // as autograd's expand would give.
    if (d_beta.defined() && !beta_sizes.isNone())
      d_beta = at::sum_to(d_beta, beta_sizes.toIntVector());
    return {dx, d_experts, d_beta, d_bias, Tensor(), Tensor()};
  }
};

}  // namespace

Tensor linear(const Tensor& x, const Tensor& experts, const Tensor& beta,
              const std::optional<Tensor>& bias, std::optional<int64_t> out_features,
              c10::string_view strategy) {
  return LinearNode::apply(x, experts, beta, bias, out_features, strategy);
}

namespace {

// ---------------------------------------------------------------------- routed_linear

// MoSLinear's router: h = relu(w1 arch + b1), logits = w2 h + b2, then a softmax over the experts:
// per output row of logits viewed as (N_max, m) for neuron-wise MoS (its first n_out rows, the
// first n_out * m logits), or of all m logits for layer-wise MoS. w1 (H, A), w2 (S, H) with
// S = N_max * m or m; the biases may be undefined.
struct Router {
  Tensor arch, w1, b1, w2, b2;
  int64_t rows;  // logits the op reads: n_out * m, or m
  int64_t m;
};

Tensor contiguous(const Tensor& t) {
  return !t.defined() || t.is_contiguous() ? t : t.contiguous();
}

// On the CPU the router is a few plain loops: each of the dozen ATen calls it would take (the
// dispatcher, BLAS's setup for a 10 x 128 product, an output) costs more host time than its
// arithmetic. The values are stored in the input dtype where the ATen form stores them (h, the
// logits, beta, the logits' gradient, dh); sums run in the accumulation type, in a fixed order.
template <typename scalar_t>
void router_forward_cpu(const Router& r, scalar_t* h, scalar_t* beta) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t A = r.w1.size(1), H = r.w1.size(0), m = r.m;
  const scalar_t *a = r.arch.const_data_ptr<scalar_t>(), *w1 = r.w1.const_data_ptr<scalar_t>(),
                 *w2 = r.w2.const_data_ptr<scalar_t>();
  const scalar_t* b1 = r.b1.defined() ? r.b1.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* b2 = r.b2.defined() ? r.b2.const_data_ptr<scalar_t>() : nullptr;
  for (int64_t j = 0; j < H; ++j) {
    acc_t acc = dot<acc_t>(w1 + j * A, a, A);
    if (b1 != nullptr) acc += b1[j];
    h[j] = static_cast<scalar_t>(std::max(acc, acc_t(0)));
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * m));
  at::parallel_for(0, r.rows / m, grain, [&](int64_t begin, int64_t end) {
    acc_t logits[64];  // one row of m logits (m <= 64, checked by the caller)
    for (int64_t o = begin; o < end; ++o) {
      acc_t top = -std::numeric_limits<acc_t>::infinity(), total = 0;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t row = o * m + i;
        acc_t acc = dot<acc_t>(w2 + row * H, h, H);
        if (b2 != nullptr) acc += b2[row];
        logits[i] = static_cast<scalar_t>(acc);
        top = std::max(top, logits[i]);
      }
      for (int64_t i = 0; i < m; ++i) total += logits[i] = std::exp(logits[i] - top);
      for (int64_t i = 0; i < m; ++i) beta[o * m + i] = static_cast<scalar_t>(logits[i] / total);
    }
  });
}

// Given d_beta (rows), the gradients of w1, b1 (H), w2 (S, H) and b2 (S); rows past `rows` of
// w2 and b2 get zeros.
template <typename scalar_t>
void router_backward_cpu(const Router& r, const scalar_t* h, const scalar_t* beta,
                         const scalar_t* d_beta, scalar_t* dw1, scalar_t* db1, scalar_t* dw2,
                         scalar_t* db2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t A = r.w1.size(1), H = r.w1.size(0), S = r.w2.size(0), m = r.m, rows = r.rows;
  const scalar_t *a = r.arch.const_data_ptr<scalar_t>(), *w2 = r.w2.const_data_ptr<scalar_t>();
  std::vector<acc_t> d_logits(rows), d_h(H, acc_t(0));
  for (int64_t o = 0; o < rows / m; ++o) {  // softmax backward: beta (d_beta - <d_beta, beta>)
    acc_t inner = 0;
    for (int64_t i = 0; i < m; ++i)
      inner += static_cast<acc_t>(d_beta[o * m + i]) * beta[o * m + i];
    for (int64_t i = 0; i < m; ++i) {
      const int64_t row = o * m + i;
      d_logits[row] = static_cast<scalar_t>(beta[row] * (d_beta[row] - inner));
    }
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H));
  at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t d = row < rows ? d_logits[row] : acc_t(0);
      if (db2 != nullptr) db2[row] = static_cast<scalar_t>(d);
      if (dw2 != nullptr)
        for (int64_t j = 0; j < H; ++j) dw2[row * H + j] = static_cast<scalar_t>(d * h[j]);
    }
  });
  if (dw1 == nullptr && db1 == nullptr) return;
  // dh = w2^T d_logits (columns split across threads, each summed over the rows in order), then
  // back through the ReLU.
  at::parallel_for(0, H, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t j = begin; j < end; ++j)
        d_h[j] += static_cast<acc_t>(w2[row * H + j]) * d_logits[row];
  });
  for (int64_t j = 0; j < H; ++j) {
    const acc_t d = h[j] > scalar_t(0) ? acc_t(static_cast<scalar_t>(d_h[j])) : acc_t(0);
    if (db1 != nullptr) db1[j] = static_cast<scalar_t>(d);
    if (dw1 != nullptr)
      for (int64_t k = 0; k < A; ++k) dw1[j * A + k] = static_cast<scalar_t>(d * a[k]);
  }
}

// (h, beta): beta (n_out, m), or (m,) for layer-wise MoS.
std::tuple<Tensor, Tensor> router_forward(const Router& r, bool layerwise) {
  const std::vector<int64_t> beta_sizes =
      layerwise ? std::vector<int64_t>{r.m} : std::vector<int64_t>{r.rows / r.m, r.m};
  if (r.arch.is_cpu()) {
    // at::detail::empty_cpu: no trip through the dispatcher for these small outputs.
    Tensor h = at::detail::empty_cpu({r.w1.size(0)}, r.w1.scalar_type());
    Tensor beta = at::detail::empty_cpu(beta_sizes, r.w1.scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.w1.scalar_type(), "router", [&] {
      router_forward_cpu<scalar_t>(r, h.mutable_data_ptr<scalar_t>(),
                                   beta.mutable_data_ptr<scalar_t>());
    });
    return {h, beta};
  }
  const Tensor h =
      at::relu(r.b1.defined() ? at::addmv(r.b1, r.w1, r.arch) : at::mv(r.w1, r.arch));
  const Tensor logits = r.b2.defined() ? at::addmv(r.b2, r.w2, h) : at::mv(r.w2, h);
  return {h, at::softmax(logits.narrow(0, 0, r.rows).view(beta_sizes), -1)};
}

// The gradients of w1, b1, w2, b2 (undefined where not wanted) from d_beta, beta's shape.
std::array<Tensor, 4> router_backward(const Router& r, const Tensor& h, const Tensor& beta,
                                      const Tensor& d_beta, std::array<bool, 4> wants) {
  std::array<Tensor, 4> out;
  if (r.arch.is_cpu()) {
    const Tensor d_beta_c = contiguous(d_beta);
    const Tensor* like[4] = {&r.w1, &r.b1, &r.w2, &r.b2};
    for (int i = 0; i < 4; ++i)
      if (wants[i]) out[i] = at::detail::empty_cpu(like[i]->sizes(), like[i]->scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.w1.scalar_type(), "router", [&] {
      auto ptr = [](Tensor& t) { return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr; };
      router_backward_cpu<scalar_t>(r, h.const_data_ptr<scalar_t>(),
                                    beta.const_data_ptr<scalar_t>(),
                                    d_beta_c.const_data_ptr<scalar_t>(), ptr(out[0]), ptr(out[1]),
                                    ptr(out[2]), ptr(out[3]));
    });
    return out;
  }
  // Back through the softmax, the slice and view, the second linear, the ReLU and the first
  // linear, as autograd would go through the module's router.
  Tensor d_logits =
      at::_softmax_backward_data(d_beta, beta, -1, beta.scalar_type()).reshape({-1});
  if (r.rows < r.w2.size(0))
    d_logits = at::constant_pad_nd(d_logits, {0, r.w2.size(0) - r.rows});
  if (wants[2]) out[2] = at::outer(d_logits, h);
  if (wants[3]) out[3] = d_logits;
  if (wants[0] || wants[1]) {
    const Tensor d_h = at::threshold_backward(at::mv(r.w2.t(), d_logits), h, 0);
    if (wants[0]) out[0] = at::outer(d_h, r.arch);
    if (wants[1]) out[1] = d_h;
  }
  return out;
}

// Tensor inputs x, experts, bias, arch, w1, b1, w2, b2; absent optional ones (the biases) have
// no edge, so the edge of each input is counted from those present. Everything the backward
// needs is saved as tensors (undefined where absent) or read from them.
struct RoutedNode : public torch::autograd::Function<RoutedNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& experts,
                        const std::optional<Tensor>& bias_in, const Tensor& arch,
                        const Tensor& w1, const std::optional<Tensor>& b1,
                        const Tensor& w2, const std::optional<Tensor>& b2, int64_t n_out,
                        bool layerwise, c10::string_view strategy) {
    const Tensor bias = bias_in.value_or(Tensor());
    const int64_t m = experts.dim() == 3 ? experts.size(0) : 0;
    const Shape s = check_contract(x, experts, n_out, m, bias);
    const Router r{contiguous(arch), contiguous(w1), contiguous(b1.value_or(Tensor())),
                   contiguous(w2), contiguous(b2.value_or(Tensor())), layerwise ? m : n_out * m,
                   m};
    check_router(r, x, layerwise ? m : m * experts.size(1));
    Tensor h, beta;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(h, beta) = router_forward(r, layerwise);
    }
    const Tensor x2d = flat(x, s.n_in);
    const Tensor beta_rows = layerwise ? beta.expand({s.n_out, s.m}) : beta;
    Tensor y = call_forward(x2d, experts, beta_rows, bias, strategy);
    ctx->save_for_backward({x2d, experts, bias, r.arch, r.w1, r.b1, r.w2, r.b2, h, beta});
    ctx->saved_data["strategy"] = std::string(strategy);
    ctx->saved_data["x_sizes"] = x.dim() == 2 ? c10::IValue() : c10::IValue(x.sizes());
    return shaped_like(y, x, s.n_out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x2d = saved[0], &experts = saved[1], &bias = saved[2], &h = saved[8],
                 &beta = saved[9];
    const bool layerwise = beta.dim() == 1;
    const int64_t m = experts.size(0), n_out = grads[0].size(-1);
    const Router r{saved[3], saved[4], saved[5], saved[6], saved[7], layerwise ? m : n_out * m,
                   m};
    // Edges: x 0, experts 1, then bias, arch, w1, b1, w2, b2 where present.
    const size_t e_w1 = 3 + bias.defined(), e_b1 = e_w1 + 1, e_w2 = e_b1 + r.b1.defined();
    const std::array<bool, 4> wants{ctx->needs_input_grad(e_w1),
                                    r.b1.defined() && ctx->needs_input_grad(e_b1),
                                    ctx->needs_input_grad(e_w2),
                                    r.b2.defined() && ctx->needs_input_grad(e_w2 + 1)};
    const bool want_router = wants[0] || wants[1] || wants[2] || wants[3];
    const Tensor dy = as_rows(grads[0], x2d.size(0), n_out);
    auto [dx, d_experts, d_beta, d_bias] = call_backward(
        dy, x2d, experts, layerwise ? beta.expand({n_out, m}) : beta, bias,
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), want_router,
         bias.defined() && ctx->needs_input_grad(2)},
        ctx->saved_data["strategy"].toStringView());
    const c10::IValue& x_sizes = ctx->saved_data["x_sizes"];
    if (dx.defined() && !x_sizes.isNone()) dx = dx.view(x_sizes.toIntVector());
    variable_list out{dx, d_experts, d_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
                      Tensor(), Tensor(), Tensor()};
    if (!want_router) return out;
    // Layer-wise beta went in expanded: its gradient is the sum over the rows.
    if (layerwise) d_beta = at::sum_to(d_beta, beta.sizes());
    const std::array<Tensor, 4> d_router = router_backward(r, h, beta, d_beta, wants);
    for (int i = 0; i < 4; ++i) out[4 + i] = d_router[i];  // w1, b1, w2, b2
    return out;
  }

  // The router's tensors share x's dtype and device and fit the experts: S = N_max m logits
  // (neuron-wise) or m (layer-wise), at most 64 experts.
  static void check_router(const Router& r, const Tensor& x, int64_t scores) {
    for (const Tensor* t : {&r.arch, &r.w1, &r.b1, &r.w2, &r.b2}) {
      if (!t->defined()) continue;
      TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                       "routed_linear: the router's dtype or device differs from x's");
    }
    TORCH_CHECK_VALUE(!r.arch.requires_grad(), "routed_linear: arch must not require grad");
    TORCH_CHECK_VALUE(
        r.m >= 1 && r.m <= 64 && r.arch.dim() == 1 && r.w1.dim() == 2 && r.w2.dim() == 2 &&
            r.w1.size(1) == r.arch.size(0) && r.w2.size(1) == r.w1.size(0) &&
            r.w2.size(0) == scores &&
            (!r.b1.defined() || r.b1.sizes() == r.w1.sizes().slice(0, 1)) &&
            (!r.b2.defined() || r.b2.sizes() == r.w2.sizes().slice(0, 1)),
        "routed_linear: the router does not fit the experts");
  }
};

}  // namespace

Tensor routed_linear(const Tensor& x, const Tensor& experts, const std::optional<Tensor>& bias,
                     const Tensor& arch, const Tensor& w1, const std::optional<Tensor>& b1,
                     const Tensor& w2, const std::optional<Tensor>& b2, int64_t n_out,
                     bool layerwise, c10::string_view strategy) {
  return RoutedNode::apply(x, experts, bias, arch, w1, b1, w2, b2, n_out, layerwise, strategy);
}

}  // namespace mos

// Python calls these directly: through the dispatcher (a torch.library op with an Autograd
// kernel) a call and its backward take several microseconds more host time than a built-in op,
// which small layers pay on every call (docs/results.md, host time per call).
// The GIL is released while they run, as torch's own ops release it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef MOS_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  module.def(
      "linear",
      [](const at::Tensor& x, const at::Tensor& experts, const at::Tensor& beta,
         const std::optional<at::Tensor>& bias, std::optional<int64_t> out_features,
         const std::string& strategy) {
        return mos::linear(x, experts, beta, bias, out_features, strategy);
      },
      "mos_linear's eager path: one autograd node, backward in C++", no_gil);
  module.def(
      "routed_linear",
      [](const at::Tensor& x, const at::Tensor& experts, const std::optional<at::Tensor>& bias,
         const at::Tensor& arch, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
         const at::Tensor& w2, const std::optional<at::Tensor>& b2, int64_t n_out,
         bool layerwise, const std::string& strategy) {
        return mos::routed_linear(x, experts, bias, arch, w1, b1, w2, b2, n_out, layerwise,
                                  strategy);
      },
      "MoSLinear's eager path: router and op in one autograd node, backward in C++", no_gil);
}
