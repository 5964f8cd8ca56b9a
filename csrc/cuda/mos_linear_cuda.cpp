// CUDA implementation of the extension ops mos_kernels_ext::forward and ::backward (schema in
// csrc/mos_linear_cpu.cpp): checks, allocation, device guard, stream and dtype plumbing around the
// launchers of mos_linear_kernels.h. Same semantics as the CPU kernels.
//
// Two strategies, the ops' `strategy` argument:
//   combine:  W_a combined once by a small kernel, then the vendor GEMM (cuBLAS through at::mm)
//             for y; backward: G = dy^T x by cuBLAS, then the expert-gradient epilogue kernel,
//             which also writes W_a again for dx = dy @ W_a by cuBLAS (a combine of its own when
//             only dx is asked for);
//   one_pass: the one-pass kernels (W_a combined tile by tile on chip, never stored: for fp16
//             and bf16 the pipelined forward / dx kernels of mos_linear_pipeline.cuh;
//             G = dy^T x tiled with the expert-gradient epilogue in the same kernel).
// "auto" is combine: on an H100 it was faster for every benchmark shape and token count (512 to
// 16384; benchmarks/roofline.py --measure) than the earlier single-stage one-pass kernels. The
// pipelined kernels that replaced them for the forward and dx have not been timed on a GPU yet
// (docs/design.md, section 5), so "auto" stays combine until they are. Neither strategy stores an
// (m, N, K) temporary.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>

#include "mos_linear_kernels.h"

namespace mos {
namespace {

using at::Tensor;

struct Dims {
  int64_t tokens, n_out, n_in, m, n_max, k_max;
};

// The mixture's checks; x (tokens, n_in) is checked by check().
Dims check_mixture(const Tensor& experts, const Tensor& beta, const c10::optional<Tensor>& bias,
                   int64_t tokens, int64_t n_in) {
  TORCH_CHECK(experts.is_cuda(), "mos_linear (cuda): experts must be a CUDA tensor, got one on ",
              experts.device());
  TORCH_CHECK(beta.device() == experts.device(), "mos_linear (cuda): experts and beta must be on "
              "one device, got ", experts.device(), " and ", beta.device());
  TORCH_CHECK(experts.dim() == 3, "mos_linear (cuda): experts must be (m, N_max, K_max), got ",
              experts.sizes());
  TORCH_CHECK(beta.dim() == 2, "mos_linear (cuda): beta must be (n_out, m), got ", beta.sizes());
  const Dims d{tokens, beta.size(0), n_in, experts.size(0), experts.size(1), experts.size(2)};
  TORCH_CHECK(beta.size(1) == d.m, "mos_linear (cuda): beta must have m = ", d.m,
              " columns, got ", beta.sizes());
  TORCH_CHECK(d.n_in <= d.k_max && d.n_out <= d.n_max, "mos_linear (cuda): active slice (",
              d.n_out, ", ", d.n_in, ") exceeds experts ", experts.sizes());
  TORCH_CHECK(experts.scalar_type() == beta.scalar_type(),
              "mos_linear (cuda): experts and beta must share one dtype, got ",
              experts.scalar_type(), " and ", beta.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == experts.device(), "mos_linear (cuda): bias must be on ",
                experts.device(), ", got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == experts.scalar_type(), "mos_linear (cuda): bias dtype ",
                bias->scalar_type(), " must match the experts' ", experts.scalar_type());
    TORCH_CHECK((bias->dim() == 1 && bias->size(0) == d.n_max) ||
                    (bias->dim() == 2 && bias->size(0) == d.m && bias->size(1) == d.n_max),
                "mos_linear (cuda): bias must be (N_max,) or (m, N_max), got ", bias->sizes());
  }
  return d;
}

Dims check(const Tensor& x, const Tensor& experts, const Tensor& beta,
           const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "mos_linear (cuda): x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(experts.device() == x.device(), "mos_linear (cuda): x and experts must be on one "
              "device, got ", x.device(), " and ", experts.device());
  TORCH_CHECK(x.dim() == 2, "mos_linear (cuda): x must be (T, n_in), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == experts.scalar_type(), "mos_linear (cuda): x and experts must "
              "share one dtype, got ", x.scalar_type(), " and ", experts.scalar_type());
  return check_mixture(experts, beta, bias, x.size(0), x.size(1));
}

