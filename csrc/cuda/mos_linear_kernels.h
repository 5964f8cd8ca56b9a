// Launchers of the MoS linear CUDA kernels (mos_linear_kernels.cu).
//
// No torch here: raw pointers, sizes, strides counted in elements, and a stream, so that nvcc can
// compile the kernels on machines without CUDA torch headers. mos_linear_cuda.cpp binds them.
// Each launcher only enqueues work on `stream` and returns the launch error, if any.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mos_cuda {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// A (rows, cols) matrix: element (r, c) lives at data[r * row_stride + c * col_stride].
struct Matrix {
  const void* data;
  int64_t rows, cols, row_stride, col_stride;
};

// The experts E (m, n_max, k_max), read through the active slice [:n_out, :n_in], and the mixing
// scores beta (n_out, m): E[i, o, k] at experts[i * expert_stride + o * row_stride + k * col_stride],
// beta[o, i] at beta[o * beta_row_stride + i * beta_expert_stride] (layer-wise MoS: row stride 0).
struct Mixture {
  const void* experts;
  int64_t m, n_max, k_max;
  int64_t expert_stride, row_stride, col_stride;
  const void* beta;
  int64_t beta_row_stride, beta_expert_stride;
  int64_t n_out, n_in;
};

enum class BiasKind { kNone, kShared, kPerExpert };

// Shared bias (n_max,): b[o] at data[o * stride]. Per-expert bias (m, n_max): b[i, o] at
// data[i * expert_stride + o * stride], mixed by beta like the weights.
struct Bias {
  const void* data;
  BiasKind kind;
  int64_t expert_stride, stride;
};

// All tensors share `dtype`; outputs are contiguous and must not overlap the inputs.

// y (x.rows, n_out) = x @ W_a^T + b_a, with x (tokens, n_in): one pass, W_a never stored.
cudaError_t forward(DType dtype, const Matrix& x, const Mixture& mix, const Bias& bias, void* y,
                    cudaStream_t stream);

// dx (dy.rows, n_in) = dy @ W_a, with dy (tokens, n_out): one pass, W_a never stored.
cudaError_t input_grad(DType dtype, const Matrix& dy, const Mixture& mix, void* dx,
                       cudaStream_t stream);

// W_a (n_out, n_in) and, when mixed_bias is not null, b_a (n_out,): for combine-then-GEMM.
// W_a's rows are weight_row_stride >= n_in elements apart (0: n_in, contiguous). Rows that start
// 16-byte aligned are written 16 bytes at a time; when n_in is not a multiple of 16 bytes, a
// stride rounded up to one keeps every row aligned (and suits cuBLAS too).
cudaError_t combine(DType dtype, const Mixture& mix, const Bias& bias, void* weight,
                    void* mixed_bias, cudaStream_t stream, int64_t weight_row_stride = 0);

// Scratch bytes weight_grad and weight_grad_from_product need for `tokens` rows of dy (per-tile
// dbeta partials, partial column sums of dy).
size_t weight_grad_workspace_bytes(DType dtype, const Mixture& mix, int64_t tokens);

// The weight-side gradients from G = dy^T x, computed tile by tile over the tokens:
//   d_experts (m, n_max, k_max): beta[o, i] * G[o, k] inside the active slice, zero outside;
//   d_beta (n_out, m):           sum_k G[o, k] E[i, o, k] + s[o] b[i, o]   (s = column sums of dy);
//   d_bias:                      like bias: per expert beta[o, i] s[o], shared s[o]; zero past n_out.
// Any output pointer may be null (not computed). Deterministic: no atomics.
cudaError_t weight_grad(DType dtype, const Matrix& dy, const Matrix& x, const Mixture& mix,
                        const Bias& bias, void* d_experts, void* d_beta, void* d_bias,
                        void* workspace, cudaStream_t stream);

// The same outputs from a product G (n_out, n_in) already computed elsewhere (a vendor GEMM),
// and, when weight is not null, W_a (n_out, n_in) as combine() writes it, rows weight_row_stride
// apart (0: n_in): the backward's dx needs W_a, and this pass reads the expert rows for d_beta
// anyway. Each expert element is read once.
cudaError_t weight_grad_from_product(DType dtype, const Matrix& product, const Matrix& dy,
                                     const Mixture& mix, const Bias& bias, void* d_experts,
                                     void* d_beta, void* d_bias, void* weight, void* workspace,
                                     cudaStream_t stream, int64_t weight_row_stride = 0);

}  // namespace mos_cuda
