// The memory-bound parts of the combine-then-GEMM strategy, as work units with no block-level
// synchronisation: combining W_a (and b_a) from the experts, the experts' gradient from a product
// G = dy^T x computed by cuBLAS (with its dbeta partials, and W_a again for dx from the expert
// rows those read), the column sums of dy, and the final dbeta / dbias per row.
//
// Every function here is __host__ __device__ and each unit only reads its inputs and writes its
// own outputs, so running the units one after another on the CPU gives exactly what the GPU
// grid gives. tests/cuda_emulation.cpp does that, which is how these kernels are tested on
// machines without a GPU. mos_linear_kernels.cu wraps them in grid-stride kernels.
//
// A unit owns kStrip vectors of 16 bytes in one row. Units are numbered along the row in groups
// of kLanes (a warp): vector j of unit `lane` in group g starts at column
// ((g * kStrip + j) * kLanes + lane) * VEC, so each load instruction of a warp reads 512
// contiguous bytes, and each unit keeps kStrip independent loads in flight per expert.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "mos_linear_kernels.h"

// Unrolled on the GPU; the host compiler (emulation, and nvcc's host pass) decides for itself.
#if defined(__CUDA_ARCH__)
#define MOS_UNROLL _Pragma("unroll")
#define MOS_UNROLL_4 _Pragma("unroll 4")
#define MOS_NO_UNROLL _Pragma("unroll 1")
#else
#define MOS_UNROLL
#define MOS_UNROLL_4
#define MOS_NO_UNROLL
#endif

namespace mos_cuda {
namespace elementwise {

// ------------------------------------------------------------------------------ element types

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;  // accumulation type

__host__ __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ float to_acc(float v) { return v; }
__host__ __device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T, typename A>
__host__ __device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

template <typename T> __host__ __device__ __forceinline__ T zero() { return from_acc<T>(0.0f); }

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

// ------------------------------------------------------------------------------ unit layout

template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per load
constexpr int kStrip = 4;   // vectors per unit
constexpr int kLanes = 32;  // units side by side in a group
// Columns from one of a unit's vectors to its next.
template <typename T> constexpr int kStep = kLanes * kVec<T>;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Units per row of a matrix with `cols` columns: whole groups, so a multiple of kLanes.
template <typename T>
__host__ __device__ __forceinline__ int64_t units_per_row(int64_t cols) {
  return ceil_div(cols, int64_t{kStrip} * kStep<T>) * kLanes;
}

// First column of the unit at position `pos` in its row; vector j starts kStep * j further.
template <typename T>
__host__ __device__ __forceinline__ int64_t first_column(int64_t pos) {
  return (pos / kLanes * kStrip * kLanes + pos % kLanes) * kVec<T>;
}

// Whether 16-byte accesses are safe along rows that start at `data` and are `row_stride` apart.
__host__ __device__ __forceinline__ bool aligned_rows(const void* data, int64_t row_stride,
                                                     int64_t col_stride, int vec) {
  return col_stride == 1 && row_stride % vec == 0 && reinterpret_cast<uintptr_t>(data) % 16 == 0;
}

// Each unit takes one of two paths. The vector path: all kStrip vectors lie inside the columns it
// reads and writes, and every row is 16-byte aligned; loads and stores are 16 bytes wide and all
// of them are issued before their values are used. The element path (a unit that straddles a
// limit, or unaligned or strided rows): one element at a time, not unrolled, so that its
// registers do not raise the whole kernel's. Both sum in the same order (vectors, then elements).

template <typename T>
__host__ __device__ __forceinline__ Pack<T, kVec<T>> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec<T>>*>(p);
}
template <typename T>
__host__ __device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec<T>>& v) {
  *reinterpret_cast<Pack<T, kVec<T>>*>(p) = v;
}

template <typename T>
__host__ __device__ __forceinline__ acc_t<T> beta_at(const Mixture& mix, int64_t o, int64_t i) {
  return to_acc(static_cast<const T*>(mix.beta)[o * mix.beta_row_stride +
                                                 i * mix.beta_expert_stride]);
}

