// The memory-bound parts of the combine-then-GEMM strategy, as work units with no block-level
// synchronisation: combining W_a (and b_a) from the experts, the experts' gradient from a product
// G = dy^T x computed by cuBLAS (with its dbeta partials, and W_a again for dx from the expert
// rows those read), the column sums of dy, and the final dbeta / dbias per row.
//
// Every function here is __host__ __device__ and each unit only reads its inputs and writes its
// own outputs, so running the units one after another on the CPU gives exactly what the GPU
// grid gives. tests/cuda_emulation.cpp does that, which is how these kernels are tested on
// machines without a GPU. mos_linear_kernels.cu wraps them in grid-stride kernels. The one step
// shared by threads, the warp sums of finish_row, has a host form that adds in the same order.
//
// Rows are read in slots of kVec columns, 16 bytes (fp64: 2 doubles). A unit owns kStrip whole
// slots of one row: unit p of the U units over a row's whole slots takes slots p, p + U, p + 2U,
// p + 3U, so the threads of a warp (consecutive units) touch consecutive slots, 512 bytes per
// load instruction. When the row length is not a multiple of 16 bytes, its partial last slot
// is a unit of its own. Each unit takes one of two paths:
// - the 16-byte path, for units of whole slots on rows whose inputs start 16-byte aligned with
//   unit column stride (and, in the gradient epilogue, whose outputs do too): unrolled over the
//   slots, all of an expert's loads issued before any is used, beta[o, i] read once per unit and
//   expert. A unit with fewer than kStrip slots (the last units of a row whose slot count is not
//   a multiple of kStrip) repeats its first slot in the spare places, writing the same values to
//   the same place again: branches around the spare slots cost ptxas about a third more
//   registers.
// - slot by slot for the rest (a row's partial slot; rows that are not aligned or strided):
//   16 bytes where that access allows, element by element where not, beta read once per slot and
//   expert, the adds in the 16-byte path's order, so the results do not depend on the path.
// So when the row lengths are multiples of 16 bytes and the rows aligned, every element moves 16
// bytes at a time; otherwise only partial slots and unaligned rows go element by element.
//
// Work decomposition (reasoned from bandwidth and occupancy, not timed yet): an H100 (132 SMs,
// ~3.35 TB/s HBM3, ~0.7-1 us loaded latency) needs ~2.5-3 MB of loads in flight, ~20-25 KB per
// SM. With kStrip = 4 slots a thread (64 bytes an expert) and kUnitThreads = 64 a block:
// - a 3072 x 768 fp16 layer has 73728 units, 1152 blocks: one wave of the combine (~110
//   registers, 9 blocks an SM, two experts in flight: ~70 KB per SM), 1.1 waves of the epilogue
//   (at most 128 registers, 8 blocks an SM: G and the first expert ~64 KB, then ~32 KB per SM).
// - a 512 x 640 layer has 160 blocks, so every SM takes part and all of its loads go out at once:
//   latency-bound, about one memory round trip per expert in the epilogue, one for two experts in
//   the combine.
// Two slots a thread would spread small layers further but double the dbeta partials (written
// once, read once by finish_row: ~4% of the epilogue's bytes at four slots).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "mos_linear_kernels.h"

// Unrolled on the GPU; the host compiler (emulation, and nvcc's host pass) decides for itself.
// Loops of the slot-by-slot paths stay rolled, so that their registers do not raise the whole
// kernel's.
#if defined(__CUDA_ARCH__)
#define MOS_UNROLL _Pragma("unroll")
#define MOS_NO_UNROLL _Pragma("unroll 1")
#else
#define MOS_UNROLL
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

// ------------------------------------------------------------------------------ access counts
// The emulation counts the elements moved 16 bytes at a time and one by one, and the units that
// took each path (tests/test_cuda_emulation.py asserts that only partial slots and unaligned rows
// go element by element, and which units go slot by slot). Nothing on the GPU.

#if defined(MOS_COUNT_ACCESSES) && !defined(__CUDA_ARCH__)
struct AccessCounts {
  int64_t vector = 0, scalar = 0, fast_units = 0, slot_units = 0;
};
inline AccessCounts access_counts;
#define MOS_COUNT(path, n) (::mos_cuda::elementwise::access_counts.path += (n))
#else
#define MOS_COUNT(path, n) ((void)0)
#endif

// ------------------------------------------------------------------------------ slots and units

