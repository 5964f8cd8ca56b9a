// Runs the CUDA backend's elementwise work units (csrc/cuda/mos_linear_elementwise.cuh) on the
// CPU, one unit after another over the same grid the kernels cover, with the same arguments the
// launchers in mos_linear_kernels.cu pass. Built by tests/test_cuda_emulation.py with the host
// compiler and loaded through ctypes: that is how these kernels are checked without a GPU. It
// also counts the elements each access path moves (16-byte slots, or element by element).
#define MOS_COUNT_ACCESSES
#include <memory>
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

// ------------------------------------------------------------------------------ pipelined one pass
// The pipelined forward / input-grad kernels (csrc/cuda/mos_linear_pipeline.cuh) block by block:
// every thread's Stage (staging, mixing, masks), the shared schedule pl::pipeline, the stages'
// swizzled layout, the lanes' ldmatrix offsets and accumulator maps are the kernel's own code;
// what the hardware does with them is emulated here from the PTX ISA's definitions:
//   ldmatrix .x4: lane l receives, of matrix q (whose row r is at the address lane 8q + r gives),
//     the elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1); with .trans (2 (l % 4), l / 4)
//     and (2 (l % 4) + 1, l / 4);
//   mma m16n8k8 (the sm_75 form; m16n8k16 is two of them on registers {0, 1}, {0} and {2, 3},
//     {1}): with g = l / 4, t = l % 4, A registers 0/1 hold (g, 2t..2t+1) / (g + 8, 2t..2t+1),
//     B's register (2t..2t+1, g), the accumulators (g, 2t..2t+1) and (g + 8, 2t..2t+1).
#include "mos_linear_pipeline.cuh"

namespace pl = mos_cuda::pipeline;

namespace {

// What the emulation saw besides the output: the kernel variant, hazards (a stage read in the
// phase it is written, or read before it was written), shared-memory bank conflicts of the
// ldmatrix reads and of the staging stores (16-byte accesses: each group of 8 lanes must hit 8
// distinct 16-byte bank groups), and ldmatrix rows outside the stage, not 16-byte aligned, or
// not where the kernel's constant fragment strides put them.
struct PipelineInfo {
  int64_t variant = 0, hazards = 0, load_conflicts = 0, store_conflicts = 0, bad_rows = 0;
};

// Whether the 8 byte offsets of a quarter warp's 16-byte accesses fall in distinct bank groups.
bool conflict_free(const int (&offsets)[8]) {
  bool seen[8] = {};
  for (int offset : offsets) {
    const int group = offset / 16 % 8;
    if (seen[group]) return false;
    seen[group] = true;
  }
  return true;
}

template <typename T, bool INPUT_GRAD, int MAXM>
struct EmulatedStep {
  using G = pl::Geometry<INPUT_GRAD>;
  std::vector<pl::Stage<T, INPUT_GRAD, MAXM>> threads;
  std::vector<T> stages;
  float acc[pl::kThreads / 32][32][pl::kFragsM][pl::kFragsN][4] = {};
  bool complete[2] = {false, false};  // written before the last sync
  int read = -1, written = -1;
  PipelineInfo& info;

  EmulatedStep(const Matrix& act, const Mixture& mix, int64_t row0, int64_t col0,
               PipelineInfo& info_)
      : stages(2 * G::kStageElems, from_acc<T>(0.0f / 0.0f)), info(info_) {
    threads.reserve(pl::kThreads);
    for (int t = 0; t < pl::kThreads; ++t) threads.emplace_back(act, mix, row0, col0, t);
  }

  static constexpr int kGroups = pl::Stage<T, INPUT_GRAD, MAXM>::kGroups;

  template <bool FULL>
  void fetch(int64_t d0, int g) {
    for (auto& t : threads) t.template fetch<FULL>(d0, g);
  }
  void mix(int g) {
    for (auto& t : threads) t.mix_group(g);
  }

  void store(int s) {
    if (s == read) ++info.hazards;
    written = s;
    for (auto& t : threads) t.store(stages.data() + s * G::kStageElems);
    // Bank groups of the warps' 16-byte stores, 8 lanes at a time (A chunks, then W chunks).
    for (int warp = 0; warp < pl::kThreads / 32; ++warp)
      for (int part = 0; part < 4; ++part) {
        for (int j = 0; j <= G::kAPerThread; ++j) {
          int offsets[8];
          for (int l = 0; l < 8; ++l) {
            const auto& t = threads[warp * 32 + part * 8 + l];
            offsets[l] = 2 * (j < G::kAPerThread ? G::A::offset(t.a_row(j), t.a_chunk(j))
                                                 : G::W::offset(t.w_row(), t.w_chunk()));
          }
          if (!conflict_free(offsets)) ++info.store_conflicts;
        }
      }
  }

