// CUDA kernels of the MoS linear op. No torch headers: the launchers at the bottom take raw
// pointers, sizes, element strides and a stream (mos_linear_kernels.h); mos_linear_cuda.cpp binds
// them to tensors.
//
//   forward      y  = x @ W_a^T + b_a   one pass: every weight tile is combined from the m expert
//   input grad   dx = dy @ W_a          tiles with beta (in fp32) on its way into shared memory;
//                                       W_a is never written out
//   weight grad  G  = dy^T @ x          tiled over the tokens; while a tile of G is still on chip
//                                       the epilogue writes dE = beta * G for every expert and the
//                                       tile's dbeta partials; a small kernel then sums those in a
//                                       fixed order (no float atomics: bit-identical runs)
//
// fp16 and bf16 forward and input grad: pipelined_gemm_kernel, a double-buffered pipeline whose
// per-thread units live in mos_linear_pipeline.cuh (which says how it works): register-staged
// 16-byte global loads of the next step while the tensor cores (ldmatrix + mma.sync from sm_75
// on, WMMA on sm_70) work on the current one, the experts mixed in registers while staging, two
// blocks an SM. bf16 needs sm_80. fp32 and fp64 forward and input grad, and the weight grad of
// every dtype, use the older single-stage tiles below (WMMA fragments for fp16 and bf16, plain
// FMA tiles for fp32 and fp64). Global loads are 16 bytes wide when a matrix has unit stride
// along its last dimension and aligned rows, element by element otherwise.
//
// Speed: the single-stage tiles stage one tile ahead in registers and are bound by load latency,
// not by the tensor cores; the binding's "auto" strategy uses combine() + cuBLAS +
// weight_grad_from_product() (docs/design.md, section 5 says which GPU gets what).
//
// combine() and weight_grad_from_product() are memory-bound: their work units live in
// mos_linear_elementwise.cuh (16-byte accesses, no block synchronisation, tested on the CPU by
// tests/test_cuda_emulation.py); this file wraps them in grid-stride kernels.
#include "mos_linear_kernels.h"
#include "mos_linear_elementwise.cuh"
#include "mos_linear_pipeline.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace mos_cuda {
namespace {

using namespace nvcuda;

// ------------------------------------------------------------------------------ element types
// (acc_t, to_acc, from_acc, zero, Pack, mixed_bias, ceil_div and dispatch come from
// mos_linear_elementwise.cuh.)
using namespace elementwise;

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// WMMA exists from sm_70 on, its bf16 fragments from sm_80 on. A kernel compiled for a GPU that
// lacks them gets a body that traps; the binding never launches it there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
constexpr bool kHalfMma = false, kBfloatMma = false;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kHalfMma = true, kBfloatMma = false;
#else
constexpr bool kHalfMma = true, kBfloatMma = true;
#endif
template <typename T>
constexpr bool kCompiled = std::is_same_v<T, __half>          ? kHalfMma
                           : std::is_same_v<T, __nv_bfloat16> ? kBfloatMma
                                                              : true;

// ------------------------------------------------------------------------------ tile shapes

// Forward and input grad in fp32 and fp64 (fp16 and bf16: mos_linear_pipeline.cuh): (kRows
// tokens) x (kCols outputs) per block, kDepth deep per step.
// Weight grad: (kGradRows of n_out) x (kGradCols of n_in) per block, kGradDepth tokens per step.
template <typename T, bool = kTensorCores<T>> struct Tiles;
// (Enumerators rather than static members: nvcc warns of members unused where the bf16 kernels
// are compiled out.)
template <typename T> struct Tiles<T, true> {    // 8 warps as 2 x 4, WMMA fragments
  enum : int { kThreads = 256, kVec = 8 };
  enum : int { kRows = 128, kCols = 128, kDepth = 32 };
  enum : int { kGradRows = 64, kGradCols = 128, kGradDepth = 32 };
};
template <typename T> struct Tiles<T, false> {   // 16 x 16 threads, 4 x 4 outputs each
  enum : int { kThreads = 256, kVec = 16 / static_cast<int>(sizeof(T)) };
  enum : int { kRows = 64, kCols = 64, kDepth = 16 };
  enum : int { kGradRows = 64, kGradCols = 64, kGradDepth = 16 };
};

// ------------------------------------------------------------------------------ tile loaders
// Both loaders stage a tile in registers (fetch: the global loads of the next tile are in flight
// while the current one is multiplied) and then write it to shared memory (store), row-major
// with leading dimension LD, in chunks of VEC consecutive columns. Outside the matrix: zeros.

template <typename T, int ROWS, int COLS, int LD, int THREADS, int VEC>
struct ActivationTile {
  static constexpr int kChunksPerRow = COLS / VEC;
  static constexpr int kPerThread = ROWS * kChunksPerRow / THREADS;
  static_assert(COLS % VEC == 0 && ROWS * kChunksPerRow % THREADS == 0 && LD % VEC == 0,
                "tile shape");
  Pack<T, VEC> regs[kPerThread];

  __device__ __forceinline__ void fetch(const Matrix& a, bool vectorised, int64_t row0,
                                        int64_t col0) {
    const T* data = static_cast<const T*>(a.data);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int chunk = threadIdx.x + j * THREADS;
      const int64_t row = row0 + chunk / kChunksPerRow;
      const int64_t col = col0 + chunk % kChunksPerRow * VEC;
      const T* src = data + row * a.row_stride + col * a.col_stride;
      if (vectorised && row < a.rows && col + VEC <= a.cols) {
        regs[j] = *reinterpret_cast<const Pack<T, VEC>*>(src);
      } else {
        const int valid = row < a.rows ? static_cast<int>(min(a.cols - col, int64_t{VEC})) : 0;
#pragma unroll
        for (int v = 0; v < VEC; ++v) regs[j].v[v] = v < valid ? src[v * a.col_stride] : zero<T>();
      }
    }
  }

