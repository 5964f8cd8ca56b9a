// The per-thread units of the pipelined one-pass kernels for fp16 and bf16 (tensor cores):
//
//   forward      y  = x  @ W_a^T + b_a   (A = x,  tokens x n_in;  W tile rows o, columns k)
//   input grad   dx = dy @ W_a           (A = dy, tokens x n_out; W tile rows o, columns k)
//
// A block computes a kRows x kCols tile of the output in steps of kDepth along the depth (n_in
// forward, n_out input grad). Shared memory holds two stages (double buffer) of the A tile and
// of the mixed weight tile. Each step, every thread
//   1. issues the global loads of the next step's chunks into registers: its A chunks and its
//      weight chunk of each of the m experts (Stage::fetch),
//   2. runs its warp's tensor-core products on the current stage (mos_linear_kernels.cu),
//   3. mixes the m expert chunks in fp32 with beta, rounds once, and stores the mixed chunk and
//      the A chunks to the other stage (Stage::store), then one __syncthreads.
// So the loads of step k+1 are in flight while the tensor cores work on step k, and only the
// mixed tile reaches shared memory. beta of the block's rows is loaded once per block in the
// forward (its rows o are the block's output columns); the input grad's rows o move with the
// depth, so their beta comes with each step's expert loads.
//
// Everything here is __host__ __device__: tests/cuda_emulation.cpp runs the same units, the
// same schedule (pipeline()) and the same shared-memory layout and fragment index maps on the
// CPU, with the documented semantics of ldmatrix and mma.sync emulated per lane, against a
// float64 reference (tests/test_cuda_emulation.py).
//
// Fast kernels (MAXM = 2, 4, 8 held experts, m <= MAXM): rows 16-byte aligned with unit column
// stride (x or dy, and the experts), and for the input grad n_in a multiple of 8 and beta's
// experts contiguous (as the binding passes it, neuron- or layer-wise). Their main
// loop runs only over whole depth steps with 16-byte loads and no masks: rows past the matrix
// read a valid row instead (clamped) and only feed outputs the epilogue does not write. The one
// partial last step goes through the masked loads. Anything else (odd strides, misaligned rows,
// m > 8) runs the general kernel (MAXM = 0): masked element loads and the experts mixed as they
// arrive, every step.
#pragma once

#include <cstring>
#include <type_traits>

#include "mos_linear_elementwise.cuh"

// sm_70 has no ldmatrix or mma.sync of these shapes: there the kernels use WMMA, which needs
// padded rows instead of the XOR swizzle. MOS_PIPELINE_WMMA forces that path on newer GPUs, so
// that the sm_70 code is compile-checked by a toolkit that cannot target sm_70.
#if defined(MOS_PIPELINE_WMMA) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750)
#define MOS_PIPELINE_PADDED 1
#endif

namespace mos_cuda {
namespace pipeline {

using namespace elementwise;

constexpr int kThreads = 256;                 // 8 warps
constexpr int kRows = 128, kCols = 64;        // output tile: tokens x output columns
constexpr int kDepth = 32;                    // depth per step
constexpr int kVec = 8;                       // 16-bit elements per 16-byte chunk
constexpr int kWarpsM = 4, kWarpsN = 2;       // warp grid over the tile: 32 x 32 per warp
constexpr int kWarpRows = kRows / kWarpsM, kWarpCols = kCols / kWarpsN;
constexpr int kFragsM = kWarpRows / 16, kFragsN = kWarpCols / 8;  // m16 x n8 accumulators
constexpr int kMaxHeld = 8;                   // experts whose loads a fast kernel holds

// A (ROWS x COLS) tile of 16-bit elements in shared memory, addressed by row and 16-byte chunk.
// With ldmatrix (sm_75 on) rows are packed and the chunk index XOR-swizzled so that the eight
// row addresses of one 8x8 matrix, and the chunks a warp stores, fall in distinct 16-byte bank
// groups; for WMMA (sm_70) rows are padded by one chunk instead.
template <int ROWS, int COLS>
struct TileLayout {
  static constexpr int kChunks = COLS / kVec;  // chunks per row
  static_assert(COLS % kVec == 0 && (kChunks == 4 || kChunks % 8 == 0), "tile layout");
#if defined(MOS_PIPELINE_PADDED)
  static constexpr int kLd = COLS + kVec;
  static constexpr int kElems = ROWS * kLd;
  __host__ __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * kLd + chunk * kVec;
  }
#else
  static constexpr int kElems = ROWS * COLS;
  // 4 chunks a row: two rows share a 128-byte line, so rows 2j and 2j+1 take swizzle j % 4;
  // 8 or more: one line a row, swizzle row % 8 on the low three chunk bits.
  __host__ __device__ __forceinline__ static int swizzle(int row) {
    return kChunks == 4 ? (row >> 1) & 3 : row & 7;
  }
  __host__ __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * COLS + (chunk ^ swizzle(row)) * kVec;
  }
#endif
};