  void sync() {
    if (written >= 0) complete[written] = true;
    read = written = -1;
  }

  // One ldmatrix.x4 of a warp: regs[lane][matrix][element].
  void ldmatrix(const T* stage, const int (&offsets)[32], bool trans, T (&regs)[32][4][2]) {
    for (int q = 0; q < 4; ++q) {
      int bytes[8];
      for (int r = 0; r < 8; ++r) {
        const int offset = offsets[8 * q + r];
        bytes[r] = 2 * offset;
        if (offset % 8 != 0 || offset < 0 || offset + 8 > G::kStageElems) ++info.bad_rows;
      }
      if (!conflict_free(bytes)) ++info.load_conflicts;
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 2; ++e) {
          const int row = trans ? 2 * (l % 4) + e : l / 4, col = trans ? l / 4 : 2 * (l % 4) + e;
          const int offset = offsets[8 * q + row];
          regs[l][q][e] = offset % 8 == 0 && offset >= 0 && offset + 8 <= G::kStageElems
                              ? stage[offset + col] : from_acc<T>(0.0f / 0.0f);
        }
    }
  }

  // mma m16n8k8 of one warp: c[lane] += A (registers a0, a1 of each lane) B (register b).
  static void mma_k8(float (&c)[32][4], const T (&a0)[32][2], const T (&a1)[32][2],
                     const T (&b)[32][2]) {
    float A[16][8], B[8][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 2; ++e) {
        A[g][2 * t + e] = to_acc(a0[l][e]);
        A[g + 8][2 * t + e] = to_acc(a1[l][e]);
        B[2 * t + e][g] = to_acc(b[l][e]);
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int r = 0; r < 4; ++r) {
        const int row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
        float sum = c[l][r];
        for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];
        c[l][r] = sum;
      }
    }
  }

  void mma(int s, int h) {
    if (!complete[s] || s == written) ++info.hazards;
    read = s;
    const T* stage = stages.data() + s * G::kStageElems;
    for (int warp = 0; warp < pl::kThreads / 32; ++warp) {
      T a[pl::kFragsM][32][4][2], b[pl::kFragsN / 2][32][4][2];
      int offsets[32];
      // The kernel computes one offset per lane and adds the constant fragment strides:
      // they must agree with the offset functions.
      for (int mi = 0; mi < pl::kFragsM; ++mi) {
        for (int l = 0; l < 32; ++l) {
          offsets[l] = pl::a_fragment_offset<INPUT_GRAD>(l, pl::warp_row(warp) + 16 * mi, 16 * h);
          if (offsets[l] != pl::a_fragment_offset<INPUT_GRAD>(l, pl::warp_row(warp), 16 * h) +
                                mi * pl::kAFragmentStride)
            ++info.bad_rows;
        }
        ldmatrix(stage, offsets, false, a[mi]);
      }
      for (int p = 0; p < pl::kFragsN / 2; ++p) {
        for (int l = 0; l < 32; ++l) {
          offsets[l] = pl::b_fragment_offset<INPUT_GRAD>(l, pl::warp_col(warp) + 16 * p, 16 * h);
          const int kernel = INPUT_GRAD
              ? pl::b_fragment_offset<INPUT_GRAD>(l, pl::warp_col(warp) + 16 * p, 0) +
                    h * pl::kBFragmentStride<INPUT_GRAD>
              : pl::b_fragment_offset<INPUT_GRAD>(l, pl::warp_col(warp), 16 * h) +
                    p * pl::kBFragmentStride<INPUT_GRAD>;
          if (offsets[l] != kernel) ++info.bad_rows;
        }
        ldmatrix(stage, offsets, INPUT_GRAD, b[p]);
      }
      for (int mi = 0; mi < pl::kFragsM; ++mi)
        for (int ni = 0; ni < pl::kFragsN; ++ni) {
          // Register r of lane l for this fragment pair.
          T a_reg[4][32][2], b_reg[2][32][2];
          for (int l = 0; l < 32; ++l)
            for (int e = 0; e < 2; ++e) {
              for (int r = 0; r < 4; ++r) a_reg[r][l][e] = a[mi][l][r][e];
              for (int r = 0; r < 2; ++r) b_reg[r][l][e] = b[ni / 2][l][2 * (ni % 2) + r][e];
            }
          float c[32][4];
          for (int l = 0; l < 32; ++l)
            for (int r = 0; r < 4; ++r) c[l][r] = acc[warp][l][mi][ni][r];
          mma_k8(c, a_reg[0], a_reg[1], b_reg[0]);
          mma_k8(c, a_reg[2], a_reg[3], b_reg[1]);
          for (int l = 0; l < 32; ++l)
            for (int r = 0; r < 4; ++r) acc[warp][l][mi][ni][r] = c[l][r];
        }
    }
  }
};