  __device__ __forceinline__ void store(T* smem) const {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int chunk = threadIdx.x + j * THREADS;
      *reinterpret_cast<Pack<T, VEC>*>(smem + chunk / kChunksPerRow * LD +
                                       chunk % kChunksPerRow * VEC) = regs[j];
    }
  }
};

// A tile of W_a[o, k] = sum_i beta[o, i] E[i, o, k] (rows o, columns k), summed in the
// accumulation type over the m expert tiles, experts in order 0..m-1. fetch() only issues the
// loads of the first kHeld experts; combine(), called after the block product, sums them and
// loads the remaining experts two at a time, so the global loads overlap the tensor-core work
// and at most ceil((m - kHeld) / 2) load round trips stay exposed.
template <typename T, int ROWS, int COLS, int LD, int THREADS, int VEC>
struct MixedWeightTile {
  static constexpr int kChunksPerRow = COLS / VEC;
  static constexpr int kPerThread = ROWS * kChunksPerRow / THREADS;
  static constexpr int kHeld = 2;
  static_assert(COLS % VEC == 0 && ROWS * kChunksPerRow % THREADS == 0 && LD % VEC == 0,
                "tile shape");
  Pack<T, VEC> held[kHeld][kPerThread];
  acc_t<T> held_beta[kHeld][kPerThread];
  Pack<T, VEC> regs[kPerThread];  // the combined tile, in T

  // beta[o, i] and E[i, o, k..k+VEC) for this thread's chunk j; zeros outside the active slice.
  __device__ __forceinline__ static void load(const Mixture& mix, bool vectorised, int64_t o0,
                                              int64_t k0, int64_t i, int j, acc_t<T>& weight,
                                              Pack<T, VEC>& p) {
    const int chunk = threadIdx.x + j * THREADS;
    const int64_t o = o0 + chunk / kChunksPerRow, k = k0 + chunk % kChunksPerRow * VEC;
    if (o >= mix.n_out) {
      weight = 0;
#pragma unroll
      for (int v = 0; v < VEC; ++v) p.v[v] = zero<T>();
      return;
    }
    const T* beta = static_cast<const T*>(mix.beta);
    const T* e = static_cast<const T*>(mix.experts) + i * mix.expert_stride + o * mix.row_stride +
                 k * mix.col_stride;
    weight = to_acc(beta[o * mix.beta_row_stride + i * mix.beta_expert_stride]);
    if (vectorised && k + VEC <= mix.n_in) {
      p = *reinterpret_cast<const Pack<T, VEC>*>(e);
    } else {
      const int valid = static_cast<int>(max(int64_t{0}, min(mix.n_in - k, int64_t{VEC})));
#pragma unroll
      for (int v = 0; v < VEC; ++v) p.v[v] = v < valid ? e[v * mix.col_stride] : zero<T>();
    }
  }

  __device__ __forceinline__ void fetch(const Mixture& mix, bool vectorised, int64_t o0,
                                        int64_t k0) {
#pragma unroll
    for (int h = 0; h < kHeld; ++h)
      if (h < mix.m)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j)
          load(mix, vectorised, o0, k0, h, j, held_beta[h][j], held[h][j]);
  }

  __device__ __forceinline__ void combine(const Mixture& mix, bool vectorised, int64_t o0,
                                          int64_t k0) {
    acc_t<T> sum[kPerThread][VEC];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum[j][v] = 0;
#pragma unroll
    for (int h = 0; h < kHeld; ++h)
      if (h < mix.m)
#pragma unroll
        for (int j = 0; j < kPerThread; ++j)
#pragma unroll
          for (int v = 0; v < VEC; ++v) sum[j][v] += held_beta[h][j] * to_acc(held[h][j].v[v]);
    for (int64_t i = kHeld; i < mix.m; i += 2) {
      const bool pair = i + 1 < mix.m;
      acc_t<T> w0[kPerThread], w1[kPerThread];
      Pack<T, VEC> p0[kPerThread], p1[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        load(mix, vectorised, o0, k0, i, j, w0[j], p0[j]);
        if (pair) load(mix, vectorised, o0, k0, i + 1, j, w1[j], p1[j]);
      }
#pragma unroll
      for (int j = 0; j < kPerThread; ++j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          sum[j][v] += w0[j] * to_acc(p0[j].v[v]);
          if (pair) sum[j][v] += w1[j] * to_acc(p1[j].v[v]);
        }
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) regs[j].v[v] = from_acc<T>(sum[j][v]);
  }

  __device__ __forceinline__ void store(T* smem) const {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int chunk = threadIdx.x + j * THREADS;
      *reinterpret_cast<Pack<T, VEC>*>(smem + chunk / kChunksPerRow * LD +
                                       chunk % kChunksPerRow * VEC) = regs[j];
    }
  }
};

// ------------------------------------------------------------------------------ block products
// C (BM x BN) += A (BM x BK) @ B (BK x BN) from shared memory. A(row, r) is As[row * LDA + r], or
// As[r * LDA + row] when A_COL; B(r, col) is Bs[r * LDB + col], or Bs[col * LDB + r] when B_COL.