template <bool INPUT_GRAD>
struct Geometry {
  using A = TileLayout<kRows, kDepth>;                  // rows t, columns depth
  using W = TileLayout<INPUT_GRAD ? kDepth : kCols,     // forward: rows o (output columns),
                       INPUT_GRAD ? kCols : kDepth>;    //   columns k (depth); input grad:
                                                        //   rows o (depth), columns k (output)
  static constexpr int kAPerThread = kRows * A::kChunks / kThreads;
  static constexpr int kStageElems = A::kElems + W::kElems;
  static_assert(kRows * A::kChunks % kThreads == 0, "A chunks per thread");
  static_assert(kCols * kDepth / kVec == kThreads, "one weight chunk per thread");
};

// The kernel a launch runs: a fast one holding MAXM experts (2, 4 or 8) or the general one (0).
template <typename T>
__host__ __device__ inline int variant(const Matrix& act, const Mixture& mix, bool input_grad) {
  const bool fast = aligned_rows(act.data, act.row_stride, act.col_stride, kVec) &&
                    aligned_rows(mix.experts, mix.row_stride, mix.col_stride, kVec) &&
                    mix.expert_stride % kVec == 0 &&
                    (!input_grad || (mix.n_in % kVec == 0 && mix.beta_expert_stride == 1)) &&
                    mix.m <= kMaxHeld;
  if (!fast) return 0;
  return mix.m <= 2 ? 2 : mix.m <= 4 ? 4 : 8;
}

// A 16-byte chunk of 8 elements as four 32-bit words (element 2q in the low half of word q):
// kept whole so that loads and stores stay 16 bytes wide and the mixing converts both halves of
// a word in place.
struct alignas(16) Chunk {
  uint32_t w[4];
};

template <typename T>
__host__ __device__ __forceinline__ Chunk to_chunk(const Pack<T, kVec>& p) {
  Chunk c;
  memcpy(static_cast<void*>(&c), static_cast<const void*>(&p), sizeof(c));
  return c;
}

// The two elements of a word in fp32, and two fp32 values rounded into a word.
template <typename T>
__host__ __device__ __forceinline__ void unpack(uint32_t word, float& lo, float& hi) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&word));
    lo = f.x, hi = f.y;
  } else {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&word));
    lo = f.x, hi = f.y;
  }
#else
  T h[2];
  memcpy(static_cast<void*>(h), &word, sizeof(word));
  lo = to_acc(h[0]), hi = to_acc(h[1]);
#endif
}
template <typename T>
__host__ __device__ __forceinline__ uint32_t pack(float lo, float hi) {
  uint32_t word;
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    word = *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    word = *reinterpret_cast<const uint32_t*>(&h);
  }
#else
  const T h[2] = {from_acc<T>(lo), from_acc<T>(hi)};
  memcpy(&word, static_cast<const void*>(h), sizeof(word));
#endif
  return word;
}