// Elements per 16-byte slot: 8 for fp16 and bf16, 4 for fp32, 2 for fp64.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));
constexpr int kStrip = 4;        // slots per unit
constexpr int kUnitThreads = 64;  // threads per block of the unit kernels

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ __forceinline__ int64_t slots_of(int64_t cols) {
  return ceil_div(cols, kVec<T>);
}

// Units over `count` slots.
__host__ __device__ __forceinline__ int64_t units_of(int64_t count) {
  return ceil_div(count, kStrip);
}

// The slots of unit p of the units over `count` slots from slot `first` of a row: first + p +
// j * units for j < n (n >= 1).
struct UnitSlots {
  int n;
  int64_t first, p, units;

  __host__ __device__ __forceinline__ UnitSlots(int64_t first_slot, int64_t count,
                                                int64_t unit_in_row)
      : first(first_slot), p(unit_in_row), units(units_of(count)) {
    const int64_t has = ceil_div(count - p, units);
    n = static_cast<int>(has < kStrip ? has : kStrip);
  }
  // First column of slot j < n.
  template <typename T>
  __host__ __device__ __forceinline__ int64_t column(int j) const {
    return (first + p + j * units) * kVec<T>;
  }
  // First column of slot j < kStrip on the 16-byte path: slot 0 again for the spare places.
  template <typename T>
  __host__ __device__ __forceinline__ int64_t spread(int j) const {
    return column<T>(j < n ? j : 0);
  }
};

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Whether 16-byte accesses are safe along every row that starts at `data` + r * row_stride.
__host__ __device__ __forceinline__ bool aligned_rows(const void* data, int64_t row_stride,
                                                     int64_t col_stride, int vec) {
  return col_stride == 1 && row_stride % vec == 0 && aligned16(data);
}

// ------------------------------------------------------------------------------ slot access

template <typename T>
__host__ __device__ __forceinline__ Pack<T, kVec<T>> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec<T>>*>(p);
}
template <typename T>
__host__ __device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec<T>>& v) {
  *reinterpret_cast<Pack<T, kVec<T>>*>(p) = v;
}

// The 16-byte path's loads of a row (`row` + the unit's slots), and its stores.
template <typename T>
__host__ __device__ __forceinline__ void load_spread(const T* row, const UnitSlots& s,
                                                     Pack<T, kVec<T>> (&values)[kStrip]) {
MOS_UNROLL
  for (int j = 0; j < kStrip; ++j) values[j] = load_pack(row + s.spread<T>(j));
  MOS_COUNT(vector, s.n * kVec<T>);
}
template <typename T>
__host__ __device__ __forceinline__ void store_spread(T* row, const UnitSlots& s,
                                                      const Pack<T, kVec<T>> (&values)[kStrip]) {
MOS_UNROLL
  for (int j = 0; j < kStrip; ++j) store_pack(row + s.spread<T>(j), values[j]);
  MOS_COUNT(vector, s.n * kVec<T>);
}

// The slot at column k of a row that has `cols` columns with stride `col_stride` and starts at
// `row`; elements past the row read as 0. `aligned`: the row starts 16-byte aligned, stride 1.
template <typename T>
__host__ __device__ __forceinline__ Pack<T, kVec<T>> load_slot(const T* row, int64_t k,
                                                               int64_t cols, int64_t col_stride,
                                                               bool aligned) {
  constexpr int VEC = kVec<T>;
  if (aligned && k + VEC <= cols) {
    MOS_COUNT(vector, VEC);
    return load_pack(row + k);
  }
  Pack<T, VEC> out;
MOS_UNROLL
  for (int v = 0; v < VEC; ++v) out.v[v] = k + v < cols ? row[(k + v) * col_stride] : zero<T>();
  MOS_COUNT(scalar, cols - k < VEC ? cols - k : VEC);
  return out;
}

// Stores the slot's elements below `cols` at column k of a contiguous row.
template <typename T>
__host__ __device__ __forceinline__ void store_slot(T* row, int64_t k, int64_t cols,
                                                    const Pack<T, kVec<T>>& value, bool aligned) {
  constexpr int VEC = kVec<T>;
  if (aligned && k + VEC <= cols) {
    MOS_COUNT(vector, VEC);
    store_pack(row + k, value);
    return;
  }
MOS_UNROLL
  for (int v = 0; v < VEC; ++v)
    if (k + v < cols) row[k + v] = value.v[v];
  MOS_COUNT(scalar, cols - k < VEC ? cols - k : VEC);
}