template <typename T, int BM, int BN, int BK, int LDA, int LDB, bool A_COL, bool B_COL>
struct WmmaTile {
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kFragsM = BM / kWarpsM / 16, kFragsN = BN / kWarpsN / 16;
  static_assert(BM % (kWarpsM * 16) == 0 && BN % (kWarpsN * 16) == 0 && BK % 16 == 0, "shape");
  // Shared memory for_each needs.
  static constexpr int epilogue_bytes() { return kWarpsM * kWarpsN * 256 * sizeof(float); }
  using ALayout = std::conditional_t<A_COL, wmma::col_major, wmma::row_major>;
  using BLayout = std::conditional_t<B_COL, wmma::col_major, wmma::row_major>;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsM][kFragsN];
  int warp_row, warp_col;  // this warp's sub-tile

  __device__ __forceinline__ WmmaTile() {
    const int warp = threadIdx.x / 32;
    warp_row = warp / kWarpsN * (BM / kWarpsM);
    warp_col = warp % kWarpsN * (BN / kWarpsN);
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void mma(const T* As, const T* Bs) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[kFragsN];
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        const int col = warp_col + 16 * j;
        wmma::load_matrix_sync(b[j], B_COL ? Bs + col * LDB + kk : Bs + kk * LDB + col, LDB);
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        const int row = warp_row + 16 * i;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
        wmma::load_matrix_sync(a, A_COL ? As + kk * LDA + row : As + row * LDA + kk, LDA);
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
      }
    }
  }

  // f(row, col, value) for every element of the tile, through a 16x16 scratch per warp in smem
  // (epilogue_bytes(); the caller has finished with its tiles there).
  template <typename F>
  __device__ __forceinline__ void for_each(void* smem, F&& f) {
    float* scratch = static_cast<float*>(smem) + threadIdx.x / 32 * 256;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32)
          f(warp_row + 16 * i + e / 16, warp_col + 16 * j + e % 16, scratch[e]);
        __syncwarp();
      }
  }

  // The whole tile into C (row-major, leading dimension ldc, a multiple of 4).
  __device__ __forceinline__ void stage(float* C, int ldc) {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j)
        wmma::store_matrix_sync(C + (warp_row + 16 * i) * ldc + warp_col + 16 * j, acc[i][j], ldc,
                                wmma::mem_row_major);
  }
};

template <typename T, int BM, int BN, int BK, int LDA, int LDB, bool A_COL, bool B_COL>
struct FmaTile {
  static constexpr int kTM = BM / 16, kTN = BN / 16;  // outputs per thread: rows ty + 16 i, ...
  static constexpr int epilogue_bytes() { return 0; }
  acc_t<T> acc[kTM][kTN];
  int ty, tx;

  __device__ __forceinline__ FmaTile() : ty(threadIdx.x / 16), tx(threadIdx.x % 16) {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0;
  }

  __device__ __forceinline__ void mma(const T* As, const T* Bs) {
#pragma unroll
    for (int r = 0; r < BK; ++r) {
      acc_t<T> a[kTM], b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const int row = ty + 16 * i;
        a[i] = to_acc(A_COL ? As[r * LDA + row] : As[row * LDA + r]);
      }
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int col = tx + 16 * j;
        b[j] = to_acc(B_COL ? Bs[col * LDB + r] : Bs[r * LDB + col]);
      }
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];
    }
  }

  template <typename F>
  __device__ __forceinline__ void for_each(void*, F&& f) {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) f(ty + 16 * i, tx + 16 * j, acc[i][j]);
  }

  __device__ __forceinline__ void stage(acc_t<T>* C, int ldc) {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) C[(ty + 16 * i) * ldc + tx + 16 * j] = acc[i][j];
  }
};

template <typename T, int BM, int BN, int BK, int LDA, int LDB, bool A_COL, bool B_COL>
using BlockTile = std::conditional_t<kTensorCores<T>, WmmaTile<T, BM, BN, BK, LDA, LDB, A_COL, B_COL>,
                                     FmaTile<T, BM, BN, BK, LDA, LDB, A_COL, B_COL>>;

constexpr int max_of(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------ kernels

// Forward (INPUT_GRAD false): out (tokens, n_out) = act (tokens, n_in) @ W_a^T + b_a.
// Input grad (INPUT_GRAD true): out (tokens, n_in) = act (tokens, n_out) @ W_a.
// Grid: x over tiles of tokens, y over tiles of output columns.
template <typename T, bool INPUT_GRAD>
__global__ void __launch_bounds__(256)
    mixed_gemm_kernel(Matrix act, Mixture mix, Bias bias, T* out, bool act_vectorised,
                      bool experts_vectorised) {
  if constexpr (!kCompiled<T>) {
    __trap();
  } else {
    using Cfg = Tiles<T>;
    constexpr int BM = Cfg::kRows, BN = Cfg::kCols, BK = Cfg::kDepth, VEC = Cfg::kVec;
    constexpr int THREADS = Cfg::kThreads, LDA = BK + VEC;
    // The weight tile is kept as W_a's own (o, k) layout: rows o, columns k.
    constexpr int W_ROWS = INPUT_GRAD ? BK : BN, W_COLS = INPUT_GRAD ? BN : BK, LDB = W_COLS + VEC;
    using Mma = BlockTile<T, BM, BN, BK, LDA, LDB, /*A_COL=*/false, /*B_COL=*/!INPUT_GRAD>;
    constexpr int kTileBytes = (BM * LDA + W_ROWS * LDB) * static_cast<int>(sizeof(T));
    __shared__ __align__(128) unsigned char smem[max_of(kTileBytes, Mma::epilogue_bytes())];
    __shared__ acc_t<T> bias_tile[BN];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + BM * LDA;

    const int64_t out_cols = INPUT_GRAD ? mix.n_in : mix.n_out;
    const int64_t depth = INPUT_GRAD ? mix.n_out : mix.n_in;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
    if constexpr (!INPUT_GRAD)
      for (int c = threadIdx.x; c < BN; c += THREADS) bias_tile[c] = mixed_bias<T>(bias, mix, col0 + c);

    ActivationTile<T, BM, BK, LDA, THREADS, VEC> act_tile;
    MixedWeightTile<T, W_ROWS, W_COLS, LDB, THREADS, VEC> weight_tile;
    // The weight tile's first row o and column k for the step at depth d0.
    auto weight_o0 = [&](int64_t d0) { return INPUT_GRAD ? d0 : col0; };
    auto weight_k0 = [&](int64_t d0) { return INPUT_GRAD ? col0 : d0; };
    auto fetch = [&](int64_t d0) {
      act_tile.fetch(act, act_vectorised, row0, d0);
      weight_tile.fetch(mix, experts_vectorised, weight_o0(d0), weight_k0(d0));
    };
    auto combine = [&](int64_t d0) {
      weight_tile.combine(mix, experts_vectorised, weight_o0(d0), weight_k0(d0));
    };

    Mma mma;
    fetch(0);
    combine(0);
    for (int64_t d0 = 0; d0 < depth; d0 += BK) {
      act_tile.store(As);
      weight_tile.store(Bs);
      __syncthreads();
      const bool more = d0 + BK < depth;
      if (more) fetch(d0 + BK);  // loads in flight during the block product
      mma.mma(As, Bs);
      if (more) combine(d0 + BK);
      __syncthreads();
    }

    mma.for_each(smem, [&](int r, int c, acc_t<T> value) {
      const int64_t row = row0 + r, col = col0 + c;
      if (row < act.rows && col < out_cols) {
        if constexpr (!INPUT_GRAD) value += bias_tile[c];
        out[row * out_cols + col] = from_acc<T>(value);
      }
    });
  }
}

// ------------------------------------------------------------------------------ pipelined one pass
// Forward and input grad for fp16 and bf16: the schedule, staging and index maps are in
// mos_linear_pipeline.cuh (shared with the CPU emulation); here the warps' tensor-core products
// and the kernel around them.

namespace pl = pipeline;

#if !defined(MOS_PIPELINE_PADDED)
// sm_75 on: ldmatrix and mma.sync on the swizzled stages. A warp's 32 x 32 tile is 2 x 4
// m16n8 accumulators; a 16-deep slice takes 2 ldmatrix.x4 of A, 2 of B and 8 m16n8k16 products
// (on sm_75, 16 m16n8k8: the k16 fragments are two k8 fragments side by side).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// c (m16 x n8, fp32) += a (m16 x k16) b (k16 x n8).
template <typename T>
__device__ __forceinline__ void mma_k16(float (&c)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
#if __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      asm volatile(
          "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[2 * h]), "r"(a[2 * h + 1]), "r"(b[h]));
  } else {
    __trap();  // bf16 needs sm_80; never launched below it
  }
#endif
}