// One thread's share of the staging: its A chunks and its weight chunk of each held expert, in
// registers between fetch() and store(). MAXM = 0: the general kernel, which mixes while it
// loads and keeps the mixed chunk in e[0].
template <typename T, bool INPUT_GRAD, int MAXM>
struct Stage {
  using G = Geometry<INPUT_GRAD>;
  using A = typename G::A;
  using W = typename G::W;
  using Acc = acc_t<T>;
  static constexpr int kHeld = MAXM > 0 ? MAXM : 1;
  // Experts are loaded and mixed in groups of at most kGroup: group 0 with the A chunks before
  // the first half of the step's products, group 1 (8 held) between the two halves, so that
  // only one group's chunks occupy registers at a time.
  static constexpr int kGroup = kHeld < 4 ? kHeld : 4;
  static constexpr int kGroups = kHeld / kGroup;
  static_assert(kHeld % kGroup == 0, "groups");
  // The fewest experts a launch of this kernel has (variant() sends m <= 2 to MAXM = 2, 3-4 to
  // 4, 5-8 to 8): experts below it need no "i < m" test.
  static constexpr int kMinM = MAXM <= 2 ? 1 : MAXM / 2 + 1;
  __host__ __device__ __forceinline__ bool has(int expert) const {
    return expert < kMinM || expert < mix.m;
  }

  const Matrix& act;  // the kernel's parameters (on the device, read from parameter space)
  const Mixture& mix;
  int tid;
  int64_t row0, col0;              // the block's first token and first output column
  const T* a_src[G::kAPerThread];  // fast loads: depth 0 of this thread's A rows (clamped)
  const T* e_src;                  // fast loads: expert 0 at depth 0 for this thread's chunk
  Chunk a[G::kAPerThread];
  Chunk e[kGroup];                 // the current group's expert chunks
  Acc beta[kHeld];                 // forward: the block's, loaded once; input grad: per step
  Acc sum[kVec];                   // the mixed chunk in fp32

  // Tile coordinates of this thread's chunks.
  __host__ __device__ __forceinline__ int a_row(int j) const {
    return (tid + j * kThreads) / A::kChunks;
  }
  __host__ __device__ __forceinline__ int a_chunk(int j) const {
    return (tid + j * kThreads) % A::kChunks;
  }
  __host__ __device__ __forceinline__ int w_row() const { return tid / W::kChunks; }
  __host__ __device__ __forceinline__ int w_chunk() const { return tid % W::kChunks; }
  // The global (o, k) of the first element of this thread's weight chunk at depth d0.
  __host__ __device__ __forceinline__ int64_t w_o(int64_t d0) const {
    return INPUT_GRAD ? d0 + w_row() : col0 + w_row();
  }
  __host__ __device__ __forceinline__ int64_t w_k(int64_t d0) const {
    return INPUT_GRAD ? col0 + w_chunk() * kVec : d0 + w_chunk() * kVec;
  }

  __host__ __device__ __forceinline__ Stage(const Matrix& act_, const Mixture& mix_, int64_t row0_,
                                            int64_t col0_, int tid_)
      : act(act_), mix(mix_), tid(tid_), row0(row0_), col0(col0_) {
    const T* act_data = static_cast<const T*>(act.data);
    const int64_t last = act.rows - 1;
    for (int j = 0; j < G::kAPerThread; ++j) {
      const int64_t t = row0 + a_row(j);
      a_src[j] = act_data + (t > last ? last : t) * act.row_stride + a_chunk(j) * kVec;
    }
    // Forward: row o clamped to the slice (past it only output columns >= n_out read it).
    // Input grad: column k clamped to the last whole chunk (n_in is a multiple of kVec there).
    const int64_t o = INPUT_GRAD ? w_row() : (w_o(0) < mix.n_out ? w_o(0) : mix.n_out - 1);
    const int64_t k = INPUT_GRAD ? (w_k(0) < mix.n_in ? w_k(0) : mix.n_in - kVec) : w_k(0);
    e_src = static_cast<const T*>(mix.experts) + o * mix.row_stride + k;
    for (int v = 0; v < kVec; ++v) sum[v] = 0;
    for (int i = 0; i < kGroup; ++i)
      for (int q = 0; q < 4; ++q) e[i].w[q] = 0;
    for (int i = 0; i < kHeld; ++i) {
      beta[i] = 0;
      if (!INPUT_GRAD && MAXM > 0 && i < mix.m && w_o(0) < mix.n_out)
        beta[i] = beta_at<T>(mix, w_o(0), i);
    }
  }