// The 16-byte path's stores of a row that has `cols` columns: 16 bytes at a time where the row
// starts aligned, element by element where not (stores wait for nothing, so this costs the path
// little, and a misaligned output does not send its units slot by slot).
template <typename T>
__host__ __device__ __forceinline__ void store_row(T* row, const UnitSlots& s, int64_t cols,
                                                   const Pack<T, kVec<T>> (&values)[kStrip]) {
  if (aligned16(row)) return store_spread(row, s, values);
MOS_UNROLL
  for (int j = 0; j < kStrip; ++j)
    if (j < s.n) store_slot(row, s.column<T>(j), cols, values[j], /*aligned=*/false);
}

// Whether the unit's slots are all whole (inside the first `cols` columns).
template <typename T>
__host__ __device__ __forceinline__ bool whole_slots(const UnitSlots& s, int64_t cols) {
  return s.column<T>(s.n - 1) + kVec<T> <= cols;
}

// ------------------------------------------------------------------------------ the mixture

template <typename T>
__host__ __device__ __forceinline__ acc_t<T> beta_at(const Mixture& mix, int64_t o, int64_t i) {
  return to_acc(static_cast<const T*>(mix.beta)[o * mix.beta_row_stride +
                                                 i * mix.beta_expert_stride]);
}

template <typename T>
__host__ __device__ __forceinline__ const T* expert_row(const Mixture& mix, int64_t i, int64_t o) {
  return static_cast<const T*>(mix.experts) + i * mix.expert_stride + o * mix.row_stride;
}

// Whether every expert's row o takes 16-byte loads (the slot-by-slot path checks each expert's
// row on its own).
template <typename T>
__host__ __device__ __forceinline__ bool experts_aligned(const Mixture& mix, int64_t o) {
  return mix.col_stride == 1 && mix.expert_stride % kVec<T> == 0 &&
         aligned16(expert_row<T>(mix, 0, o));
}

template <typename T>
__host__ __device__ __forceinline__ acc_t<T> bias_at(const Bias& bias, int64_t i, int64_t o) {
  return to_acc(static_cast<const T*>(bias.data)[i * bias.expert_stride + o * bias.stride]);
}

// b_a[o]: the shared bias, or the per-expert biases mixed by beta; 0 past n_out or without bias.
template <typename T>
__host__ __device__ acc_t<T> mixed_bias(const Bias& bias, const Mixture& mix, int64_t o) {
  if (bias.kind == BiasKind::kNone || o >= mix.n_out) return 0;
  if (bias.kind == BiasKind::kShared) return bias_at<T>(bias, 0, o);
  acc_t<T> total = 0;
  for (int64_t i = 0; i < mix.m; ++i) total += beta_at<T>(mix, o, i) * bias_at<T>(bias, i, o);
  return total;
}

// Tells the compiler that a 16-bit pack may have changed, so that it converts the elements where
// they are used instead of keeping all of them converted to fp32 across a loop (twice the
// registers).
template <typename T>
__host__ __device__ __forceinline__ void keep_packed([[maybe_unused]] Pack<T, kVec<T>>& p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2) {
    uint32_t* w = reinterpret_cast<uint32_t*>(&p);
    asm volatile("" : "+r"(w[0]), "+r"(w[1]), "+r"(w[2]), "+r"(w[3]));
  }
#endif
}

template <typename T, int N>
__host__ __device__ __forceinline__ Pack<T, N> pack_of(const acc_t<T> (&values)[N]) {
  Pack<T, N> out;
MOS_UNROLL
  for (int v = 0; v < N; ++v) out.v[v] = from_acc<T>(values[v]);
  return out;
}

// ------------------------------------------------------------------------------ slice units

// The units over a row's first n_in columns (combine, and the slice of the gradient epilogue):
// units over its whole slots, then, when n_in is not a multiple of kVec, one unit for the partial
// last slot alone, so that the slot-by-slot path holds one slot there, not kStrip.
template <typename T>
__host__ __device__ __forceinline__ int64_t slice_units(int64_t n_in) {
  return units_of(n_in / kVec<T>) + (n_in % kVec<T> != 0);
}
template <typename T>
__host__ __device__ __forceinline__ UnitSlots slice_slots(int64_t n_in, int64_t q) {
  const int64_t whole = n_in / kVec<T>;
  return q < units_of(whole) ? UnitSlots(0, whole, q) : UnitSlots(whole, 1, 0);
}

// ------------------------------------------------------------------------------ combine

// Units of combine_unit: slice_units per row of W_a, n_out rows.
template <typename T>
__host__ __device__ __forceinline__ int64_t combine_units(const Mixture& mix) {
  return mix.n_out * slice_units<T>(mix.n_in);
}