template <typename T, bool INPUT_GRAD>
struct WarpMma {
  float acc[pl::kFragsM][pl::kFragsN][4];
  // Byte offsets in a stage of this lane's ldmatrix rows: A per 16-deep slice h; B per h
  // (forward) or per pair p of n blocks (input grad). The other fragments are a constant
  // distance away (pl::kAFragmentStride, pl::kBFragmentStride), folded into the instructions.
  uint32_t a_off[2], b_off[2];
  int warp, lane;

  __device__ __forceinline__ WarpMma() : warp(threadIdx.x / 32), lane(threadIdx.x % 32) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      a_off[j] = 2 * pl::a_fragment_offset<INPUT_GRAD>(lane, pl::warp_row(warp), 16 * j);
      b_off[j] = 2 * (INPUT_GRAD
                          ? pl::b_fragment_offset<INPUT_GRAD>(lane, pl::warp_col(warp) + 16 * j, 0)
                          : pl::b_fragment_offset<INPUT_GRAD>(lane, pl::warp_col(warp), 16 * j));
    }
#pragma unroll
    for (int mi = 0; mi < pl::kFragsM; ++mi)
#pragma unroll
      for (int ni = 0; ni < pl::kFragsN; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
  }

  // The products of the 16-deep half h of a step.
  __device__ __forceinline__ void mma(const T* stage, int h) {
    static_assert(pl::kFragsN == 4, "two B pairs");
    constexpr uint32_t kAStride = 2 * pl::kAFragmentStride;
    constexpr uint32_t kBStride = 2 * pl::kBFragmentStride<INPUT_GRAD>;
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(stage));
    {
      uint32_t a[pl::kFragsM][4], b[pl::kFragsN][2];
#pragma unroll
      for (int mi = 0; mi < pl::kFragsM; ++mi) ldmatrix_x4(a[mi], base + a_off[h] + mi * kAStride);
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        uint32_t r[4];
        if constexpr (INPUT_GRAD) {
          ldmatrix_x4_trans(r, base + b_off[p] + h * kBStride);
        } else {
          ldmatrix_x4(r, base + b_off[h] + p * kBStride);
        }
        b[2 * p][0] = r[0];
        b[2 * p][1] = r[1];
        b[2 * p + 1][0] = r[2];
        b[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < pl::kFragsM; ++mi)
#pragma unroll
        for (int ni = 0; ni < pl::kFragsN; ++ni) mma_k16<T>(acc[mi][ni], a[mi], b[ni]);
    }
  }

  // f(r, c, v0, v1) for the pairs (r, c), (r, c + 1) this lane holds, column by column. Uses no
  // shared memory.
  template <typename F>
  __device__ __forceinline__ void for_each_pair(T*, F&& f) {
#pragma unroll
    for (int ni = 0; ni < pl::kFragsN; ++ni)
#pragma unroll
      for (int mi = 0; mi < pl::kFragsM; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          f(pl::acc_row(warp, lane, mi, 2 * h), pl::acc_col(warp, lane, ni, 2 * h),
            acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
  }
};
#else
// sm_70: WMMA 16x16x16 fragments read from the padded stages, 2 x 2 per warp.
template <typename T, bool INPUT_GRAD>
struct WarpMma {
  using G = pl::Geometry<INPUT_GRAD>;
  using BLayout = std::conditional_t<INPUT_GRAD, wmma::row_major, wmma::col_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  int warp;

  __device__ __forceinline__ WarpMma() : warp(threadIdx.x / 32) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  // The products of the 16-deep half h of a step.
  __device__ __forceinline__ void mma(const T* stage, int h) {
    const T* w = stage + G::A::kElems;
    {
      const int kk = 16 * h;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], stage + G::A::offset(pl::warp_row(warp) + 16 * i, kk / 8),
                               G::A::kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n0 = pl::warp_col(warp) + 16 * j;
        wmma::load_matrix_sync(
            b[j], w + (INPUT_GRAD ? G::W::offset(kk, n0 / 8) : G::W::offset(n0, kk / 8)),
            G::W::kLd);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  // Through a 16x16 fp32 scratch per warp in the stages, once every warp is done with them.
  template <typename F>
  __device__ __forceinline__ void for_each_pair(T* stages, F&& f) {
    __syncthreads();
    float* scratch = reinterpret_cast<float*>(stages) + warp * 256;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = 2 * lane; e < 256; e += 64)
          f(pl::warp_row(warp) + 16 * i + e / 16, pl::warp_col(warp) + 16 * j + e % 16,
            scratch[e], scratch[e + 1]);
        __syncwarp();
      }
  }
};
#endif