  // The loads of group g of the step at depth d0 (group 0 also loads the A chunks). FULL: the
  // whole step lies inside the depth and the inputs meet the fast kernel's conditions: 16-byte
  // loads, no masks, no branches. Held experts past m re-read expert m - 1 (valid memory; never
  // mixed in).
  template <bool FULL>
  __host__ __device__ __forceinline__ void fetch(int64_t d0, int g) {
    if constexpr (FULL && MAXM > 0) {
      if (g == 0)
MOS_UNROLL
        for (int j = 0; j < G::kAPerThread; ++j)
          a[j] = *reinterpret_cast<const Chunk*>(a_src[j] + d0);
      const int64_t first = has(g * kGroup) ? g * kGroup : mix.m - 1;
      const T* src = e_src + (INPUT_GRAD ? d0 * mix.row_stride : d0) + first * mix.expert_stride;
      // Input grad: beta's row for this step's o, experts contiguous (variant() checks).
      [[maybe_unused]] const T* b = static_cast<const T*>(mix.beta) +
                                    (d0 + w_row()) * mix.beta_row_stride;
MOS_UNROLL
      for (int i = 0; i < kGroup; ++i) {
        const int expert = g * kGroup + i;
        e[i] = *reinterpret_cast<const Chunk*>(src);
        if constexpr (INPUT_GRAD)
          if (has(expert)) beta[expert] = to_acc(b[expert]);
        if (has(expert + 1)) src += mix.expert_stride;
      }
    } else {
      fetch_masked(d0, g);
    }
  }

  // Element by element, zero outside the matrices: the partial last step, and every step of
  // the general kernel, which mixes here (all m experts in order, into sum) and has one group.
  __host__ __device__ void fetch_masked(int64_t d0, int g) {
    const T* act_data = static_cast<const T*>(act.data);
    if (g == 0)
      for (int j = 0; j < G::kAPerThread; ++j) {
        const int64_t t = row0 + a_row(j), c = d0 + a_chunk(j) * kVec;
        Pack<T, kVec> p;
        for (int v = 0; v < kVec; ++v)
          p.v[v] = t < act.rows && c + v < act.cols
                       ? act_data[t * act.row_stride + (c + v) * act.col_stride] : zero<T>();
        a[j] = to_chunk(p);
      }
    const int64_t o = w_o(d0), k = w_k(d0);
    const bool row_in = o < mix.n_out;
    if constexpr (MAXM > 0) {
      for (int i = 0; i < kGroup; ++i) {
        const int expert = g * kGroup + i;
        if (expert >= mix.m) continue;
        const T* row = expert_row<T>(mix, expert, row_in ? o : 0);
        Pack<T, kVec> p;
        for (int v = 0; v < kVec; ++v)
          p.v[v] = row_in && k + v < mix.n_in ? row[(k + v) * mix.col_stride] : zero<T>();
        e[i] = to_chunk(p);
        if constexpr (INPUT_GRAD) beta[expert] = row_in ? beta_at<T>(mix, o, expert) : Acc(0);
      }
    } else {
      for (int v = 0; v < kVec; ++v) sum[v] = 0;
      if (row_in)
        for (int64_t i = 0; i < mix.m; ++i) {
          const Acc b = beta_at<T>(mix, o, i);
          const T* row = expert_row<T>(mix, i, o);
          for (int v = 0; v < kVec; ++v)
            if (k + v < mix.n_in) sum[v] += b * to_acc(row[(k + v) * mix.col_stride]);
        }
    }
  }

  // Group g's experts into the fp32 sum: sum_i beta[o, i] E[i, o, k..k+8), experts in order
  // (group 0 starts the sum).
  __host__ __device__ __forceinline__ void mix_group(int g) {
    if constexpr (MAXM > 0) {
MOS_UNROLL
      for (int i = 0; i < kGroup; ++i) {
        const int expert = g * kGroup + i;
        if (expert == 0) {
MOS_UNROLL
          for (int q = 0; q < 4; ++q) {
            unpack<T>(e[i].w[q], sum[2 * q], sum[2 * q + 1]);
            sum[2 * q] *= beta[0];
            sum[2 * q + 1] *= beta[0];
          }
        } else if (has(expert)) {
MOS_UNROLL
          for (int q = 0; q < 4; ++q) {
            Acc lo, hi;
            unpack<T>(e[i].w[q], lo, hi);
            sum[2 * q] += beta[expert] * lo;
            sum[2 * q + 1] += beta[expert] * hi;
          }
        }
      }
    }
  }