// combine_unit's slot-by-slot path.
template <typename T>
__host__ __device__ void combine_slots(const Mixture& mix, const UnitSlots& s, int64_t o,
                                       T* w_row) {
  constexpr int VEC = kVec<T>;
MOS_NO_UNROLL
  for (int j = 0; j < s.n; ++j) {
    const int64_t k = s.column<T>(j);
    acc_t<T> sum[VEC] = {};
MOS_NO_UNROLL
    for (int64_t i = 0; i < mix.m; ++i) {
      const acc_t<T> b = beta_at<T>(mix, o, i);
      const T* e = expert_row<T>(mix, i, o);
      const Pack<T, VEC> values =
          load_slot(e, k, mix.n_in, mix.col_stride, mix.col_stride == 1 && aligned16(e));
MOS_UNROLL
      for (int v = 0; v < VEC; ++v) sum[v] += b * to_acc(values.v[v]);
    }
    store_slot(w_row, k, mix.n_in, pack_of<T>(sum), aligned16(w_row));
  }
}

// Unit `unit` of W_a (n_out, n_in), row o at weight + o * w_stride: the unit's slots of
// sum_i beta[o, i] E[i, o, :], experts added in order 0..m-1; and, from each row's first unit
// when mixed is not null, b_a[o]. On the 16-byte path the next expert's loads go out before the
// current one's adds (two experts in flight: one round trip for m = 2); W_a's rows that are not
// aligned take element-by-element stores on that path.
template <typename T>
__host__ __device__ void combine_unit(const Mixture& mix, const Bias& bias, T* weight,
                                      int64_t w_stride, T* mixed, int64_t unit) {
  constexpr int VEC = kVec<T>;
  const int64_t per_row = slice_units<T>(mix.n_in), o = unit / per_row, q = unit % per_row;
  if (o >= mix.n_out) return;
  const UnitSlots s = slice_slots<T>(mix.n_in, q);
  const bool bias_here = mixed != nullptr && q == 0;
  T* w_row = weight + o * w_stride;
  if (!(whole_slots<T>(s, mix.n_in) && experts_aligned<T>(mix, o))) {
    MOS_COUNT(slot_units, 1);
    combine_slots<T>(mix, s, o, w_row);
    if (bias_here) mixed[o] = from_acc<T>(mixed_bias<T>(bias, mix, o));
    return;
  }
  MOS_COUNT(fast_units, 1);
  acc_t<T> sum[kStrip][VEC] = {}, bias_sum = 0;
  Pack<T, VEC> values[kStrip], next[kStrip];
  load_spread(expert_row<T>(mix, 0, o), s, values);
MOS_NO_UNROLL
  for (int64_t i = 0; i < mix.m; ++i) {
    const bool more = i + 1 < mix.m;
    if (more) {
      load_spread(expert_row<T>(mix, i + 1, o), s, next);
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j) keep_packed(next[j]);
    }
    const acc_t<T> b = beta_at<T>(mix, o, i);
MOS_UNROLL
    for (int j = 0; j < kStrip; ++j)
MOS_UNROLL
      for (int v = 0; v < VEC; ++v) sum[j][v] += b * to_acc(values[j].v[v]);
    if (bias_here && bias.kind == BiasKind::kPerExpert) bias_sum += b * bias_at<T>(bias, i, o);
    if (more)
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j) values[j] = next[j];
  }
  Pack<T, VEC> out[kStrip];
MOS_UNROLL
  for (int j = 0; j < kStrip; ++j) out[j] = pack_of<T>(sum[j]);
  store_row(w_row, s, mix.n_in, out);
  if (bias_here)
    mixed[o] = from_acc<T>(bias.kind == BiasKind::kShared ? bias_at<T>(bias, 0, o) : bias_sum);
}

// ------------------------------------------------------------------------------ weight gradient

// dbeta partials per row from expert_grad_unit: one per slice unit.
template <typename T>
__host__ __device__ __forceinline__ int64_t expert_grad_partials(const Mixture& mix) {
  return slice_units<T>(mix.n_in);
}

// Units of expert_grad_unit. Without d_experts: the slice's n_out rows, as combine_unit's. With
// it, the whole (n_max, k_max) grid: a row o < n_out has the slice's units, then units over the
// zeros past the slice (from the slot after the slice's last); a row past n_out has units over
// zeros only.
template <typename T>
__host__ __device__ __forceinline__ int64_t expert_grad_units(const Mixture& mix,
                                                              bool want_experts) {
  const int64_t in_slots = slots_of<T>(mix.n_in), all_slots = slots_of<T>(mix.k_max);
  if (!want_experts) return mix.n_out * slice_units<T>(mix.n_in);
  return mix.n_out * (slice_units<T>(mix.n_in) + units_of(all_slots - in_slots)) +
         (mix.n_max - mix.n_out) * units_of(all_slots);
}