// One thread's view of the schedule (pl::pipeline).
template <typename T, bool INPUT_GRAD, int MAXM>
struct DeviceStep {
  static constexpr int kStageElems = pl::Geometry<INPUT_GRAD>::kStageElems;
  static constexpr int kGroups = pl::Stage<T, INPUT_GRAD, MAXM>::kGroups;
  pl::Stage<T, INPUT_GRAD, MAXM> staging;
  WarpMma<T, INPUT_GRAD> warp;
  T* stages;

  __device__ __forceinline__ DeviceStep(const Matrix& act, const Mixture& mix, int64_t row0,
                                        int64_t col0, T* stages_)
      : staging(act, mix, row0, col0, threadIdx.x), stages(stages_) {}
  template <bool FULL>
  __device__ __forceinline__ void fetch(int64_t d0, int g) { staging.template fetch<FULL>(d0, g); }
  __device__ __forceinline__ void mix(int g) { staging.mix_group(g); }
  __device__ __forceinline__ void mma(int s, int h) { warp.mma(stages + s * kStageElems, h); }
  __device__ __forceinline__ void store(int s) { staging.store(stages + s * kStageElems); }
  __device__ __forceinline__ void sync() { __syncthreads(); }
};

// Forward (INPUT_GRAD false): out (tokens, n_out) = act (tokens, n_in) @ W_a^T + b_a.
// Input grad (INPUT_GRAD true): out (tokens, n_in) = act (tokens, n_out) @ W_a.
// MAXM: experts held per step (2, 4, 8), or 0 for the general kernel (pl::variant picks).
// Grid: x over tiles of tokens, y over tiles of output columns. Two blocks an SM: at most 128
// registers a thread; the two stages take 24 KB of shared memory (30 KB padded on sm_70).
template <typename T, bool INPUT_GRAD, int MAXM>
__global__ void __launch_bounds__(pl::kThreads, 2)
    pipelined_gemm_kernel(Matrix act, Mixture mix, Bias bias, T* out) {
  if constexpr (!kCompiled<T>) {
    __trap();
  } else {
    using Step = DeviceStep<T, INPUT_GRAD, MAXM>;
    __shared__ __align__(128) T stages[2 * Step::kStageElems];
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * pl::kRows;
    const int64_t col0 = static_cast<int64_t>(blockIdx.y) * pl::kCols;
    Step step(act, mix, row0, col0, stages);
    pl::pipeline(INPUT_GRAD ? mix.n_out : mix.n_in, step);
    // The bias of a column pair is computed when the column changes (for_each_pair goes
    // column by column).
    int cached = -1;
    float b0 = 0.0f, b1 = 0.0f;
    step.warp.for_each_pair(stages, [&](int r, int c, float v0, float v1) {
      if constexpr (!INPUT_GRAD) {
        if (c != cached) {
          cached = c;
          b0 = pl::column_bias<T>(bias, mix, col0 + c);
          b1 = pl::column_bias<T>(bias, mix, col0 + c + 1);
        }
      }
      pl::write_pair<T, INPUT_GRAD>(act, mix, out, row0, col0, r, c, v0 + b0, v1 + b1);
    });
  }
}

// The epilogue of the weight gradient for one (BM x BN) tile of G staged in C: row o of the tile,
// for each expert i, dE[i, o, k] = beta[o, i] G[o, k] for the tile's k, and the tile's share of
// dbeta[o, i] = sum_k G[o, k] E[i, o, k], summed by one warp in a fixed order, written to
// partials[o, k_tile, i] (k_tiles per row, as finish_row reads them).
template <typename T, int BM, int BN, int LDC, int THREADS>
__device__ void expert_grad_epilogue(const acc_t<T>* C, const Mixture& mix, T* d_experts,
                                     acc_t<T>* partials, bool want_beta, int64_t o0, int64_t k0,
                                     int64_t k_tile, int64_t k_tiles) {
  const T* experts = static_cast<const T*>(mix.experts);
  const T* beta = static_cast<const T*>(mix.beta);
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < BM; r += THREADS / 32) {
    const int64_t o = o0 + r;
    if (o >= mix.n_out) break;  // the same for the whole warp
    for (int64_t i = 0; i < mix.m; ++i) {
      const acc_t<T> weight = to_acc(beta[o * mix.beta_row_stride + i * mix.beta_expert_stride]);
      const T* e = experts + i * mix.expert_stride + o * mix.row_stride;
      T* de = d_experts == nullptr ? nullptr : d_experts + (i * mix.n_max + o) * mix.k_max;
      acc_t<T> part = 0;
      for (int c = lane; c < BN; c += 32) {
        const int64_t k = k0 + c;
        if (k >= mix.n_in) break;
        const acc_t<T> g = C[r * LDC + c];
        if (de != nullptr) de[k] = from_acc<T>(weight * g);
        if (want_beta) part += g * to_acc(e[k * mix.col_stride]);
      }
      if (want_beta) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2)
          part += __shfl_xor_sync(0xffffffffu, part, offset);
        if (lane == 0) partials[(o * k_tiles + k_tile) * mix.m + i] = part;
      }
    }
  }
}