  // The A chunks and the mixed weight chunk, rounded once to T, into one stage (A tile, then W
  // tile).
  __host__ __device__ __forceinline__ void store(T* stage) const {
MOS_UNROLL
    for (int j = 0; j < G::kAPerThread; ++j)
      *reinterpret_cast<Chunk*>(stage + A::offset(a_row(j), a_chunk(j))) = a[j];
    Chunk w;
MOS_UNROLL
    for (int q = 0; q < 4; ++q) w.w[q] = pack<T>(sum[2 * q], sum[2 * q + 1]);
    *reinterpret_cast<Chunk*>(stage + A::kElems + W::offset(w_row(), w_chunk())) = w;
  }
};

// The schedule every thread runs (uniform control flow), over `depth` in steps of kDepth, with
// Step::kGroups expert groups: s.fetch<FULL>(d0, group), s.mix(group), s.mma(stage, half) for
// the two 16-deep halves of a step, s.store(stage), s.sync(). Between two syncs the threads
// write one stage and read only the other, so one barrier a step suffices; the main loop covers
// the whole steps, then the partial one, if any, goes through the masked loads.
template <bool FULL, typename Step>
__host__ __device__ __forceinline__ void load_step(Step& s, int64_t d0) {
  for (int g = 0; g < Step::kGroups; ++g) {
    s.template fetch<FULL>(d0, g);
    s.mix(g);
  }
}
template <bool FULL, typename Step>
__host__ __device__ __forceinline__ void overlapped_step(Step& s, int64_t d0, int current) {
  s.template fetch<FULL>(d0, 0);
  s.mma(current, 0);
  if (Step::kGroups > 1) {
    s.mix(0);
    s.template fetch<FULL>(d0, 1);
  }
  s.mma(current, 1);
  s.mix(Step::kGroups - 1);
  s.store(current ^ 1);
  s.sync();
}

template <typename Step>
__host__ __device__ __forceinline__ void pipeline(int64_t depth, Step& s) {
  static_assert(Step::kGroups == 1 || Step::kGroups == 2, "one or two expert groups");
  const int64_t whole = depth / kDepth;
  if (whole > 0) {
    load_step<true>(s, 0);
  } else {
    load_step<false>(s, 0);
  }
  s.store(0);
  s.sync();
  int64_t step = 0;
  for (; step + 1 < whole; ++step)
    overlapped_step<true>(s, (step + 1) * kDepth, static_cast<int>(step & 1));
  if (whole > 0 && depth % kDepth != 0) {
    overlapped_step<false>(s, whole * kDepth, static_cast<int>(step & 1));
    ++step;
  }
  s.mma(static_cast<int>(step & 1), 0);
  s.mma(static_cast<int>(step & 1), 1);
}

// ------------------------------------------------------------------------------ fragments
// Warp w owns rows warp_row(w).. +32 and columns warp_col(w).. +32 of the block's tile.
__host__ __device__ __forceinline__ int warp_row(int warp) { return warp / kWarpsN * kWarpRows; }
__host__ __device__ __forceinline__ int warp_col(int warp) { return warp % kWarpsN * kWarpCols; }