template <typename T>
__host__ __device__ __forceinline__ const T* expert_row(const Mixture& mix, int64_t i, int64_t o) {
  return static_cast<const T*>(mix.experts) + i * mix.expert_stride + o * mix.row_stride;
}

// b_a[o]: the shared bias, or the per-expert biases mixed by beta; 0 past n_out or without bias.
template <typename T>
__host__ __device__ acc_t<T> mixed_bias(const Bias& bias, const Mixture& mix, int64_t o) {
  if (bias.kind == BiasKind::kNone || o >= mix.n_out) return 0;
  const T* b = static_cast<const T*>(bias.data);
  if (bias.kind == BiasKind::kShared) return to_acc(b[o * bias.stride]);
  acc_t<T> total = 0;
  for (int64_t i = 0; i < mix.m; ++i)
    total += beta_at<T>(mix, o, i) * to_acc(b[i * bias.expert_stride + o * bias.stride]);
  return total;
}

// Whether the experts' rows (the active slice) take 16-byte loads.
template <typename T>
inline bool experts_vectorised(const Mixture& mix) {
  return aligned_rows(mix.experts, mix.row_stride, mix.col_stride, kVec<T>) &&
         mix.expert_stride % kVec<T> == 0;
}

// ------------------------------------------------------------------------------ combine

template <typename T>
__host__ __device__ __forceinline__ int64_t combine_units(const Mixture& mix) {
  return mix.n_out * units_per_row<T>(mix.n_in);
}

// The `vectorised` argument of combine_unit for W_a at `weight`.
template <typename T>
inline bool combine_vectorised(const Mixture& mix, const void* weight) {
  return experts_vectorised<T>(mix) && aligned_rows(weight, mix.n_in, 1, kVec<T>);
}

// The unit's columns k0 + j * kStep + v (j < kStrip, v < VEC) of W_a's row o from the
// accumulated sums, stored 16 bytes at a time.
template <typename T, typename Sums>
__host__ __device__ __forceinline__ void store_mixed_row(const Sums& sum, int64_t k0, T* w_row) {
MOS_UNROLL
  for (int j = 0; j < kStrip; ++j) {
    Pack<T, kVec<T>> out;
MOS_UNROLL
    for (int v = 0; v < kVec<T>; ++v) out.v[v] = from_acc<T>(sum[j][v]);
    store_pack(w_row + k0 + j * kStep<T>, out);
  }
}

// The same columns (those below n_in) one element at a time, each summed over the experts in
// order 0..m-1 as the vector path sums them.
template <typename T>
__host__ __device__ void mix_elements(const Mixture& mix, int64_t o, int64_t k0, T* w_row) {
MOS_NO_UNROLL
  for (int j = 0; j < kStrip; ++j)
MOS_NO_UNROLL
    for (int v = 0; v < kVec<T>; ++v) {
      const int64_t k = k0 + j * kStep<T> + v;
      if (k >= mix.n_in) break;
      acc_t<T> sum = 0;
      for (int64_t i = 0; i < mix.m; ++i)
        sum += beta_at<T>(mix, o, i) * to_acc(expert_row<T>(mix, i, o)[k * mix.col_stride]);
      w_row[k] = from_acc<T>(sum);
    }
}