// The outputs of the weight-gradient units (any pointer may be null; weight only with WEIGHT):
// d_experts (m, n_max, k_max) contiguous; partials[(o * slice_units + q) * m + i] slice unit q's
// share of dbeta[o, i]; W_a, row o at weight + o * w_stride.
template <typename T>
struct GradOut {
  T* d_experts;
  acc_t<T>* partials;
  T* weight;
  int64_t w_stride;
};

// d_experts' row o of expert i.
template <typename T>
__host__ __device__ __forceinline__ T* grad_row(const Mixture& mix, T* d_experts, int64_t i,
                                                int64_t o) {
  return d_experts + (i * mix.n_max + o) * mix.k_max;
}

// Whether every expert's row o of d_experts takes 16-byte stores.
template <typename T>
__host__ __device__ __forceinline__ bool grads_aligned(const Mixture& mix, T* d_experts,
                                                       int64_t o) {
  return (mix.n_max * mix.k_max) % kVec<T> == 0 && aligned16(grad_row(mix, d_experts, 0, o));
}

// Zeros of d_experts, every expert's row o, the unit's slots.
template <typename T>
__host__ __device__ void zero_unit(const Mixture& mix, T* d_experts, const UnitSlots& s,
                                   int64_t o) {
  constexpr int VEC = kVec<T>;
  Pack<T, VEC> zeros[kStrip];
MOS_UNROLL
  for (int j = 0; j < kStrip; ++j)
MOS_UNROLL
    for (int v = 0; v < VEC; ++v) zeros[j].v[v] = zero<T>();
  const bool fast = whole_slots<T>(s, mix.k_max) && grads_aligned(mix, d_experts, o);
  if (fast) MOS_COUNT(fast_units, 1);
  else MOS_COUNT(slot_units, 1);
MOS_NO_UNROLL
  for (int64_t i = 0; i < mix.m; ++i) {
    T* de = grad_row(mix, d_experts, i, o);
    if (fast) {
      store_spread(de, s, zeros);
    } else {
MOS_NO_UNROLL
      for (int j = 0; j < s.n; ++j)
        store_slot(de, s.column<T>(j), mix.k_max, zeros[0], aligned16(de));
    }
  }
}

// d_experts[i, o, k + v] = b G[o, k + v] for the slot g at column k, exact zeros from n_in on.
template <typename T>
__host__ __device__ __forceinline__ Pack<T, kVec<T>> scaled(acc_t<T> b, const Pack<T, kVec<T>>& g,
                                                            int64_t k, int64_t n_in) {
  Pack<T, kVec<T>> out;
MOS_UNROLL
  for (int v = 0; v < kVec<T>; ++v)
    out.v[v] = k + v < n_in ? from_acc<T>(b * to_acc(g.v[v])) : zero<T>();
  return out;
}

// expert_grad_slice's slot-by-slot path. The dbeta partial runs on in memory from one slot to
// the next (the unit's own value), so that it adds in the 16-byte path's order.
template <typename T, bool WEIGHT>
__host__ __device__ void expert_grad_slots(const Matrix& product, const Mixture& mix,
                                           const GradOut<T>& out, acc_t<T>* part,
                                           const UnitSlots& s, int64_t o) {
  constexpr int VEC = kVec<T>;
  const T* g_row = static_cast<const T*>(product.data) + o * product.row_stride;
  const bool g_aligned = product.col_stride == 1 && aligned16(g_row);
  T* w_row = WEIGHT ? out.weight + o * out.w_stride : nullptr;
MOS_NO_UNROLL
  for (int j = 0; j < s.n; ++j) {
    const int64_t k = s.column<T>(j);
    Pack<T, VEC> g;
    if (out.d_experts != nullptr || part != nullptr)
      g = load_slot(g_row, k, mix.n_in, product.col_stride, g_aligned);
    [[maybe_unused]] acc_t<T> sum[VEC] = {};
MOS_NO_UNROLL
    for (int64_t i = 0; i < mix.m; ++i) {
      const acc_t<T> b = beta_at<T>(mix, o, i);
      Pack<T, VEC> values;
      if (part != nullptr || WEIGHT) {
        const T* e = expert_row<T>(mix, i, o);
        values = load_slot(e, k, mix.n_in, mix.col_stride, mix.col_stride == 1 && aligned16(e));
      }
      if (out.d_experts != nullptr) {
        T* de = grad_row(mix, out.d_experts, i, o);
        store_slot(de, k, mix.k_max, scaled<T>(b, g, k, mix.n_in), aligned16(de));
      }
      if (part != nullptr) {
        acc_t<T> total = j == 0 ? acc_t<T>(0) : part[i];
MOS_UNROLL
        for (int v = 0; v < VEC; ++v) total += to_acc(g.v[v]) * to_acc(values.v[v]);
        part[i] = total;
      }
      if constexpr (WEIGHT) {
MOS_UNROLL
        for (int v = 0; v < VEC; ++v) sum[v] += b * to_acc(values.v[v]);
      }
    }
    if constexpr (WEIGHT) store_slot(w_row, k, mix.n_in, pack_of<T>(sum), aligned16(w_row));
  }
}