template <typename T, bool INPUT_GRAD, int MAXM>
void emulate_pipelined(const Matrix& act, const Mixture& mix, const Bias& bias, T* out,
                       PipelineInfo& info) {
  const int64_t cols = INPUT_GRAD ? mix.n_in : mix.n_out;
  for (int64_t row0 = 0; row0 < act.rows; row0 += pl::kRows)
    for (int64_t col0 = 0; col0 < cols; col0 += pl::kCols) {
      auto step = std::make_unique<EmulatedStep<T, INPUT_GRAD, MAXM>>(act, mix, row0, col0, info);
      pl::pipeline(INPUT_GRAD ? mix.n_out : mix.n_in, *step);
      for (int warp = 0; warp < pl::kThreads / 32; ++warp)
        for (int l = 0; l < 32; ++l)
          for (int mi = 0; mi < pl::kFragsM; ++mi)
            for (int ni = 0; ni < pl::kFragsN; ++ni)
              for (int h = 0; h < 2; ++h) {
                const int c = pl::acc_col(warp, l, ni, 2 * h);
                const float b0 = INPUT_GRAD ? 0.0f : pl::column_bias<T>(bias, mix, col0 + c);
                const float b1 = INPUT_GRAD ? 0.0f : pl::column_bias<T>(bias, mix, col0 + c + 1);
                pl::write_pair<T, INPUT_GRAD>(act, mix, out, row0, col0,
                                              pl::acc_row(warp, l, mi, 2 * h), c,
                                              step->acc[warp][l][mi][ni][2 * h] + b0,
                                              step->acc[warp][l][mi][ni][2 * h + 1] + b1);
              }
    }
}

template <typename T, bool INPUT_GRAD>
void emulate_variant(const Matrix& act, const Mixture& mix, const Bias& bias, T* out,
                     PipelineInfo& info) {
  info.variant = pl::variant<T>(act, mix, INPUT_GRAD);
  switch (info.variant) {
    case 2: return emulate_pipelined<T, INPUT_GRAD, 2>(act, mix, bias, out, info);
    case 4: return emulate_pipelined<T, INPUT_GRAD, 4>(act, mix, bias, out, info);
    case 8: return emulate_pipelined<T, INPUT_GRAD, 8>(act, mix, bias, out, info);
    default: return emulate_pipelined<T, INPUT_GRAD, 0>(act, mix, bias, out, info);
  }
}

}  // namespace

extern "C" {

// out = act @ W_a^T + b_a (input_grad 0; act is x) or act @ W_a (input_grad 1; act is dy), as
// the pipelined kernels compute it (fp16 and bf16 only). info: variant, hazards, ldmatrix bank
// conflicts, store bank conflicts, bad ldmatrix rows.
int mos_emulate_one_pass(int dtype, int input_grad, const Matrix* act, const Mixture* mix,
                         const Bias* bias, void* out, int64_t* info) {
  PipelineInfo seen;
  const cudaError_t status = dispatch(static_cast<DType>(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) != 2) {
      return cudaErrorInvalidValue;
    } else {
      if (input_grad)
        emulate_variant<T, true>(*act, *mix, *bias, static_cast<T*>(out), seen);
      else
        emulate_variant<T, false>(*act, *mix, *bias, static_cast<T*>(out), seen);
      return cudaSuccess;
    }
  });
  info[0] = seen.variant;
  info[1] = seen.hazards;
  info[2] = seen.load_conflicts;
  info[3] = seen.store_conflicts;
  info[4] = seen.bad_rows;
  return status;
}

}  // extern "C"