mos_cuda::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return mos_cuda::DType::kFloat16;
    case at::kBFloat16: return mos_cuda::DType::kBFloat16;
    case at::kFloat: return mos_cuda::DType::kFloat32;
    case at::kDouble: return mos_cuda::DType::kFloat64;
    default: break;
  }
  TORCH_CHECK(false, "mos_linear (cuda): dtype ", t.scalar_type(),
              " is not supported; expected float16, bfloat16, float32 or float64");
  return mos_cuda::DType::kFloat32;  // not reached
}

// The compute capability's major number of a device, asked once per device and process.
int capability_major(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> known{};  // 0: not asked yet
  if (device < 0 || device >= kMaxDevices) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major;
  }
  int major = known[device].load(std::memory_order_relaxed);
  if (major == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    known[device].store(major, std::memory_order_relaxed);
  }
  return major;
}

// Tensor cores: fp16 WMMA needs sm_70, bf16 WMMA sm_80. Only the half types depend on the GPU.
void check_device_supports(const Tensor& x) {
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) return;
  const int major = capability_major(x.get_device());
  TORCH_CHECK(x.scalar_type() != at::kBFloat16 || major >= 8,
              "mos_linear (cuda): bfloat16 needs a GPU of compute capability 8.0 or newer (this "
              "one is ", major, ".x); use float16 or float32");
  TORCH_CHECK(x.scalar_type() != at::kHalf || major >= 7,
              "mos_linear (cuda): float16 needs a GPU of compute capability 7.0 or newer (this "
              "one is ", major, ".x); use float32");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mos_linear (cuda): ", what, " failed: ",
              cudaGetErrorString(err));
}