// Unit `unit` of W_a (n_out, n_in) contiguous = sum_i beta[o, i] E[i, o, :n_in], experts summed in
// order 0..m-1, and b_a[o] from the row's first unit when mixed is not null. `vectorised`: the
// experts' rows and W_a's rows are 16-byte aligned with unit column stride.
template <typename T>
__host__ __device__ void combine_unit(const Mixture& mix, const Bias& bias, T* weight, T* mixed,
                                      bool vectorised, int64_t unit) {
  constexpr int VEC = kVec<T>;
  const int64_t per_row = units_per_row<T>(mix.n_in);
  const int64_t o = unit / per_row, pos = unit % per_row, k0 = first_column<T>(pos);
  if (o >= mix.n_out) return;
  T* w_row = weight + o * mix.n_in;
  if (vectorised && k0 + (kStrip - 1) * kStep<T> + VEC <= mix.n_in) {
    acc_t<T> sum[kStrip][VEC] = {};
    for (int64_t i = 0; i < mix.m; ++i) {
      const acc_t<T> b = beta_at<T>(mix, o, i);
      const T* e = expert_row<T>(mix, i, o) + k0;
      Pack<T, VEC> values[kStrip];
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j) values[j] = load_pack(e + j * kStep<T>);
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j)
MOS_UNROLL
        for (int v = 0; v < VEC; ++v) sum[j][v] += b * to_acc(values[j].v[v]);
    }
    store_mixed_row<T>(sum, k0, w_row);
  } else {
    mix_elements<T>(mix, o, k0, w_row);
  }
  if (mixed != nullptr && pos == 0) mixed[o] = from_acc<T>(mixed_bias<T>(bias, mix, o));
}

// ------------------------------------------------------------------------------ weight gradient

// dbeta partials per row for expert_grad_unit: one per unit along n_in.
template <typename T>
__host__ __device__ __forceinline__ int64_t expert_grad_partials(const Mixture& mix) {
  return units_per_row<T>(mix.n_in);
}

// Units of expert_grad_unit: over the whole (n_max, k_max) grid when it writes d_experts (zeros
// outside the slice included), else over the slice. Unit `pos` of a row covers the same columns
// as combine_unit's, whichever grid.
template <typename T>
__host__ __device__ __forceinline__ int64_t expert_grad_units(const Mixture& mix,
                                                              bool want_experts) {
  return want_experts ? mix.n_max * units_per_row<T>(mix.k_max)
                      : mix.n_out * units_per_row<T>(mix.n_in);
}

// The `vectorised` argument of expert_grad_unit.
template <typename T>
inline bool expert_grad_vectorised(const Matrix& product, const Mixture& mix,
                                   const void* d_experts, const void* weight) {
  return aligned_rows(product.data, product.row_stride, product.col_stride, kVec<T>) &&
         experts_vectorised<T>(mix) &&
         (d_experts == nullptr || aligned_rows(d_experts, mix.k_max, 1, kVec<T>)) &&
         (weight == nullptr || aligned_rows(weight, mix.n_in, 1, kVec<T>));
}