// A slice unit of row o: for the unit's slots and every expert i,
//   d_experts[i, o, k] = beta[o, i] G[o, k]                        (when d_experts is not null)
//   part[i]            = sum over the unit's k of G[o, k] E[i, o, k]  (when part is not null)
// and with WEIGHT, W_a[o, k] at weight + o * w_stride + k, summed as combine_unit sums it (the
// backward's dx needs W_a: building it here spares a second pass over the experts). Each expert
// element and each element of G is read once.
template <typename T, bool WEIGHT>
__host__ __device__ void expert_grad_slice(const Matrix& product, const Mixture& mix,
                                           const GradOut<T>& out, acc_t<T>* part,
                                           const UnitSlots& s, int64_t o) {
  constexpr int VEC = kVec<T>;
  const bool want_g = out.d_experts != nullptr || part != nullptr;
  const bool want_e = part != nullptr || WEIGHT;
  const T* g_row = static_cast<const T*>(product.data) + o * product.row_stride;
  T* w_row = WEIGHT ? out.weight + o * out.w_stride : nullptr;
  // Unlike combine_unit's, this path has no element-by-element stores: they would cost it more
  // registers than ptxas's bound leaves (and its outputs' rows are misaligned where its inputs'
  // are: d_experts has the experts' row length, W_a G's).
  if (!(whole_slots<T>(s, mix.n_in) &&
        (!want_g || (product.col_stride == 1 && aligned16(g_row))) &&
        (!want_e || experts_aligned<T>(mix, o)) &&
        (out.d_experts == nullptr || grads_aligned(mix, out.d_experts, o)) &&
        (!WEIGHT || aligned16(w_row)))) {
    MOS_COUNT(slot_units, 1);
    return expert_grad_slots<T, WEIGHT>(product, mix, out, part, s, o);
  }
  MOS_COUNT(fast_units, 1);

  Pack<T, VEC> g[kStrip];
  if (want_g) load_spread(g_row, s, g);
  [[maybe_unused]] acc_t<T> sum[WEIGHT ? kStrip : 1][VEC] = {};
MOS_NO_UNROLL
  for (int64_t i = 0; i < mix.m; ++i) {
MOS_UNROLL
    for (int j = 0; j < kStrip; ++j) keep_packed(g[j]);
    const acc_t<T> b = beta_at<T>(mix, o, i);
    Pack<T, VEC> values[kStrip];
    if (want_e) load_spread(expert_row<T>(mix, i, o), s, values);
    if (out.d_experts != nullptr) {
      Pack<T, VEC> de[kStrip];
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j) de[j] = scaled<T>(b, g[j], 0, VEC);
      store_spread(grad_row(mix, out.d_experts, i, o), s, de);
    }
    if (part != nullptr) {
      acc_t<T> total = 0;
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j)
MOS_UNROLL
        for (int v = 0; v < VEC; ++v)  // the spare places add nothing
          total += j < s.n ? to_acc(g[j].v[v]) * to_acc(values[j].v[v]) : acc_t<T>(0);
      part[i] = total;
    }
    if constexpr (WEIGHT) {
MOS_UNROLL
      for (int j = 0; j < kStrip; ++j)
MOS_UNROLL
        for (int v = 0; v < VEC; ++v) sum[j][v] += b * to_acc(values[j].v[v]);
    }
  }
  if constexpr (WEIGHT) {
    Pack<T, VEC> w[kStrip];
MOS_UNROLL
    for (int j = 0; j < kStrip; ++j) w[j] = pack_of<T>(sum[j]);
    store_spread(w_row, s, w);
  }
}