// G = dy^T x, one (n_out tile) x (n_in tile) per block, and its epilogue. Blocks of the first
// n_in tile also sum the columns of dy (row_sums, when not null) from the tiles they load.
// Grid: x over tiles of n_in, y over tiles of n_out.
template <typename T>
__global__ void __launch_bounds__(256, 2)  // two blocks per SM: 128 registers at most
    weight_grad_kernel(Matrix dy, Matrix x, Mixture mix, T* d_experts, acc_t<T>* partials,
                       acc_t<T>* row_sums, bool dy_vectorised, bool x_vectorised, bool want_beta) {
  if constexpr (!kCompiled<T>) {
    __trap();
  } else {
    using Cfg = Tiles<T>;
    constexpr int BM = Cfg::kGradRows, BN = Cfg::kGradCols, BK = Cfg::kGradDepth;
    constexpr int VEC = Cfg::kVec, THREADS = Cfg::kThreads;
    constexpr int LDA = BM + VEC, LDB = BN + VEC, LDC = BN + (kTensorCores<T> ? 4 : 1);
    // A = dy^T stored as dy's own (t, o) tile, so column-major; B = x's (t, k) tile.
    using Mma = BlockTile<T, BM, BN, BK, LDA, LDB, /*A_COL=*/true, /*B_COL=*/false>;
    constexpr int kTileBytes = BK * (LDA + LDB) * static_cast<int>(sizeof(T));
    constexpr int kStageBytes = BM * LDC * static_cast<int>(sizeof(acc_t<T>));
    __shared__ __align__(128) unsigned char smem[max_of(kTileBytes, kStageBytes)];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + BK * LDA;

    const int64_t o0 = static_cast<int64_t>(blockIdx.y) * BM;
    const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BN;
    const int64_t tokens = x.rows;
    // Blocks of the first n_in tile sum dy's columns: THREADS / BM threads per column, each over
    // every (THREADS / BM)-th row of the tiles, added in a fixed order at the end.
    const bool sums = row_sums != nullptr && blockIdx.x == 0;
    constexpr int kSumSplit = THREADS / BM;
    static_assert(THREADS % BM == 0, "column sums");
    __shared__ acc_t<T> sum_parts[THREADS];

    ActivationTile<T, BK, BM, LDA, THREADS, VEC> dy_tile;  // rows t, columns o
    ActivationTile<T, BK, BN, LDB, THREADS, VEC> x_tile;   // rows t, columns k
    Mma mma;
    acc_t<T> column_sum = 0;
    if (tokens > 0) {
      dy_tile.fetch(dy, dy_vectorised, 0, o0);
      x_tile.fetch(x, x_vectorised, 0, k0);
    }
    for (int64_t t0 = 0; t0 < tokens; t0 += BK) {
      dy_tile.store(As);
      x_tile.store(Bs);
      __syncthreads();
      if (t0 + BK < tokens) {
        dy_tile.fetch(dy, dy_vectorised, t0 + BK, o0);
        x_tile.fetch(x, x_vectorised, t0 + BK, k0);
      }
      if (sums)
        for (int r = threadIdx.x / BM; r < BK; r += kSumSplit)
          column_sum += to_acc(As[r * LDA + threadIdx.x % BM]);
      mma.mma(As, Bs);
      __syncthreads();
    }
    if (sums) {  // the same for the whole block
      sum_parts[threadIdx.x] = column_sum;
      __syncthreads();
      if (threadIdx.x < BM && o0 + threadIdx.x < mix.n_out) {
        acc_t<T> total = 0;
        for (int part = 0; part < kSumSplit; ++part) total += sum_parts[part * BM + threadIdx.x];
        row_sums[o0 + threadIdx.x] = total;
      }
    }
    if (d_experts == nullptr && !want_beta) return;

    acc_t<T>* C = reinterpret_cast<acc_t<T>*>(smem);
    mma.stage(C, LDC);
    __syncthreads();
    expert_grad_epilogue<T, BM, BN, LDC, THREADS>(C, mix, d_experts, partials, want_beta, o0, k0,
                                                  blockIdx.x, gridDim.x);
  }
}

// Zeros of d_experts (m, n_max, k_max) outside the active slice. Grid y over rows (i, o).
template <typename T>
__global__ void zero_outside_slice_kernel(T* d_experts, Mixture mix) {
  for (int64_t row = blockIdx.y; row < mix.m * mix.n_max; row += gridDim.y) {
    const int64_t first = row % mix.n_max < mix.n_out ? mix.n_in : 0;
    for (int64_t k = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
         k < mix.k_max; k += static_cast<int64_t>(gridDim.x) * blockDim.x)
      d_experts[row * mix.k_max + k] = zero<T>();
  }
}

// The work units of mos_linear_elementwise.cuh, grid-stride over `units`, kUnitThreads a block
// (its header says why).

__device__ __forceinline__ int64_t first_unit() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t unit_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename T>
__global__ void __launch_bounds__(kUnitThreads)
    combine_kernel(Mixture mix, Bias bias, T* weight, int64_t w_stride, T* mixed) {
  const int64_t units = combine_units<T>(mix);
  for (int64_t u = first_unit(); u < units; u += unit_step())
    combine_unit<T>(mix, bias, weight, w_stride, mixed, u);
}

// At least 8 blocks (512 threads) an SM, so at most 128 registers: left free, ptxas takes up to
// ~170 for the 16-bit types, where they cost occupancy and buy nothing in a memory-bound kernel.
// tests/test_cuda_build.py checks that it does not spill under this bound.
template <typename T, bool WEIGHT>
__global__ void __launch_bounds__(kUnitThreads, 8)
    expert_grad_kernel(Matrix product, Mixture mix, GradOut<T> out) {
  const int64_t units = expert_grad_units<T>(mix, out.d_experts != nullptr);
  for (int64_t u = first_unit(); u < units; u += unit_step())
    expert_grad_unit<T, WEIGHT>(product, mix, out, u);
}