// From G (n_out, n_in): for the unit's columns k of row o and every expert i,
//   d_experts[i, o, k] = beta[o, i] G[o, k]  inside the slice, exactly 0 outside it (contiguous);
//   partials[pos, o, i] = sum over the unit's k of G[o, k] E[i, o, k], for pos < the partial count;
// and with WEIGHT, W_a[o, k] (n_out, n_in) contiguous, summed as combine_unit sums it: the
// backward's dx needs W_a, and building it here reads the expert rows once for both.
// d_experts and partials may be null. `vectorised`: G's, the experts', d_experts' and W_a's rows
// are 16-byte aligned with unit column stride.
template <typename T, bool WEIGHT>
__host__ __device__ void expert_grad_unit(const Matrix& product, const Mixture& mix, T* d_experts,
                                          acc_t<T>* partials, T* weight, bool vectorised,
                                          int64_t unit) {
  constexpr int VEC = kVec<T>;
  const int64_t per_row = units_per_row<T>(d_experts != nullptr ? mix.k_max : mix.n_in);
  const int64_t o = unit / per_row, pos = unit % per_row, k0 = first_column<T>(pos);
  const int64_t k_end = k0 + (kStrip - 1) * kStep<T> + VEC;  // past the unit's last column
  const bool active = o < mix.n_out;
  const bool want_partials = partials != nullptr && active && pos < expert_grad_partials<T>(mix);
  const T* g_row = static_cast<const T*>(product.data) + o * product.row_stride;
  const int64_t de_expert_stride = mix.n_max * mix.k_max;
  T* de_row = d_experts + o * mix.k_max;  // expert i's row at de_row + i * de_expert_stride

  if (vectorised && d_experts != nullptr && !want_partials &&
      (!active || k0 >= mix.n_in) && k_end <= mix.k_max) {  // zeros only
    Pack<T, VEC> zeros;
MOS_UNROLL
    for (int v = 0; v < VEC; ++v) zeros.v[v] = zero<T>();
    for (int64_t i = 0; i < mix.m; ++i)
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j)
        store_pack(de_row + i * de_expert_stride + k0 + j * kStep<T>, zeros);
  } else if (vectorised && active && k_end <= mix.n_in) {
    Pack<T, VEC> g[kStrip];
MOS_UNROLL
    for (int j = 0; j < kStrip; ++j) g[j] = load_pack(g_row + k0 + j * kStep<T>);
    [[maybe_unused]] acc_t<T> sum[WEIGHT ? kStrip : 1][VEC] = {};
    for (int64_t i = 0; i < mix.m; ++i) {
      const acc_t<T> b = beta_at<T>(mix, o, i);
      if (d_experts != nullptr)
MOS_UNROLL
        for (int j = 0; j < kStrip; ++j) {
          Pack<T, VEC> out;
MOS_UNROLL
          for (int v = 0; v < VEC; ++v) out.v[v] = from_acc<T>(b * to_acc(g[j].v[v]));
          store_pack(de_row + i * de_expert_stride + k0 + j * kStep<T>, out);
        }
      if (want_partials || WEIGHT) {
        const T* e = expert_row<T>(mix, i, o) + k0;
        Pack<T, VEC> values[kStrip];
MOS_UNROLL
        for (int j = 0; j < kStrip; ++j) values[j] = load_pack(e + j * kStep<T>);
        if (want_partials) {
          acc_t<T> part = 0;
MOS_UNROLL
          for (int j = 0; j < kStrip; ++j)
MOS_UNROLL
            for (int v = 0; v < VEC; ++v) part += to_acc(g[j].v[v]) * to_acc(values[j].v[v]);
          partials[(pos * mix.n_out + o) * mix.m + i] = part;
        }
        if constexpr (WEIGHT) {
MOS_UNROLL
          for (int j = 0; j < kStrip; ++j)
MOS_UNROLL
            for (int v = 0; v < VEC; ++v) sum[j][v] += b * to_acc(values[j].v[v]);
        }
      }
    }
    if constexpr (WEIGHT) store_mixed_row<T>(sum, k0, weight + o * mix.n_in);
  } else {
    const int64_t limit = d_experts != nullptr ? mix.k_max : mix.n_in;
    for (int64_t i = 0; i < mix.m; ++i) {
      const acc_t<T> b = active ? beta_at<T>(mix, o, i) : acc_t<T>(0);
      const T* e = active ? expert_row<T>(mix, i, o) : nullptr;
      acc_t<T> part = 0;
MOS_NO_UNROLL
      for (int j = 0; j < kStrip; ++j)
MOS_NO_UNROLL
        for (int v = 0; v < VEC; ++v) {
          const int64_t k = k0 + j * kStep<T> + v;
          if (k >= limit) break;
          const bool inside = active && k < mix.n_in;
          const acc_t<T> g = inside ? to_acc(g_row[k * product.col_stride]) : acc_t<T>(0);
          if (d_experts != nullptr)
            de_row[i * de_expert_stride + k] = inside ? from_acc<T>(b * g) : zero<T>();
          if (want_partials && inside) part += g * to_acc(e[k * mix.col_stride]);
        }
      if (want_partials) partials[(pos * mix.n_out + o) * mix.m + i] = part;
    }
    if constexpr (WEIGHT) {
      if (active) mix_elements<T>(mix, o, k0, weight + o * mix.n_in);
    }
  }
}

// ------------------------------------------------------------------------------ column sums

// s = sum_t dy[t, :] in two steps: units sum kSumRows rows of one 16-byte column vector each into
// parts (n_parts, cols), and finish_row adds a column's parts in order.
constexpr int64_t kSumRows = 64;

__host__ __device__ __forceinline__ int64_t column_sum_parts(int64_t rows) {
  return ceil_div(rows, kSumRows);
}