// Unit `unit` of expert_grad_units: a slice unit (above) or zeros of d_experts.
template <typename T, bool WEIGHT>
__host__ __device__ void expert_grad_unit(const Matrix& product, const Mixture& mix,
                                          const GradOut<T>& out, int64_t unit) {
  const int64_t in_slots = slots_of<T>(mix.n_in), all_slots = slots_of<T>(mix.k_max);
  const int64_t slice = slice_units<T>(mix.n_in);
  const int64_t active = out.d_experts != nullptr ? slice + units_of(all_slots - in_slots) : slice;
  if (unit < mix.n_out * active) {
    const int64_t o = unit / active, q = unit % active;
    if (q < slice) {
      acc_t<T>* part = out.partials != nullptr ? out.partials + (o * slice + q) * mix.m : nullptr;
      expert_grad_slice<T, WEIGHT>(product, mix, out, part, slice_slots<T>(mix.n_in, q), o);
    } else {
      zero_unit<T>(mix, out.d_experts, UnitSlots(in_slots, all_slots - in_slots, q - slice), o);
    }
  } else if (out.d_experts != nullptr) {
    const int64_t rest = unit - mix.n_out * active, per_row = units_of(all_slots);
    const int64_t o = mix.n_out + rest / per_row;
    if (o < mix.n_max) zero_unit<T>(mix, out.d_experts, UnitSlots(0, all_slots, rest % per_row), o);
  }
}

// ------------------------------------------------------------------------------ column sums

// s = sum_t dy[t, :] in two steps: units sum `rows_per_part` rows of one slot of columns each
// into parts (n_parts, cols), kSumBatch 16-byte loads in flight at a time, and finish_row adds a
// column's parts. Fewer rows per part put more loads in flight but write more parts: from
// kMinSumRows rows on, the parts cost at most 1/8 of dy's bytes (written once, read once).
constexpr int64_t kSumBatch = 8, kMinSumRows = 32, kMaxSumRows = 512;
// Units the column sums aim at: ~500 a SM on an H100, each with kSumBatch loads in flight.
constexpr int64_t kSumUnits = int64_t{1} << 16;

// Rows per part for dy (rows, cols): a multiple of kSumBatch that gives about kSumUnits units
// where the rows allow.
template <typename T>
__host__ __device__ __forceinline__ int64_t column_sum_rows(int64_t rows, int64_t cols) {
  const int64_t want = ceil_div(ceil_div(rows * slots_of<T>(cols), kSumUnits), kSumBatch) *
                       kSumBatch;
  return want < kMinSumRows ? kMinSumRows : want > kMaxSumRows ? kMaxSumRows : want;
}

template <typename T>
__host__ __device__ __forceinline__ int64_t column_sum_parts(int64_t rows, int64_t cols) {
  return ceil_div(rows, column_sum_rows<T>(rows, cols));
}

template <typename T>
__host__ __device__ __forceinline__ int64_t column_sum_units(const Matrix& a) {
  return column_sum_parts<T>(a.rows, a.cols) * slots_of<T>(a.cols);
}

// The `vectorised` argument of column_sum_unit: every row of `a` starts 16-byte aligned.
template <typename T>
inline bool column_sums_vectorised(const Matrix& a) {
  return aligned_rows(a.data, a.row_stride, a.col_stride, kVec<T>);
}

// Unit: parts[p, c + v] = sum over rows t of part p, in order, of a[t, c + v], v < VEC.
template <typename T>
__host__ __device__ void column_sum_unit(const Matrix& a, acc_t<T>* parts, bool vectorised,
                                         int64_t unit) {
  constexpr int VEC = kVec<T>;
  const int64_t per_part = slots_of<T>(a.cols), rows = column_sum_rows<T>(a.rows, a.cols);
  const int64_t p = unit / per_part, c = unit % per_part * VEC;
  const int64_t t0 = p * rows, t1 = t0 + rows < a.rows ? t0 + rows : a.rows;
  const T* data = static_cast<const T*>(a.data) + c * a.col_stride;
  acc_t<T> total[VEC] = {};
  if (vectorised && c + VEC <= a.cols) {
    for (int64_t t = t0; t < t1; t += kSumBatch) {
      // Rows past the part load the part's last row again and add nothing (no branches).
      Pack<T, VEC> batch[kSumBatch];
MOS_UNROLL
      for (int r = 0; r < kSumBatch; ++r)
        batch[r] = load_pack(data + (t + r < t1 ? t + r : t1 - 1) * a.row_stride);
MOS_UNROLL
      for (int r = 0; r < kSumBatch; ++r)
MOS_UNROLL
        for (int v = 0; v < VEC; ++v) total[v] += t + r < t1 ? to_acc(batch[r].v[v]) : acc_t<T>(0);
    }
  } else {
MOS_NO_UNROLL
    for (int64_t t = t0; t < t1; ++t) {
      const T* row = data + t * a.row_stride;
MOS_UNROLL
      for (int v = 0; v < VEC; ++v)
        if (c + v < a.cols) total[v] += to_acc(row[v * a.col_stride]);
    }
  }
  acc_t<T>* out = parts + p * a.cols + c;
MOS_UNROLL
  for (int v = 0; v < VEC; ++v)
    if (c + v < a.cols) out[v] = total[v];
}