template <typename T>
__global__ void __launch_bounds__(kUnitThreads)
    column_sum_kernel(Matrix a, acc_t<T>* parts, bool vectorised) {
  const int64_t units = column_sum_units<T>(a);
  for (int64_t u = first_unit(); u < units; u += unit_step())
    column_sum_unit<T>(a, parts, vectorised, u);
}

// One warp a row (finish_row's warp sums need every lane of it).
template <typename T>
__global__ void __launch_bounds__(kUnitThreads)
    finish_kernel(Mixture mix, Bias bias, const acc_t<T>* partials, int64_t n_partials,
                  const acc_t<T>* sum_parts, int64_t n_sum_parts, T* d_beta, T* d_bias) {
  for (int64_t o = first_unit() / kWarp; o < mix.n_max; o += unit_step() / kWarp)
    finish_row<T>(mix, bias, partials, n_partials, sum_parts, n_sum_parts, d_beta, d_bias, o);
}

// ------------------------------------------------------------------------------ launchers

// Whether the one-pass kernels' 16-byte loads along the last dimension are safe (the same test
// as the elementwise units', with the tile loaders' vector width).
template <typename T>
bool vectorisable(const Matrix& a) {
  return aligned_rows(a.data, a.row_stride, a.col_stride, Tiles<T>::kVec);
}
template <typename T>
bool vectorisable(const Mixture& mix) {
  return aligned_rows(mix.experts, mix.row_stride, mix.col_stride, Tiles<T>::kVec) &&
         mix.expert_stride % Tiles<T>::kVec == 0;
}

constexpr int64_t kMaxGridY = 65535;

template <typename T, bool INPUT_GRAD>
cudaError_t launch_pipelined(const Matrix& act, const Mixture& mix, const Bias& bias, T* out,
                             cudaStream_t stream) {
  const int64_t row_tiles = ceil_div(act.rows, pl::kRows);
  const int64_t col_tiles = ceil_div(INPUT_GRAD ? mix.n_in : mix.n_out, pl::kCols);
  if (row_tiles == 0 || col_tiles == 0) return cudaSuccess;
  if (row_tiles > INT32_MAX || col_tiles > kMaxGridY) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  switch (pl::variant<T>(act, mix, INPUT_GRAD)) {
    case 2:
      pipelined_gemm_kernel<T, INPUT_GRAD, 2><<<grid, pl::kThreads, 0, stream>>>(act, mix, bias,
                                                                                 out);
      break;
    case 4:
      pipelined_gemm_kernel<T, INPUT_GRAD, 4><<<grid, pl::kThreads, 0, stream>>>(act, mix, bias,
                                                                                 out);
      break;
    case 8:
      pipelined_gemm_kernel<T, INPUT_GRAD, 8><<<grid, pl::kThreads, 0, stream>>>(act, mix, bias,
                                                                                 out);
      break;
    default:
      pipelined_gemm_kernel<T, INPUT_GRAD, 0><<<grid, pl::kThreads, 0, stream>>>(act, mix, bias,
                                                                                 out);
  }
  return cudaGetLastError();
}

// fp16 and bf16: the pipelined kernels; fp32 and fp64: the FMA tiles.
template <typename T, bool INPUT_GRAD>
cudaError_t launch_mixed_gemm(const Matrix& act, const Mixture& mix, const Bias& bias, void* out,
                              cudaStream_t stream) {
  if constexpr (kTensorCores<T>) {
    return launch_pipelined<T, INPUT_GRAD>(act, mix, bias, static_cast<T*>(out), stream);
  } else {
    using Cfg = Tiles<T>;
    const int64_t row_tiles = ceil_div(act.rows, Cfg::kRows);
    const int64_t col_tiles = ceil_div(INPUT_GRAD ? mix.n_in : mix.n_out, Cfg::kCols);
    if (row_tiles == 0 || col_tiles == 0) return cudaSuccess;
    if (row_tiles > INT32_MAX || col_tiles > kMaxGridY) return cudaErrorInvalidConfiguration;
    mixed_gemm_kernel<T, INPUT_GRAD>
        <<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles)),
           Cfg::kThreads, 0, stream>>>(act, mix, bias, static_cast<T*>(out), vectorisable<T>(act),
                                       vectorisable<T>(mix));
    return cudaGetLastError();
  }
}

// Blocks for a grid-stride launch of `units` work units (at least one).
dim3 unit_grid(int64_t units) {
  const int64_t blocks = ceil_div(units, kUnitThreads);
  return dim3(static_cast<unsigned>(blocks < (1 << 20) ? (blocks > 0 ? blocks : 1) : (1 << 20)));
}

// dbeta partials per row: one per n_in tile of the fused kernel, one per unit along n_in of the
// elementwise epilogue; the workspace holds the larger count.
template <typename T>
int64_t fused_partials(const Mixture& mix) {
  return ceil_div(mix.n_in, Tiles<T>::kGradCols);
}
template <typename T>
int64_t max_partials(const Mixture& mix) {
  const int64_t fused = fused_partials<T>(mix), elementwise = expert_grad_partials<T>(mix);
  return fused > elementwise ? fused : elementwise;
}