template <typename T>
__host__ __device__ __forceinline__ int64_t column_sum_units(const Matrix& a) {
  return column_sum_parts(a.rows) * ceil_div(a.cols, kVec<T>);
}

// The `vectorised` argument of column_sum_unit.
template <typename T>
inline bool column_sums_vectorised(const Matrix& a) {
  return aligned_rows(a.data, a.row_stride, a.col_stride, kVec<T>);
}

// Unit: parts[p, c + v] = sum over rows t of block p, in order, of a[t, c + v], v < VEC.
template <typename T>
__host__ __device__ void column_sum_unit(const Matrix& a, acc_t<T>* parts, bool vectorised,
                                         int64_t unit) {
  constexpr int VEC = kVec<T>;
  const int64_t per_part = ceil_div(a.cols, VEC);
  const int64_t p = unit / per_part, c = unit % per_part * VEC;
  const int64_t t0 = p * kSumRows, t1 = t0 + kSumRows < a.rows ? t0 + kSumRows : a.rows;
  const T* data = static_cast<const T*>(a.data);
  acc_t<T>* out = parts + p * a.cols + c;
  if (vectorised && c + VEC <= a.cols) {
    acc_t<T> total[VEC] = {};
MOS_UNROLL_4
    for (int64_t t = t0; t < t1; ++t) {
      const Pack<T, VEC> row = load_pack(data + t * a.row_stride + c);
MOS_UNROLL
      for (int v = 0; v < VEC; ++v) total[v] += to_acc(row.v[v]);
    }
MOS_UNROLL
    for (int v = 0; v < VEC; ++v) out[v] = total[v];
  } else {
MOS_NO_UNROLL
    for (int v = 0; v < VEC && c + v < a.cols; ++v) {
      acc_t<T> total = 0;
      for (int64_t t = t0; t < t1; ++t)
        total += to_acc(data[t * a.row_stride + (c + v) * a.col_stride]);
      out[v] = total;
    }
  }
}

// ------------------------------------------------------------------------------ finish

// Row o < n_max of dbeta (from `n_partials` partials per row, summed in order, plus the bias
// term) and dbias. The column sums s[o] of dy are the sum, in order, of n_sum_parts parts
// sum_parts[p, o] (p < n_sum_parts, rows of n_out); sum_parts may be null when neither output
// needs s. d_beta (n_out, m) and d_bias (like bias) are contiguous; either may be null.
template <typename T>
__host__ __device__ void finish_row(const Mixture& mix, const Bias& bias, const acc_t<T>* partials,
                                    int64_t n_partials, const acc_t<T>* sum_parts,
                                    int64_t n_sum_parts, T* d_beta, T* d_bias, int64_t o) {
  if (o >= mix.n_max) return;
  const bool active = o < mix.n_out;
  acc_t<T> s = 0;
  if (active && sum_parts != nullptr)
    for (int64_t p = 0; p < n_sum_parts; ++p) s += sum_parts[p * mix.n_out + o];
  const T* b = static_cast<const T*>(bias.data);
  for (int64_t i = 0; i < mix.m; ++i) {
    if (d_beta != nullptr && active) {
      acc_t<T> total = 0;
      for (int64_t p = 0; p < n_partials; ++p) total += partials[(p * mix.n_out + o) * mix.m + i];
      if (bias.kind == BiasKind::kPerExpert)
        total += s * to_acc(b[i * bias.expert_stride + o * bias.stride]);
      d_beta[o * mix.m + i] = from_acc<T>(total);
    }
    if (d_bias != nullptr && bias.kind == BiasKind::kPerExpert)
      d_bias[i * mix.n_max + o] = active ? from_acc<T>(beta_at<T>(mix, o, i) * s) : zero<T>();
  }
  if (d_bias != nullptr && bias.kind == BiasKind::kShared)
    d_bias[o] = active ? from_acc<T>(s) : zero<T>();
}

// ------------------------------------------------------------------------------ dtype dispatch

template <typename T> struct Tag { using type = T; };

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace elementwise
}  // namespace mos_cuda