// ------------------------------------------------------------------------------ finish

constexpr int kWarp = 32;

// sum over q < count of values[q * stride], in a fixed order: lane l of a warp adds q = l,
// l + 32, ... in turn, then the 32 lane sums are added pairwise, lane l with lane l ^ 16, then
// l ^ 8, ..., l ^ 1 (every lane ends with the same value: addition commutes). On the GPU all 32
// lanes of a warp call it together; on the host one call does the lanes in turn, the same adds.
template <typename A>
__host__ __device__ __forceinline__ A lane_sum(const A* values, int64_t count, int64_t stride,
                                               int lane) {
  constexpr int kBatch = 4;  // loads in flight; past `count` they add 0 (no branches)
  A total = 0;
  for (int64_t q = lane; q < count; q += kBatch * kWarp) {
    A batch[kBatch];
MOS_UNROLL
    for (int r = 0; r < kBatch; ++r) {
      const int64_t at = q + r * kWarp;
      batch[r] = at < count ? values[at * stride] : A(0);
    }
MOS_UNROLL
    for (int r = 0; r < kBatch; ++r) total += batch[r];
  }
  return total;
}

template <typename A>
__host__ __device__ A warp_sum(const A* values, int64_t count, int64_t stride) {
#if defined(__CUDA_ARCH__)
  A total = lane_sum(values, count, stride, static_cast<int>(threadIdx.x % kWarp));
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    total += __shfl_xor_sync(0xffffffffu, total, offset);
  return total;
#else
  A lanes[kWarp];
  for (int l = 0; l < kWarp; ++l) lanes[l] = lane_sum(values, count, stride, l);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    A next[kWarp];
    for (int l = 0; l < kWarp; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    for (int l = 0; l < kWarp; ++l) lanes[l] = next[l];
  }
  return lanes[0];
#endif
}

// Whether this thread writes a warp's result (lane 0; always on the host).
__host__ __device__ __forceinline__ bool warp_leader() {
#if defined(__CUDA_ARCH__)
  return threadIdx.x % kWarp == 0;
#else
  return true;
#endif
}

// Row o < n_max of dbeta and dbias, by one warp (every lane of it: warp_sum needs them all).
//   dbeta[o, i] = sum_p partials[o, p, i] (p < n_partials) + s[o] b[i, o] (per-expert bias);
//   s[o] = sum_p sum_parts[p, o] (p < n_sum_parts, rows of n_out): the column sums of dy;
//   dbias: per expert beta[o, i] s[o], shared s[o], 0 past n_out.
// sum_parts may be null when neither output needs s. d_beta (n_out, m) and d_bias (like bias) are
// contiguous; either may be null.
template <typename T>
__host__ __device__ void finish_row(const Mixture& mix, const Bias& bias, const acc_t<T>* partials,
                                    int64_t n_partials, const acc_t<T>* sum_parts,
                                    int64_t n_sum_parts, T* d_beta, T* d_bias, int64_t o) {
  if (o >= mix.n_max) return;
  const bool active = o < mix.n_out, leader = warp_leader();
  const acc_t<T> s = active && sum_parts != nullptr
                         ? warp_sum(sum_parts + o, n_sum_parts, mix.n_out)
                         : acc_t<T>(0);
  for (int64_t i = 0; i < mix.m; ++i) {
    if (d_beta != nullptr && active) {
      acc_t<T> total = warp_sum(partials + o * n_partials * mix.m + i, n_partials, mix.m);
      if (bias.kind == BiasKind::kPerExpert) total += s * bias_at<T>(bias, i, o);
      if (leader) d_beta[o * mix.m + i] = from_acc<T>(total);
    }
    if (d_bias != nullptr && bias.kind == BiasKind::kPerExpert && leader)
      d_bias[i * mix.n_max + o] = active ? from_acc<T>(beta_at<T>(mix, o, i) * s) : zero<T>();
  }
  if (d_bias != nullptr && bias.kind == BiasKind::kShared && leader)
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