// The weight gradient around the product: `product` launches the kernel that writes d_experts
// (all of it), the dbeta partials (n_partials per row) and W_a where asked, and sums dy's columns
// into the row sums it is given (null: not asked to). Then the column sums if it did not, and
// dbeta / dbias.
template <typename T, typename Product>
cudaError_t launch_weight_grad(const Matrix& dy, const Mixture& mix, const Bias& bias,
                               void* d_experts, void* d_beta, void* d_bias, bool want_weight,
                               void* workspace, cudaStream_t stream, int64_t n_partials,
                               bool product_sums_rows, Product&& product) {
  acc_t<T>* partials = static_cast<acc_t<T>*>(workspace);
  acc_t<T>* sum_parts = partials + max_partials<T>(mix) * mix.n_out * mix.m;
  const bool want_sums =
      d_bias != nullptr || (d_beta != nullptr && bias.kind == BiasKind::kPerExpert);
  const bool want_product = d_experts != nullptr || d_beta != nullptr || want_weight;
  const bool product_sums = want_sums && want_product && product_sums_rows;
  if (want_product) {
    if (cudaError_t err = product(partials, product_sums ? sum_parts : nullptr);
        err != cudaSuccess)
      return err;
  }
  if (want_sums && !product_sums) {
    const int64_t units = column_sum_units<T>(dy);
    if (units > 0) {
      column_sum_kernel<T><<<unit_grid(units), kUnitThreads, 0, stream>>>(
          dy, sum_parts, column_sums_vectorised<T>(dy));
      if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
  }
  if (d_beta != nullptr || d_bias != nullptr) {
    const int64_t n_sum_parts = product_sums ? 1 : column_sum_parts<T>(dy.rows, dy.cols);
    finish_kernel<T><<<unit_grid(mix.n_max * kWarp), kUnitThreads, 0, stream>>>(
        mix, bias, partials, n_partials, want_sums ? sum_parts : nullptr, n_sum_parts,
        static_cast<T*>(d_beta), static_cast<T*>(d_bias));
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t forward(DType dtype, const Matrix& x, const Mixture& mix, const Bias& bias, void* y,
                    cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_mixed_gemm<T, false>(x, mix, bias, y, stream);
  });
}

cudaError_t input_grad(DType dtype, const Matrix& dy, const Mixture& mix, void* dx,
                       cudaStream_t stream) {
  const Bias none{nullptr, BiasKind::kNone, 0, 0};
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_mixed_gemm<T, true>(dy, mix, none, dx, stream);
  });
}

cudaError_t combine(DType dtype, const Mixture& mix, const Bias& bias, void* weight,
                    void* mixed_bias, cudaStream_t stream, int64_t weight_row_stride) {
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t units = combine_units<T>(mix);
    if (units == 0) return cudaSuccess;
    combine_kernel<T><<<unit_grid(units), kUnitThreads, 0, stream>>>(
        mix, bias, static_cast<T*>(weight), weight_row_stride > 0 ? weight_row_stride : mix.n_in,
        static_cast<T*>(mixed_bias));
    return cudaGetLastError();
  });
}

size_t weight_grad_workspace_bytes(DType dtype, const Mixture& mix, int64_t tokens) {
  size_t bytes = 0;
  dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t parts = column_sum_parts<T>(tokens, mix.n_out), sum_parts = parts > 1 ? parts : 1;
    bytes = static_cast<size_t>((max_partials<T>(mix) * mix.m + sum_parts) * mix.n_out) *
            sizeof(acc_t<T>);
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t weight_grad(DType dtype, const Matrix& dy, const Matrix& x, const Mixture& mix,
                        const Bias& bias, void* d_experts, void* d_beta, void* d_bias,
                        void* workspace, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Cfg = Tiles<T>;
    const int64_t k_tiles = fused_partials<T>(mix), o_tiles = ceil_div(mix.n_out, Cfg::kGradRows);
    if (k_tiles > INT32_MAX || o_tiles > kMaxGridY) return cudaErrorInvalidConfiguration;
    return launch_weight_grad<T>(
        dy, mix, bias, d_experts, d_beta, d_bias, /*want_weight=*/false, workspace, stream, k_tiles,
        /*product_sums_rows=*/true, [&](acc_t<T>* partials, acc_t<T>* row_sums) {
          if (d_experts != nullptr && (mix.n_out < mix.n_max || mix.n_in < mix.k_max)) {
            const int64_t rows = mix.m * mix.n_max, col_blocks = ceil_div(mix.k_max, 256);
            const dim3 grid(static_cast<unsigned>(col_blocks < 8 ? col_blocks : 8),
                            static_cast<unsigned>(rows < kMaxGridY ? rows : kMaxGridY));
            zero_outside_slice_kernel<T><<<grid, 256, 0, stream>>>(static_cast<T*>(d_experts), mix);
            if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
          }
          if (k_tiles == 0 || o_tiles == 0) return cudaSuccess;
          weight_grad_kernel<T><<<dim3(static_cast<unsigned>(k_tiles),
                                       static_cast<unsigned>(o_tiles)), Cfg::kThreads, 0, stream>>>(
              dy, x, mix, static_cast<T*>(d_experts), partials, row_sums, vectorisable<T>(dy),
              vectorisable<T>(x), d_beta != nullptr);
          return cudaGetLastError();
        });
  });
}

cudaError_t weight_grad_from_product(DType dtype, const Matrix& product, const Matrix& dy,
                                     const Mixture& mix, const Bias& bias, void* d_experts,
                                     void* d_beta, void* d_bias, void* weight, void* workspace,
                                     cudaStream_t stream, int64_t weight_row_stride) {
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_weight_grad<T>(
        dy, mix, bias, d_experts, d_beta, d_bias, weight != nullptr, workspace, stream,
        expert_grad_partials<T>(mix), /*product_sums_rows=*/false,
        [&](acc_t<T>* partials, acc_t<T>*) {
          const int64_t units = expert_grad_units<T>(mix, d_experts != nullptr);
          if (units == 0) return cudaSuccess;
          const GradOut<T> out{static_cast<T*>(d_experts), d_beta != nullptr ? partials : nullptr,
                               static_cast<T*>(weight),
                               weight_row_stride > 0 ? weight_row_stride : mix.n_in};
          if (weight != nullptr) {
            expert_grad_kernel<T, true><<<unit_grid(units), kUnitThreads, 0, stream>>>(
                product, mix, out);
          } else {
            expert_grad_kernel<T, false><<<unit_grid(units), kUnitThreads, 0, stream>>>(
                product, mix, out);
          }
          return cudaGetLastError();
        });
  });
}

}  // namespace mos_cuda
