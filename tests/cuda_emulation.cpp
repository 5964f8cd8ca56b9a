// Runs the CUDA backend's elementwise work units (csrc/cuda/mos_linear_elementwise.cuh) on the
// CPU, one unit after another over the same grid the kernels cover, with the same arguments the
// launchers in mos_linear_kernels.cu pass. Built by tests/test_cuda_emulation.py with the host
// compiler and loaded through ctypes: that is how these kernels are checked without a GPU. It
// also counts the elements each access path moves (16-byte slots, or element by element).
#define MOS_COUNT_ACCESSES
#include <vector>

#include "mos_linear_elementwise.cuh"

using namespace mos_cuda;
using namespace mos_cuda::elementwise;

extern "C" {

// Since the last call: elements moved 16 bytes at a time and one by one, units that took the
// 16-byte path and units that went slot by slot; resets them.
void mos_emulate_take_counts(int64_t* counts) {
  counts[0] = access_counts.vector;
  counts[1] = access_counts.scalar;
  counts[2] = access_counts.fast_units;
  counts[3] = access_counts.slot_units;
  access_counts = AccessCounts{};
}

// How the launchers split a shape: units of combine (and of the gradient epilogue without
// d_experts), threads a block, dbeta partials per row, rows per part of the column sums of a
// (rows, n_out) dy.
int mos_emulate_decomposition(int dtype, const Mixture* mix, int64_t rows, int64_t* out) {
  return dispatch(static_cast<DType>(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    out[0] = combine_units<T>(*mix);
    out[1] = kUnitThreads;
    out[2] = expert_grad_partials<T>(*mix);
    out[3] = column_sum_rows<T>(rows, mix->n_out);
    return cudaSuccess;
  });
}

// W_a (n_out, n_in), rows w_stride apart, and, when mixed_bias is not null, b_a, as
// mos_cuda::combine writes them.
int mos_emulate_combine(int dtype, const Mixture* mix, const Bias* bias, void* weight,
                        int64_t w_stride, void* mixed_bias) {
  return dispatch(static_cast<DType>(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t u = 0; u < combine_units<T>(*mix); ++u)
      combine_unit<T>(*mix, *bias, static_cast<T*>(weight), w_stride,
                      static_cast<T*>(mixed_bias), u);
    return cudaSuccess;
  });
}

// The outputs of mos_cuda::weight_grad_from_product for G = product and the cotangent dy (whose
// column sums it takes when d_bias, or d_beta with a per-expert bias, needs them), W_a (rows
// w_stride apart) included when weight is not null. Any output may be null.
int mos_emulate_weight_grad_from_product(int dtype, const Matrix* product, const Matrix* dy,
                                         const Mixture* mix, const Bias* bias, void* d_experts,
                                         void* d_beta, void* d_bias, void* weight,
                                         int64_t w_stride) {
  return dispatch(static_cast<DType>(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    const int64_t n_partials = expert_grad_partials<T>(*mix);
    const int64_t n_sum_parts = column_sum_parts<T>(dy->rows, dy->cols);
    // NaN-filled, so a value the finishing step reads but no unit wrote shows up.
    const Acc nan = Acc(0) / Acc(0);
    std::vector<Acc> partials(static_cast<size_t>(n_partials * mix->n_out * mix->m), nan);
    std::vector<Acc> sum_parts(static_cast<size_t>(n_sum_parts * mix->n_out), nan);
    if (d_experts != nullptr || d_beta != nullptr || weight != nullptr) {
      const GradOut<T> out{static_cast<T*>(d_experts),
                           d_beta != nullptr ? partials.data() : nullptr, static_cast<T*>(weight),
                           w_stride};
      for (int64_t u = 0; u < expert_grad_units<T>(*mix, d_experts != nullptr); ++u) {
        if (weight != nullptr)
          expert_grad_unit<T, true>(*product, *mix, out, u);
        else
          expert_grad_unit<T, false>(*product, *mix, out, u);
      }
    }
    const bool want_sums = d_bias != nullptr ||
                           (d_beta != nullptr && bias->kind == BiasKind::kPerExpert);
    if (want_sums)
      for (int64_t u = 0; u < column_sum_units<T>(*dy); ++u)
        column_sum_unit<T>(*dy, sum_parts.data(), column_sums_vectorised<T>(*dy), u);
    if (d_beta != nullptr || d_bias != nullptr)
      for (int64_t o = 0; o < mix->n_max; ++o)
        finish_row<T>(*mix, *bias, partials.data(), n_partials,
                      want_sums ? sum_parts.data() : nullptr, n_sum_parts,
                      static_cast<T*>(d_beta), static_cast<T*>(d_bias), o);
    return cudaSuccess;
  });
}

}  // extern "C"