mos_cuda::Matrix matrix_of(const Tensor& t) {
  return {t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

mos_cuda::Mixture mixture_of(const Tensor& experts, const Tensor& beta, const Dims& d) {
  return {experts.data_ptr(), d.m,          d.n_max,     d.k_max,     experts.stride(0),
          experts.stride(1),  experts.stride(2), beta.data_ptr(), beta.stride(0), beta.stride(1),
          d.n_out,            d.n_in};
}

mos_cuda::Bias bias_of(const c10::optional<Tensor>& bias) {
  if (!bias.has_value()) return {nullptr, mos_cuda::BiasKind::kNone, 0, 0};
  if (bias->dim() == 1) return {bias->data_ptr(), mos_cuda::BiasKind::kShared, 0, bias->stride(0)};
  return {bias->data_ptr(), mos_cuda::BiasKind::kPerExpert, bias->stride(0), bias->stride(1)};
}

// The weight-side gradients for the launchers: tensors (undefined where not wanted, None in
// Python), their pointers (null where not wanted), and the scratch for `tokens` rows of dy.
struct WeightGradOutputs {
  Tensor d_experts, d_beta, d_bias, workspace;
  void *experts_ptr = nullptr, *beta_ptr = nullptr, *bias_ptr = nullptr;

  WeightGradOutputs(const Tensor& experts, const Tensor& beta, const c10::optional<Tensor>& bias,
                    const mos_cuda::Mixture& mix, int64_t tokens, bool want_e, bool want_beta,
                    bool want_bias)
      : d_experts(want_e ? at::empty(experts.sizes(), experts.options()) : Tensor()),
        d_beta(want_beta ? at::empty({mix.n_out, mix.m}, beta.options()) : Tensor()),
        d_bias(want_bias ? at::empty(bias->sizes(), bias->options()) : Tensor()),
        workspace(at::empty({static_cast<int64_t>(mos_cuda::weight_grad_workspace_bytes(
                                dtype_of(experts), mix, tokens))},
                            experts.options().dtype(at::kByte))) {
    if (want_e) experts_ptr = d_experts.data_ptr();
    if (want_beta) beta_ptr = d_beta.data_ptr();
    if (want_bias) bias_ptr = d_bias.data_ptr();
  }
};

// Combine-then-GEMM unless the one-pass kernels are asked for ("auto" is combine). With no
// tokens the one-pass kernels run: they write the zero gradients without a GEMM of size zero.
bool use_combine(c10::string_view strategy, int64_t tokens) {
  const bool one_pass = strategy == "one_pass";
  TORCH_CHECK_VALUE(one_pass || strategy == "combine" || strategy == "auto",
                    "mos_linear (cuda): strategy must be 'auto', 'one_pass' or 'combine', got '",
                    strategy, "'");
  return !one_pass && tokens > 0;
}

// W_a (n_out, n_in) and, with a bias, b_a (n_out,), combined once.
std::pair<Tensor, Tensor> combined(const Tensor& experts, const Tensor& beta,
                                   const c10::optional<Tensor>& bias, const Dims& d,
                                   cudaStream_t stream) {
  Tensor weight = at::empty({d.n_out, d.n_in}, experts.options());
  Tensor mixed_bias = bias.has_value() ? at::empty({d.n_out}, experts.options()) : Tensor();
  check_launch(mos_cuda::combine(dtype_of(experts), mixture_of(experts, beta, d), bias_of(bias),
                                 weight.data_ptr(),
                                 mixed_bias.defined() ? mixed_bias.data_ptr() : nullptr, stream),
               "combine");
  return {weight, mixed_bias};
}

Tensor forward_cuda(const Tensor& x, const Tensor& experts, const Tensor& beta,
                    const c10::optional<Tensor>& bias, c10::string_view strategy) {
  const Dims d = check(x, experts, beta, bias);
  check_device_supports(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  if (use_combine(strategy, d.tokens)) {
    auto [weight, mixed_bias] = combined(experts, beta, bias, d, stream);
    return mixed_bias.defined() ? at::addmm(mixed_bias, x, weight.t()) : at::mm(x, weight.t());
  }
  Tensor y = at::empty({d.tokens, d.n_out}, x.options());
  check_launch(mos_cuda::forward(dtype_of(x), matrix_of(x), mixture_of(experts, beta, d),
                                 bias_of(bias), y.data_ptr(), stream),
               "forward kernel");
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cuda(const Tensor& dy, const Tensor& x,
                                                         const Tensor& experts, const Tensor& beta,
                                                         const c10::optional<Tensor>& bias,
                                                         std::array<bool, 4> needs,
                                                         c10::string_view strategy) {
  const Dims d = check(x, experts, beta, bias);
  TORCH_CHECK(dy.device() == x.device() && dy.scalar_type() == x.scalar_type(),
              "mos_linear (cuda) backward: dy must be a ", x.scalar_type(), " tensor on ",
              x.device(), ", got ", dy.scalar_type(), " on ", dy.device());
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == d.tokens && dy.size(1) == d.n_out,
              "mos_linear (cuda) backward: dy must be (", d.tokens, ", ", d.n_out, "), got ",
              dy.sizes());
  check_device_supports(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const mos_cuda::DType dtype = dtype_of(x);
  const mos_cuda::Mixture mix = mixture_of(experts, beta, d);
  const bool gemm = use_combine(strategy, d.tokens);
  const bool want_bias = needs[3] && bias.has_value();

  // Gradients not asked for come back undefined (None in Python).
  Tensor d_x, d_experts, d_beta, d_bias;
  // With G from cuBLAS, the epilogue that reads the expert rows for dE and dbeta also writes the
  // W_a that dx needs, instead of a combine pass of its own.
  const bool product = gemm && (needs[1] || needs[2]);
  if (needs[0] && !product) {
    if (gemm) {
      d_x = at::mm(dy, combined(experts, beta, c10::nullopt, d, stream).first);
    } else {
      d_x = at::empty({d.tokens, d.n_in}, x.options());
      check_launch(mos_cuda::input_grad(dtype, matrix_of(dy), mix, d_x.data_ptr(), stream),
                   "input-gradient kernel");
    }
  }
  if (!(needs[1] || needs[2] || want_bias)) return {d_x, d_experts, d_beta, d_bias};

  const WeightGradOutputs out(experts, beta, bias, mix, d.tokens, needs[1], needs[2], want_bias);
  if (product) {
    const Tensor grad_rows = at::mm(dy.t(), x);  // G (n_out, n_in) by cuBLAS
    const Tensor weight = needs[0] ? at::empty({d.n_out, d.n_in}, x.options()) : Tensor();
    check_launch(mos_cuda::weight_grad_from_product(
                     dtype, matrix_of(grad_rows), matrix_of(dy), mix, bias_of(bias),
                     out.experts_ptr, out.beta_ptr, out.bias_ptr,
                     weight.defined() ? weight.data_ptr() : nullptr, out.workspace.data_ptr(),
                     stream),
                 "weight-gradient epilogue");
    if (needs[0]) d_x = at::mm(dy, weight);
  } else {
    check_launch(mos_cuda::weight_grad(dtype, matrix_of(dy), matrix_of(x), mix, bias_of(bias),
                                       out.experts_ptr, out.beta_ptr, out.bias_ptr,
                                       out.workspace.data_ptr(), stream),
                 "weight-gradient kernel");
  }
  return {d_x, out.d_experts, out.d_beta, out.d_bias};
}

// W_a and, for a per-expert bias, b_a (undefined otherwise), as combine_cpu.
std::tuple<Tensor, Tensor> combine_cuda(const Tensor& experts, const Tensor& beta,
                                        const c10::optional<Tensor>& bias, int64_t n_in) {
  const Dims d = check_mixture(experts, beta, bias, 0, n_in);
  check_device_supports(experts);
  const c10::cuda::CUDAGuard guard(experts.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(experts.get_device()).stream();
  const bool expert_bias = bias.has_value() && bias->dim() == 2;
  auto [weight, mixed_bias] = combined(experts, beta, expert_bias ? bias : c10::nullopt, d, stream);
  return {weight, expert_bias ? mixed_bias : Tensor()};
}

// The weight-side gradients from those of W_a and b_a, as combine_backward_cpu: the gemm
// strategy's epilogue with G = d_weight, and d_mixed_bias as a one-row dy (its column sums).
std::tuple<Tensor, Tensor, Tensor> combine_backward_cuda(const Tensor& d_weight,
                                                         const c10::optional<Tensor>& d_mixed_bias,
                                                         const Tensor& experts,
                                                         const Tensor& beta,
                                                         const c10::optional<Tensor>& bias,
                                                         std::array<bool, 3> needs) {
  TORCH_CHECK(d_weight.dim() == 2, "mos_combine (cuda) backward: d_weight must be (n_out, n_in), "
              "got ", d_weight.sizes());
  const Dims d = check_mixture(experts, beta, bias, 1, d_weight.size(1));
  TORCH_CHECK(d_weight.size(0) == d.n_out && d_weight.scalar_type() == experts.scalar_type() &&
                  d_weight.device() == experts.device(),
              "mos_combine (cuda) backward: d_weight must be (", d.n_out, ", ", d.n_in, ") ",
              experts.scalar_type(), " on ", experts.device(), ", got ", d_weight.sizes(), " ",
              d_weight.scalar_type(), " on ", d_weight.device());
  const bool expert_bias = bias.has_value() && bias->dim() == 2;
  TORCH_CHECK(!expert_bias || (d_mixed_bias.has_value() && d_mixed_bias->dim() == 1 &&
                               d_mixed_bias->size(0) == d.n_out &&
                               d_mixed_bias->scalar_type() == experts.scalar_type() &&
                               d_mixed_bias->device() == experts.device()),
              "mos_combine (cuda) backward: a per-expert bias needs d_mixed_bias of shape (",
              d.n_out, ",), ", experts.scalar_type(), " on ", experts.device());
  check_device_supports(experts);
  const c10::cuda::CUDAGuard guard(experts.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(experts.get_device()).stream();
  const mos_cuda::DType dtype = dtype_of(experts);
  const mos_cuda::Mixture mix = mixture_of(experts, beta, d);
  const bool want_bias = needs[2] && expert_bias;

  // dy's column sums are only read for a per-expert bias: there d_mixed_bias is a one-row dy.
  const mos_cuda::Matrix sums =
      expert_bias ? matrix_of(d_mixed_bias->view({1, d.n_out})) : matrix_of(d_weight);
  const WeightGradOutputs out(experts, beta, bias, mix, /*tokens=*/1, needs[0], needs[1],
                              want_bias);
  if (needs[0] || needs[1] || want_bias) {
    check_launch(mos_cuda::weight_grad_from_product(
                     dtype, matrix_of(d_weight), sums, mix,
                     bias_of(expert_bias ? bias : c10::nullopt), out.experts_ptr, out.beta_ptr,
                     out.bias_ptr, /*weight=*/nullptr, out.workspace.data_ptr(), stream),
                 "weight-gradient epilogue");
  }
  return {out.d_experts, out.d_beta, out.d_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mos_kernels_ext, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("combine_backward", &combine_backward_cuda);
}

}  // namespace mos