// The element offset (in a stage) each lane gives ldmatrix.x4. A (m16 x k16 at rows r0, depth
// kk): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15),
// i.e. the four A registers of mma m16n8k16 (two m16n8k8 A fragments).
template <bool INPUT_GRAD>
__host__ __device__ __forceinline__ int a_fragment_offset(int lane, int r0, int kk) {
  return Geometry<INPUT_GRAD>::A::offset(r0 + (lane & 15), kk / kVec + (lane >> 4));
}
// B of two n8 blocks (columns n0..n0+15) x k16: matrices (n block 0, k 0-7), (block 0, k 8-15),
// (block 1, k 0-7), (block 1, k 8-15). Forward: the tile's rows are n, loaded as they are;
// input grad: its rows are k, loaded transposed (ldmatrix .trans).
template <bool INPUT_GRAD>
__host__ __device__ __forceinline__ int b_fragment_offset(int lane, int n0, int kk) {
  using G = Geometry<INPUT_GRAD>;
  if constexpr (INPUT_GRAD) {
    return G::A::kElems +
           G::W::offset(kk + (lane & 7) + ((lane >> 3) & 1) * 8, n0 / kVec + (lane >> 4));
  } else {
    return G::A::kElems +
           G::W::offset(n0 + (lane & 7) + (lane >> 4) * 8, kk / kVec + ((lane >> 3) & 1));
  }
}

// With the swizzle (it repeats every 8 rows) the fragments 16 rows further down a tile are a
// constant distance away: A fragments 16 rows apart, and B's 16 rows apart (forward: the next
// two n blocks; input grad: the next 16 of the depth). The kernels add these to one offset a
// lane computes once; the emulation checks them against the functions above.
constexpr int kAFragmentStride = 16 * kDepth;
template <bool INPUT_GRAD>
constexpr int kBFragmentStride = 16 * (INPUT_GRAD ? kCols : kDepth);

// Accumulator register r (0-3) of the m16n8 fragment (mi, ni) of a lane: its row and column in
// the block's tile.
__host__ __device__ __forceinline__ int acc_row(int warp, int lane, int mi, int r) {
  return warp_row(warp) + mi * 16 + lane / 4 + (r >= 2 ? 8 : 0);
}
__host__ __device__ __forceinline__ int acc_col(int warp, int lane, int ni, int r) {
  return warp_col(warp) + ni * 8 + lane % 4 * 2 + (r & 1);
}

// Output elements (row, col) and (row, col + 1), col even, of a contiguous (rows, cols) out;
// those outside are not written. Even cols: one 4-byte store.
template <typename T>
__host__ __device__ __forceinline__ void store_pair(T* out, int64_t rows, int64_t cols,
                                                    int64_t row, int64_t col, acc_t<T> v0,
                                                    acc_t<T> v1) {
  if (row >= rows || col >= cols) return;
  T* p = out + row * cols + col;
  if (col + 1 < cols && cols % 2 == 0) {
    Pack<T, 2> pair;
    pair.v[0] = from_acc<T>(v0);
    pair.v[1] = from_acc<T>(v1);
    *reinterpret_cast<Pack<T, 2>*>(p) = pair;
  } else {
    p[0] = from_acc<T>(v0);
    if (col + 1 < cols) p[1] = from_acc<T>(v1);
  }
}

// b_a[o] (0 past n_out or without a bias), as mixed_bias, with its expert loop kept rolled: the
// epilogue calls it for each of a lane's columns.
template <typename T>
__host__ __device__ __forceinline__ acc_t<T> column_bias(const Bias& bias, const Mixture& mix,
                                                         int64_t o) {
  if (bias.kind == BiasKind::kNone || o >= mix.n_out) return 0;
  if (bias.kind == BiasKind::kShared) return bias_at<T>(bias, 0, o);
  acc_t<T> total = 0;
MOS_NO_UNROLL
  for (int64_t i = 0; i < mix.m; ++i) total += beta_at<T>(mix, o, i) * bias_at<T>(bias, i, o);
  return total;
}

// The epilogue's pair (r, c), (r, c + 1) of the block's tile (bias already added) to out, where
// it lies inside.
template <typename T, bool INPUT_GRAD>
__host__ __device__ __forceinline__ void write_pair(const Matrix& act, const Mixture& mix, T* out,
                                                    int64_t row0, int64_t col0, int r, int c,
                                                    acc_t<T> v0, acc_t<T> v1) {
  store_pair<T>(out, act.rows, INPUT_GRAD ? mix.n_in : mix.n_out, row0 + r, col0 + c, v0, v1);
}

}  // namespace pipeline
}  // namespace mos_cuda
