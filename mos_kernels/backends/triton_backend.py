"""Triton kernels for CUDA tensors (sm_80 and newer), and for CPU tensors under TRITON_INTERPRET=1.

Two strategies, picked per call by the ``strategy`` argument of forward and backward:

- "one_pass": y = x @ W_a^T + b_a and dx = dy @ W_a by one GEMM kernel each, whose weight-tile load
  combines the m expert tiles with beta in registers before the dot product; W_a never exists
  in memory. The weight gradient is one kernel computing G = dy^T x tile by tile over the tokens,
  which writes the m slices of dexperts, the row sums s = sum_t dy and per-tile dbeta partials
  from its epilogue.
- "combine": one pass writes W_a (n_out, n_in) (and the mixed bias), then torch (cuBLAS) runs the
  GEMMs; G = dy^T x by torch.mm too (in the input dtype), then the same epilogue kernel reads G
  instead of computing it, and writes W_a again for dx from the expert tiles it reads for the
  dbeta partials (no second combine pass). Meant for large token counts: the one-pass kernels
  recombine each weight tile once per token tile, on the CUDA cores, while combine does it once.
- "auto" (the default): ``choose_strategy``: "combine" from COMBINE_MIN_TOKENS tokens on (per
  GPU generation and number of experts, from the cost model of benchmarks/roofline.py; see
  docs/design.md, section 4), and always for exact fp32 (TF32 not allowed) and fp64, whose dots
  Triton runs on the CUDA cores.

dbeta and dbias come from a second small kernel that sums the dbeta partials over the k tiles in
a fixed order (no float atomics), so gradients are bit-identical from run to run for a given tile
configuration (and, for "combine", as deterministic as cuBLAS is). The tile configuration is
picked by timing, once per problem key (sizes bucketed to powers of two) and process (_Tuned,
not triton.autotune: its per-call key cost more host time than the launch); small problems and
the interpreter use one fixed configuration.

Precision: fp16 and bf16 inputs accumulate in fp32. "combine" mixes W_a in fp32 and rounds it
once to the input dtype; "one_pass" mixes in the input dtype (packed half2 multiply-adds, each
step rounded to nearest: _mix_tile; the forward for m <= RELATIVE_MAX_EXPERTS relative to each
row's expert of largest |beta|, its output scaled by that beta: _mix_relative), which is what
makes its mixing cheap enough to hide behind the tensor cores. fp64 inputs use fp64 throughout.
fp32 inputs follow torch.backends.cuda.matmul.allow_tf32 (False by default: exact fp32 dot
products, as cuBLAS does), so both strategies round alike; with TF32 allowed both use TF32
tensor cores.
"""
import contextlib
import os

import torch

STRATEGIES = ("auto", "one_pass", "combine")
# The rule of "auto" for half-precision (and TF32) inputs: combine-then-cuBLAS from this many
# tokens (rows of x) on, per GPU generation (compute capability major) and number of experts
# m = 1, 2, ...; None: one pass at every token count. These are the token counts from which
# benchmarks/roofline.py (--rule) predicts combine faster than one pass for forward + backward,
# with the one-pass kernels charged by the issue slots of their compiled main loops, on at
# least half of the benchmark shapes (to first order the crossing does not depend on the
# shape: the one-pass mixing and combine's extra passes both grow with n_out x n_in, the GEMMs
# with tokens x n_out x n_in). More experts than listed take the last entry; GPU generations
# not listed (and the interpreter) take sm_90's.
COMBINE_MIN_TOKENS = {
    8: (None, None, None, None, 24576, 12288),
    9: (None, None, None, None, None, None),
}

# One-pass configurations (BLOCK_T, BLOCK_N, BLOCK_K, num_warps) that spill registers, per
# kernel, compute capability major and number of experts: each list holds for the m above the
# previous list's up to its own (m <= 2; 3 and 4; 5 and 6; 7 and more). From
# tests/triton_compile.py (Triton 3.9; bf16 and fp16 at m = 2, 4 and 6 in the compile tests,
# bf16 at m = 3, 5 and 8 once: docs/results.md, "Triton one-pass kernels"). The backend leaves
# them out there, and benchmarks/roofline.py does not charge them. All are sm_80 to sm_89's:
# the unswapped form mixes each weight element in every warp that shares it, and a 256-token
# tile of 4 warps holds 128 accumulators per thread in mma.sync's layout.
_DX_SPILLS_SM80 = {(256, 64, 64, 8), (128, 128, 64, 8), (64, 64, 64, 4), (256, 64, 32, 4)}
ONE_PASS_SPILLS = {
    ("forward", 8): {2: set(), 8: {(256, 64, 32, 4)}},
    ("grad_input", 8): {2: {(256, 64, 32, 4)}, 6: _DX_SPILLS_SM80,
                        8: _DX_SPILLS_SM80 | {(128, 128, 32, 8), (128, 64, 32, 4)}},
}


# The one-pass forward mixes relative to each weight row's pivot expert (RELATIVE in
# _forward_kernel) for up to this many experts. The per-row choice of expert gives each
# expert's tile its own addresses, held in registers through the loop; with more experts they
# spill on sm_80 (docs/results.md, "Triton one-pass kernels").
RELATIVE_MAX_EXPERTS = 4


# The fewest tokens (BLOCK_T) of a forward tile that runs in the SWAP form (_forward_kernel) on a
# GPU that takes it: for 32 tokens the unswapped form issues fewer instructions per k-step
# (docs/results.md, "Triton one-pass kernels").
SWAP_MIN_TOKENS = 64


# One-pass configurations left out although they fit, per kernel and compute capability major:
# the sm_90 forward's 64 x 64 x 32 tile, the only one whose main loop issues more than 1.5x a
# plain Triton matmul's instructions per k-step at m = 2 (its dot is short for what the mixing
# adds to every step); 64 x 64 x 64 serves that tile shape (docs/results.md, "Triton one-pass
# kernels").
ONE_PASS_LONG_LOOPS = {("forward", 9): {(64, 64, 32, 4)}}


def one_pass_left_out(kernel, major, m, tile):
    """Whether the backend leaves out the one-pass ``kernel`` ("forward", "grad_input") at
    ``tile`` (BLOCK_T, BLOCK_N, BLOCK_K, num_warps) for m experts on compute capability
    ``major``: it spills there (ONE_PASS_SPILLS) or its loop is too long (ONE_PASS_LONG_LOOPS)."""
    lists = sorted(ONE_PASS_SPILLS.get((kernel, major), {}).items())
    spilling = next((s for experts, s in lists if m <= experts), lists[-1][1] if lists else ())
    return tile in spilling or tile in ONE_PASS_LONG_LOOPS.get((kernel, major), ())

try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001  a missing or broken triton only disables this backend
    triton = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

# Triton decides at kernel definition time whether kernels are interpreted on the CPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device):
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return f"triton is not importable: {_IMPORT_ERROR}"
    if device.type == "cpu":
        if _INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("it runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before "
                "mos_kernels loads its Triton kernels")
    if device.type != "cuda":
        return f"it runs on CUDA tensors, got a tensor on {device}"
    if not torch.cuda.is_available():
        return "this torch has no usable CUDA device"
    if torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the Triton kernels need sm_80 or newer, this GPU is sm_{major}{minor}"
    return None


def choose_strategy(tokens: int, n_out: int, n_in: int, num_experts: int,
                    dtype: torch.dtype = torch.bfloat16, strategy: str = "auto",
                    device=None) -> str:
    """The strategy a call runs: ``strategy`` when it names one, else the rule of "auto" for
    a call on ``device`` (None: the current CUDA device if any)."""
    if strategy != "auto":
        if strategy not in STRATEGIES:
            raise ValueError(f"mos_linear (triton): strategy must be one of {STRATEGIES}, "
                             f"got {strategy!r}")
        return strategy
    if dtype == torch.float64 or (dtype == torch.float32 and not _tf32_allowed()):
        # Exact fp32 and fp64 dots run on the CUDA cores in Triton: compiled for sm_80 and
        # sm_90 the one-pass kernels then spill kilobytes of registers per thread
        # (tests/triton_compile.py), where cuBLAS has its exact GEMMs.
        return "combine"
    threshold = combine_min_tokens(num_experts, device)
    return "combine" if threshold is not None and tokens >= threshold else "one_pass"


_MAJORS = {}


def _major(device):
    """Compute capability major of ``device`` (None: the current CUDA device); 9 where there
    is no CUDA device (the interpreter)."""
    key = None if device is None else str(device)
    major = _MAJORS.get(key)
    if major is None:
        major = 9
        dev = torch.device("cuda") if device is None else torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
            major = torch.cuda.get_device_capability(dev)[0]
        _MAJORS[key] = major
    return major


def combine_min_tokens(num_experts: int, device=None):
    """The token count from which "auto" runs combine for half inputs (COMBINE_MIN_TOKENS)."""
    table = COMBINE_MIN_TOKENS.get(_major(device), COMBINE_MIN_TOKENS[9])
    return table[min(max(num_experts, 1), len(table)) - 1]


if triton is not None:

    @triton.jit
    def _mixed(E_ptrs, stride_ei, Beta_ptrs, stride_bi, e_mask, beta_mask, M: tl.constexpr,
               ACC: tl.constexpr):
        """sum_i beta[., i] * E[i, ., .] over one tile in ACC precision; the beta pointers
        broadcast against the expert pointers. Pointers advance per expert, so no i * stride
        product can overflow int32."""
        w = tl.load(Beta_ptrs, mask=beta_mask, other=0.0).to(ACC) * \
            tl.load(E_ptrs, mask=e_mask, other=0.0).to(ACC)
        for _ in tl.static_range(1, M):
            E_ptrs += stride_ei
            Beta_ptrs += stride_bi
            w += tl.load(Beta_ptrs, mask=beta_mask, other=0.0).to(ACC) * \
                tl.load(E_ptrs, mask=e_mask, other=0.0).to(ACC)
        return w

    @triton.jit
    def _grouped_tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      GROUP: tl.constexpr):
        """(row tile, column tile) of this program; GROUP row tiles run next to each other so
        that the weight tiles they share stay in L2."""
        pid = tl.program_id(0)
        n_r = tl.cdiv(rows, BLOCK_R)
        n_c = tl.cdiv(cols, BLOCK_C)
        per_group = GROUP * n_c
        first = (pid // per_group) * GROUP
        size = tl.minimum(n_r - first, GROUP)
        return first + (pid % per_group) % size, (pid % per_group) // size

    # Arguments that do not shape the hot loop's memory accesses are not specialised on (Triton
    # would otherwise compile a variant per divisibility-by-16 or == 1 of each): the token count
    # (masks across rows only), beta's and the bias' strides (a handful of scalar-per-row loads),
    # the bias kind. Far fewer compiles for the same machine code. Every argument costs host time
    # per launch (Triton's binder inspects each one), so the kernels take no more than they read.
    _SMALL_LOADS = ["stride_bo", "stride_bi", "stride_bias0", "stride_bias1"]

    @triton.jit
    def _index(v, WIDE: tl.constexpr):
        """Index arithmetic in 64 bits only where the launcher found that 32 could overflow
        (_offsets_fit_int32): 32-bit offsets save the main loop most of its address arithmetic."""
        if WIDE:
            v = tl.cast(v, tl.int64)
        return v

    @triton.jit
    def _rounded(w, DTYPE: tl.constexpr):
        """w rounded to DTYPE, in w's type: a no-op where they are one type (half inputs on a
        GPU, fp32, fp64). Otherwise (bf16 under the interpreter, which mixes it in fp32, see
        _types) round to nearest even by hand: the interpreter's casts to bf16 truncate."""
        if w.dtype == DTYPE:
            out = w
        else:
            tl.static_assert((w.dtype == tl.float32) & (DTYPE == tl.bfloat16))
            bits = w.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        return out

    # The interpreter's casts from fp32 to bf16 truncate, a GPU's round to nearest even: the
    # kernels' bf16 stores round by hand there (_stored), so that they store what a GPU would.
    _TRUNCATING_BF16 = tl.constexpr(_INTERPRETED)

    @triton.jit
    def _stored(v, DTYPE: tl.constexpr):
        """v converted to DTYPE for a store, rounded to nearest even."""
        if _TRUNCATING_BF16 and (DTYPE == tl.bfloat16) and (v.dtype == tl.float32):
            out = _rounded(v, DTYPE).to(DTYPE)  # exact: the low 16 bits are zero
        else:
            out = v.to(DTYPE)
        return out

    @triton.jit
    def _load_beta(B, offsets, mask, I: tl.constexpr, WORDS: tl.constexpr, DTYPE: tl.constexpr):
        """Expert I's beta over a tile: B points at its column (WORDS: at the int32 word that
        holds experts I - I % 2 and I - I % 2 + 1, low half first)."""
        if WORDS:
            word = tl.load(B + offsets, mask=mask, other=0)
            b = ((word >> (16 * (I % 2))) & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
        else:
            b = tl.load(B + offsets, mask=mask, other=0.0)
        return b

    # Whether the kernels may use inline PTX (the interpreter cannot run it).
    _PTX = tl.constexpr(not _INTERPRETED)

    @triton.jit
    def _packed_mul(a, b):
        """a * b, rounded to nearest, in PTX's packed half instructions (two elements each)."""
        if b.dtype == tl.bfloat16:
            out = tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                            dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            tl.static_assert(b.dtype == tl.float16)
            out = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                            dtype=tl.float16, is_pure=True, pack=2)
        return out

    @triton.jit
    def _packed_fma(a, b, c):
        """a * b + c, rounded once to nearest, in PTX's packed half instructions."""
        if b.dtype == tl.bfloat16:
            out = tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                            [a, b, c], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            tl.static_assert(b.dtype == tl.float16)
            out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                            [a, b, c], dtype=tl.float16, is_pure=True, pack=2)
        return out

    @triton.jit
    def _mix_tile(E0, e_offsets, e_mask, stride_e0, B0, beta_offsets, beta_mask, stride_bi,
                  M: tl.constexpr, DOT: tl.constexpr, BETA_WORDS: tl.constexpr,
                  PACKED: tl.constexpr = False):
        """sum_i beta[., i] * E[i, ., .] over one tile, as DOT (the dot's operand type), each
        step rounded to the input dtype. For half inputs on a GPU that makes the mixing packed
        bf16x2/fp16x2 multiply-adds, two elements per instruction and no conversions (fp32
        mixing spends several times the issue slots, which the main loop cannot hide behind the
        tensor cores); it rounds as the naive form computed in that dtype does. E0 and B0 are
        scalar pointers (expert 0, beta column 0) to which the tile's offsets are added: the
        offsets are shared by all experts, so stepping to the next expert is one scalar pointer
        add. BETA_WORDS: beta read as int32 words of two experts' values (B0, beta_offsets and
        stride_bi in words), 4-byte loads that cp.async can pipeline. PACKED (half inputs, on a
        GPU): the same operations written in PTX's packed instructions, for tiles whose two
        elements of a register take different betas (dx's transposed tile, where they lie at
        neighbouring output features): from tl.fma's one scalar fma per element, ptxas there
        issues a half-width instruction per element and packs the results, where packing the
        betas once serves every row of the tile."""
        e = tl.load(E0 + e_offsets, mask=e_mask, other=0.0)
        b = _load_beta(B0, beta_offsets, beta_mask, 0, BETA_WORDS, e.dtype)
        if PACKED:
            w = _packed_mul(b, e)
        else:
            w = _rounded(b.to(DOT) * e.to(DOT), e.dtype)
        for i in tl.static_range(1, M):
            E0 += stride_e0
            if (not BETA_WORDS) or (i % 2 == 0):
                B0 += stride_bi
            e = tl.load(E0 + e_offsets, mask=e_mask, other=0.0)
            b = _load_beta(B0, beta_offsets, beta_mask, i, BETA_WORDS, e.dtype)
            if PACKED:
                w = _packed_fma(b, e, w)
            else:
                # an explicit fma: from a sum of products the compiler makes unpacked scalar
                # adds for m > 2
                w = _rounded(tl.fma(b.to(DOT), e.to(DOT), w), e.dtype)
        return w

    @triton.jit
    def _column(v, COLUMN: tl.constexpr):
        """A vector as a (n, 1) column of a tile (COLUMN) or as a (1, n) row."""
        if COLUMN:
            out = v[:, None]
        else:
            out = v[None, :]
        return out

    @triton.jit
    def _pivot(B, stride_bi, mask, M: tl.constexpr, ACC: tl.constexpr):
        """Per row of beta (B: a pointer per row, at its first expert): the index of the expert
        of largest |beta| (the first of equals), and that beta in ACC."""
        scale = tl.load(B, mask=mask, other=0.0).to(ACC)
        pivot = tl.zeros(scale.shape, dtype=tl.int32)
        for i in tl.static_range(1, M):
            b = tl.load(B + i * stride_bi, mask=mask, other=0.0).to(ACC)
            larger = tl.abs(b) > tl.abs(scale)
            scale = tl.where(larger, b, scale)
            pivot = tl.where(larger, i, pivot)
        return pivot, scale

    @triton.jit
    def _mix_relative(E0, e_offsets, e_mask, stride_e0, B, stride_bi, pivot, scale,
                      M: tl.constexpr, DOT: tl.constexpr, WIDE: tl.constexpr,
                      ROWS: tl.constexpr):
        """E[p] + sum_{i != p} (beta_i / beta_p) E[i] over one tile, p each weight row's pivot
        expert (_pivot): the mixed tile divided by beta_p row by row, which the caller
        multiplies into its dot's output instead. The pivot's term takes no multiply, so mixing
        m experts takes m - 1 fused multiply-adds per element where _mix_tile takes m; the
        ratios lie in [-1, 1], so nothing overflows that the mixed weight would not. Ratios and
        each step rounded to the input dtype, as _mix_tile. ROWS: the weight rows are the
        tile's rows (else its columns)."""
        e = tl.load(E0 + _column(_index(pivot, WIDE) * stride_e0, ROWS) + e_offsets,
                    mask=e_mask, other=0.0)
        w = e.to(DOT)
        inverse = tl.where(scale != 0, 1.0 / tl.where(scale != 0, scale, 1.0), 0.0)
        for j in tl.static_range(1, M):
            other = j - 1 + (pivot <= j - 1).to(tl.int32)  # the experts but the pivot, in order
            ratio = tl.load(B + other * stride_bi).to(scale.dtype) * inverse
            e = tl.load(E0 + _column(_index(other, WIDE) * stride_e0, ROWS) + e_offsets,
                        mask=e_mask, other=0.0)
            r = _rounded(_column(ratio, ROWS).to(DOT), e.dtype)
            w = _rounded(tl.fma(r, e.to(DOT), w), e.dtype)
        return w

    # Under the interpreter, whose tiles are 32 tokens, every forward tile runs in the SWAP form
    # (SWAP_MIN_TOKENS), so that the tests run that form.
    _SWAP_MIN_TOKENS = tl.constexpr(0 if _INTERPRETED else SWAP_MIN_TOKENS)

    # SWAP (sm_90 and newer): both GEMM kernels compute the transpose of their output tile, so
    # that the mixed weight tile is the dot's first operand, which wgmma reads from registers: it
    # then stays asynchronous (the next tile is mixed while the tensor cores run) and the mixed
    # tile never makes a round trip through shared memory; only the activation and expert tiles
    # are pipelined through shared memory. Without SWAP (sm_80 to sm_89, whose mma.sync takes
    # both operands from registers) the mixed tile is the second operand: Triton spreads a
    # tile's warps more along the dot's columns than its rows, and every warp that shares the
    # weight tile's part mixes it again, so the tokens go along the rows. The forward's tiles of
    # fewer than SWAP_MIN_TOKENS tokens take that form on sm_90 too.
    # Rows and columns past the edges of the output are clamped rather than masked: they read
    # real data that reaches only outputs the store masks, so the loop's loads need the
    # reduction mask alone (the contiguous dimension of a load is never clamped: that would
    # hide its contiguity from the compiler, and with it vector and asynchronous copies).
    # RELATIVE: the forward mixes relative to each row's pivot expert (_mix_relative), one
    # multiply-add fewer per weight element, and scales its output rows by the pivot's beta.
    @triton.jit(do_not_specialize=["T", "bias_kind"] + _SMALL_LOADS)
    def _forward_kernel(X, E, Beta, Bias, Y, T, n_out, n_in,
                        stride_xt, stride_xk, stride_e0, stride_e1, stride_e2,
                        stride_bo, stride_bi, stride_bias0, stride_bias1, stride_yt, bias_kind,
                        M: tl.constexpr,
                        ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP: tl.constexpr, WIDE: tl.constexpr, SWAP: tl.constexpr,
                        RELATIVE: tl.constexpr):
        """y[t, o] = sum_k x[t, k] W_a[o, k] + b_a[o] for a (BLOCK_T, BLOCK_N) tile (SWAP: its
        transpose, stored transposed); bias_kind 0 none, 1 shared, 2 per expert."""
        # Tiles of fewer tokens than _SWAP_MIN_TOKENS run unswapped: as wgmma's N, 32 tokens
        # make a short dot for the mixing's cost, and mma.sync, with the mixed tile its register
        # operand, issues fewer instructions there
        swap: tl.constexpr = SWAP and (BLOCK_T >= _SWAP_MIN_TOKENS)
        pid_t, pid_n = _grouped_tile(T, n_out, BLOCK_T, BLOCK_N, GROUP)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        rows_in = _index(tl.minimum(rows, T - 1), WIDE)
        cols_in = _index(tl.minimum(cols, n_out - 1), WIDE)
        ks = _index(tl.arange(0, BLOCK_K), WIDE)
        if swap:
            x_offsets = ks[:, None] * stride_xk + rows_in[None, :] * stride_xt  # (K, T): x^T
            e_offsets = cols_in[:, None] * stride_e1 + ks[None, :] * stride_e2  # (N, K)
            beta_offsets = cols_in[:, None] * stride_bo  # loop-invariant: the loads are hoisted
            beta_ok = col_ok[:, None]
            acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=ACC)
        else:
            x_offsets = rows_in[:, None] * stride_xt + ks[None, :] * stride_xk  # (T, K)
            e_offsets = ks[:, None] * stride_e2 + cols_in[None, :] * stride_e1  # (K, N): W_a^T
            beta_offsets = cols_in[None, :] * stride_bo
            beta_ok = col_ok[None, :]
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
        beta_rows = Beta + cols_in * stride_bo
        if RELATIVE:
            pivot, scale = _pivot(beta_rows, stride_bi, cols_in < n_out, M, ACC)
        for k0 in range(0, n_in, BLOCK_K):
            k_ok = ks < n_in - k0
            k = _index(k0, WIDE)
            x = tl.load(X + k * stride_xk + x_offsets, mask=_column(k_ok, swap), other=0.0)
            if RELATIVE:
                w = _mix_relative(E + k * stride_e2, e_offsets, _column(k_ok, not swap),
                                  stride_e0, beta_rows, stride_bi, pivot, scale, M, DOT, WIDE,
                                  swap)
            else:
                w = _mix_tile(E + k * stride_e2, e_offsets, _column(k_ok, not swap), stride_e0,
                              Beta, beta_offsets, beta_ok, stride_bi, M, DOT, False)
            if swap:
                acc = tl.dot(w, x.to(DOT), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(x.to(DOT), w, acc, input_precision=PRECISION)
        if RELATIVE:
            # beta_p loaded again rather than kept: held through the loop, the per-row scale
            # takes registers from it (a mask unlike the first load's keeps the compiler from
            # merging the two)
            _, scale = _pivot(beta_rows, stride_bi, col_ok, M, ACC)
            acc = acc * _column(scale, swap)
        bias = tl.zeros((BLOCK_N,), dtype=ACC)
        if bias_kind == 1:
            bias = tl.load(Bias + cols_in * stride_bias1).to(ACC)
        if bias_kind == 2:
            bias = _mixed(Bias + cols_in * stride_bias1, stride_bias0, Beta + cols_in * stride_bo,
                          stride_bi, col_ok, col_ok, M, ACC)
        rows = _index(rows, WIDE)
        cols = _index(cols, WIDE)
        if swap:
            tl.store(Y + rows[None, :] * stride_yt + cols[:, None],
                     _stored(acc + bias[:, None], Y.dtype.element_ty),
                     mask=(rows < T)[None, :] & col_ok[:, None])
        else:
            tl.store(Y + rows[:, None] * stride_yt + cols[None, :],
                     _stored(acc + bias[None, :], Y.dtype.element_ty),
                     mask=(rows < T)[:, None] & col_ok[None, :])

    @triton.jit(do_not_specialize=["T", "stride_bo", "stride_bi"])
    def _grad_input_kernel(DY, E, Beta, DX, T, n_out, n_in,
                           stride_dyt, stride_dyo, stride_e0, stride_e1, stride_e2,
                           stride_bo, stride_bi, stride_dxt,
                           M: tl.constexpr, ACC: tl.constexpr,
                           DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                           WIDE: tl.constexpr, SWAP: tl.constexpr, BETA_WORDS: tl.constexpr,
                           LAYERWISE: tl.constexpr):
        """dx[t, k] = sum_o dy[t, o] W_a[o, k] for a (BLOCK_T, BLOCK_N) tile of dx (SWAP: its
        transpose, stored transposed); the loop runs over the output features o, BLOCK_K at a
        time. The tile sizes keep the forward's roles (BLOCK_N: the weight tile's rows in the
        dot, BLOCK_K: the reduction step), so a configuration gives both kernels the same dots.
        LAYERWISE: beta's rows are one row (stride_bo == 0, layer-wise MoS): its loads then do
        not depend on the step, so the compiler loads them once, before the loop, in the
        mixing's layout, and the loop reads no beta at all."""
        # Without it the loop's zero-trip path sets the accumulator after the loop's last wgmma
        # and before its final wait, and ptxas then serialises every wgmma of the loop. The
        # launcher guarantees it (_Dims).
        tl.assume(n_out > 0)
        pid_t, pid_k = _grouped_tile(T, n_in, BLOCK_T, BLOCK_N, GROUP)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        ks = _index(pid_k * BLOCK_N + tl.arange(0, BLOCK_N), WIDE)  # input features
        k_ok = ks < n_in
        rows_in = _index(tl.minimum(rows, T - 1), WIDE)
        os_ = _index(tl.arange(0, BLOCK_K), WIDE)  # output features, per step
        if SWAP:
            dy_offsets = os_[:, None] * stride_dyo + rows_in[None, :] * stride_dyt  # (O, T)
            e_offsets = ks[:, None] * stride_e2 + os_[None, :] * stride_e1  # (N, O): W_a^T
            beta_offsets = os_[None, :] * stride_bo
            acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=ACC)
        else:
            dy_offsets = rows_in[:, None] * stride_dyt + os_[None, :] * stride_dyo  # (T, O)
            e_offsets = os_[:, None] * stride_e1 + ks[None, :] * stride_e2  # (O, N): W_a
            beta_offsets = os_[:, None] * stride_bo
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
        if LAYERWISE:  # every output feature reads row 0's betas: no step offset, no mask
            beta_offsets = tl.zeros(beta_offsets.shape, beta_offsets.dtype)
            every_beta = tl.full(beta_offsets.shape, 1, tl.int1)
        for o0 in range(0, n_out, BLOCK_K):
            o_ok = os_ < n_out - o0
            o = _index(o0, WIDE)
            if LAYERWISE:
                beta_step, beta_ok = Beta, every_beta
            else:
                beta_step, beta_ok = Beta + o * stride_bo, _column(o_ok, not SWAP)
            if SWAP:
                dy = tl.load(DY + o * stride_dyo + dy_offsets, mask=o_ok[:, None], other=0.0)
                w = _mix_tile(E + o * stride_e1, e_offsets, k_ok[:, None] & o_ok[None, :],
                              stride_e0, beta_step, beta_offsets, beta_ok, stride_bi, M, DOT,
                              BETA_WORDS, _PTX and ((DOT == tl.bfloat16) or (DOT == tl.float16)))
                acc = tl.dot(w, dy.to(DOT), acc, input_precision=PRECISION)
            else:
                dy = tl.load(DY + o * stride_dyo + dy_offsets, mask=o_ok[None, :], other=0.0)
                w = _mix_tile(E + o * stride_e1, e_offsets, o_ok[:, None] & k_ok[None, :],
                              stride_e0, beta_step, beta_offsets, beta_ok, stride_bi, M, DOT,
                              BETA_WORDS)
                acc = tl.dot(dy.to(DOT), w, acc, input_precision=PRECISION)
        rows = _index(rows, WIDE)
        if SWAP:
            tl.store(DX + rows[None, :] * stride_dxt + ks[:, None],
                     _stored(acc, DX.dtype.element_ty),
                     mask=(rows < T)[None, :] & k_ok[:, None])
        else:
            tl.store(DX + rows[:, None] * stride_dxt + ks[None, :],
                     _stored(acc, DX.dtype.element_ty),
                     mask=(rows < T)[:, None] & k_ok[None, :])

    _WANTS = ["want_de", "want_parts", "want_s"]

    @triton.jit(do_not_specialize=["T", "N_max", "stride_bo", "stride_bi"] + _WANTS)
    def _weight_grad_kernel(DY, X, G, E, Beta, DE, Parts, S, W, T, n_out, n_in, N_max, K_max,
                            stride_dyt, stride_dyo, stride_xt, stride_xk, stride_go, stride_gk,
                            stride_e0, stride_e1, stride_e2, stride_bo, stride_bi, stride_de0,
                            want_de, want_parts, want_s, M: tl.constexpr,
                            ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                            FROM_G: tl.constexpr, WANT_W: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (o, k) tile of G = dy^T x (or of a given G), then in the epilogue:
        dE[i, o, k] = beta[o, i] G[o, k] for every expert over the whole (N_max, K_max) grid
        (exactly zero outside the slice), Parts[pid_k, o, i] = sum_k G[o, k] E[i, o, k] over
        this tile, and (tiles with pid_k == 0) s[o] = sum_t dy[t, o]. The want_* flags are
        runtime values: one compiled kernel serves every combination of needed gradients.
        WANT_W: also W_a (n_out, n_in) contiguous from the expert tiles read for Parts, for the
        combine strategy's dx."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        os_ = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        o_ok = os_ < n_out
        k_ok = ks < n_in
        os64 = os_.to(tl.int64)
        ks64 = ks.to(tl.int64)
        in_slice = (pid_n * BLOCK_N < n_out) & (pid_k * BLOCK_K < n_in)
        if FROM_G:
            acc = tl.load(G + os64[:, None] * stride_go + ks64[None, :] * stride_gk,
                          mask=o_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
            s = tl.zeros((BLOCK_N,), dtype=ACC)
            dy_cols = DY + os64[:, None] * stride_dyo
            x_cols = X + ks64[None, :] * stride_xk
            t_stop = in_slice.to(tl.int32) * T  # tiles outside the slice only write zeros
            sum_rows = (want_s != 0) & (pid_k == 0)
            for t0 in range(0, t_stop, BLOCK_T):
                ts = t0 + tl.arange(0, BLOCK_T)
                t_ok = ts < T
                ts64 = ts.to(tl.int64)
                dy_t = tl.load(dy_cols + ts64[None, :] * stride_dyt,
                               mask=o_ok[:, None] & t_ok[None, :], other=0.0)  # (N, T)
                x = tl.load(x_cols + ts64[:, None] * stride_xt,
                            mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # (T, K)
                acc = tl.dot(dy_t.to(DOT), x.to(DOT), acc, input_precision=PRECISION)
                if sum_rows:
                    s += tl.sum(dy_t.to(ACC), axis=1)
            if sum_rows:
                tl.store(S + os64, s, mask=o_ok)
        if want_de != 0:
            de_ptrs = DE + os64[:, None] * K_max + ks64[None, :]
            de_mask = (os_ < N_max)[:, None] & (ks < K_max)[None, :]
            beta_ptrs = Beta + os64 * stride_bo
            for _ in tl.static_range(M):
                b = tl.load(beta_ptrs, mask=o_ok, other=0.0).to(ACC)
                tl.store(de_ptrs, _stored(b[:, None] * acc, DE.dtype.element_ty), mask=de_mask)
                de_ptrs += stride_de0
                beta_ptrs += stride_bi
        if ((want_parts != 0) | WANT_W) & in_slice:
            mask = o_ok[:, None] & k_ok[None, :]
            e_ptrs = E + os64[:, None] * stride_e1 + ks64[None, :] * stride_e2
            part_ptrs = Parts + (pid_k.to(tl.int64) * n_out + os64) * M
            beta_ptrs = Beta + os64 * stride_bo
            w = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
            for _ in tl.static_range(M):
                e = tl.load(e_ptrs, mask=mask, other=0.0).to(ACC)
                if want_parts != 0:
                    tl.store(part_ptrs, tl.sum(acc * e, axis=1), mask=o_ok)
                if WANT_W:
                    w += tl.load(beta_ptrs, mask=o_ok, other=0.0).to(ACC)[:, None] * e
                e_ptrs += stride_e0
                part_ptrs += 1
                beta_ptrs += stride_bi
            if WANT_W:
                tl.store(W + os64[:, None] * n_in + ks64[None, :], _stored(w, W.dtype.element_ty),
                         mask=mask)

    @triton.jit(do_not_specialize=["n_parts", "n_out", "N_max", "bias_kind", "want_dbeta",
                                   "want_dbias"] + _SMALL_LOADS)
    def _beta_bias_grad_kernel(Parts, S, Beta, Bias, DBeta, DBias, n_parts, n_out, N_max,
                               stride_bo, stride_bi, stride_bias0, stride_bias1, bias_kind,
                               want_dbeta, want_dbias, M: tl.constexpr, ACC: tl.constexpr,
                               BLOCK: tl.constexpr):
        """dbeta[o, i] = sum over k tiles p, in order, of Parts[p, o, i], plus s[o] bias[i, o]
        for a per-expert bias; dbias = beta[o, i] s[o] (per expert) or s[o] (shared), zero for
        rows n_out <= o < N_max."""
        os_ = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        o_ok = os_ < n_out
        os64 = os_.to(tl.int64)
        s = tl.load(S + os64, mask=o_ok, other=0.0)
        beta_ptrs = Beta + os64 * stride_bo
        bias_ptrs = Bias + os64 * stride_bias1
        for i in tl.static_range(M):
            if want_dbeta != 0:
                total = tl.zeros((BLOCK,), dtype=ACC)
                for p in range(0, n_parts):
                    total += tl.load(Parts + (p * n_out + os64) * M + i, mask=o_ok, other=0.0)
                if bias_kind == 2:
                    total += s * tl.load(bias_ptrs, mask=o_ok, other=0.0).to(ACC)
                tl.store(DBeta + os64 * M + i, _stored(total, DBeta.dtype.element_ty), mask=o_ok)
            if (want_dbias != 0) & (bias_kind == 2):
                b = tl.load(beta_ptrs, mask=o_ok, other=0.0).to(ACC)
                tl.store(DBias + i * N_max + os64, _stored(b * s, DBias.dtype.element_ty),
                         mask=os_ < N_max)
            beta_ptrs += stride_bi
            bias_ptrs += stride_bias0
        if (want_dbias != 0) & (bias_kind == 1):
            tl.store(DBias + os64, _stored(s, DBias.dtype.element_ty), mask=os_ < N_max)

    @triton.jit(do_not_specialize=_SMALL_LOADS + ["bias_kind"])
    def _combine_kernel(E, Beta, Bias, W, MixedBias, n_out, n_in,
                        stride_e0, stride_e1, stride_e2, stride_bo, stride_bi,
                        stride_bias0, stride_bias1, bias_kind, M: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """W_a (n_out, n_in) contiguous, and b_a for a per-expert bias (tiles with pid_k == 0)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        os_ = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        o_ok = os_ < n_out
        k_ok = ks < n_in
        os64 = os_.to(tl.int64)
        ks64 = ks.to(tl.int64)
        mask = o_ok[:, None] & k_ok[None, :]
        w = _mixed(E + os64[:, None] * stride_e1 + ks64[None, :] * stride_e2, stride_e0,
                   Beta + os64[:, None] * stride_bo, stride_bi, mask, o_ok[:, None], M, ACC)
        tl.store(W + os64[:, None] * n_in + ks64[None, :], _stored(w, W.dtype.element_ty),
                 mask=mask)
        if (bias_kind == 2) & (pid_k == 0):
            b = _mixed(Bias + os64 * stride_bias1, stride_bias0, Beta + os64 * stride_bo,
                       stride_bi, o_ok, o_ok, M, ACC)
            tl.store(MixedBias + os64, _stored(b, MixedBias.dtype.element_ty), mask=o_ok)

    # ---------------------------------------------------------------- tile configurations
    def _config(num_warps, num_stages, **blocks):
        return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)

    # (token, output, reduction) tiles for the forward and dx GEMMs; the first is the one used
    # for small problems. The weight tile is recombined once per token tile, so the tall tiles
    # (256 tokens) halve that work at large token counts. (256 x 128 x 32 is not among them:
    # compiled, its forward spills registers and its dx needs more shared memory than an H100
    # has; nor 64 x 128 x 32 with 4 warps: a warp group holding 128 rows of the mixed tile
    # makes Triton pass it through shared memory; tests/test_triton_compile.py.)
    _GEMM_CONFIGS = [
        _config(4, 3, BLOCK_T=32, BLOCK_N=64, BLOCK_K=32, GROUP=8),
        _config(8, 3, BLOCK_T=256, BLOCK_N=64, BLOCK_K=64, GROUP=8),
        _config(4, 4, BLOCK_T=32, BLOCK_N=64, BLOCK_K=64, GROUP=8),
        _config(8, 3, BLOCK_T=128, BLOCK_N=128, BLOCK_K=32, GROUP=8),
        _config(8, 3, BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, GROUP=8),
        _config(4, 4, BLOCK_T=128, BLOCK_N=64, BLOCK_K=32, GROUP=8),
        _config(4, 3, BLOCK_T=64, BLOCK_N=64, BLOCK_K=64, GROUP=8),
        _config(4, 4, BLOCK_T=64, BLOCK_N=64, BLOCK_K=32, GROUP=8),
        _config(4, 2, BLOCK_T=32, BLOCK_N=32, BLOCK_K=32, GROUP=8),
        _config(4, 4, BLOCK_T=256, BLOCK_N=64, BLOCK_K=32, GROUP=8),
    ]
    # (output, input) tiles of G with a token step; the first is the one used for small problems.
    # BLOCK_K also sets how many dbeta partials there are.
    _WGRAD_CONFIGS = [
        _config(4, 4, BLOCK_N=64, BLOCK_K=64, BLOCK_T=32),
        _config(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_T=64),
        _config(8, 4, BLOCK_N=128, BLOCK_K=128, BLOCK_T=32),
        _config(4, 3, BLOCK_N=128, BLOCK_K=64, BLOCK_T=64),
        _config(4, 3, BLOCK_N=64, BLOCK_K=128, BLOCK_T=64),
        _config(4, 3, BLOCK_N=64, BLOCK_K=64, BLOCK_T=64),
        _config(4, 2, BLOCK_N=32, BLOCK_K=32, BLOCK_T=32),
    ]
    _COMBINE_CONFIGS = [
        _config(4, 1, BLOCK_N=32, BLOCK_K=128),
        _config(4, 1, BLOCK_N=64, BLOCK_K=64),
        _config(8, 1, BLOCK_N=64, BLOCK_K=128),
    ]
    _MIN_WGRAD_BLOCK_K = min(c.kwargs["BLOCK_K"] for c in _WGRAD_CONFIGS)
    # Weight-gradient configs (BLOCK_N, BLOCK_K, BLOCK_T, num_warps) whose WANT_W variant (the
    # combine strategy's, which also writes W_a) spills registers on sm_80 and sm_90: its
    # epilogue holds the G tile, W_a's accumulator and an expert tile at once. Same source as
    # ONE_PASS_SPILLS; _Tuned leaves them out for that variant.
    _WGRAD_W_SPILLS = {
        2: {(64, 128, 64, 4)},
        6: {(128, 128, 64, 8), (128, 128, 32, 8), (128, 64, 64, 4), (64, 128, 64, 4)},
    }

    def _one_pass_left_out(c, m, major, flags):
        """one_pass_left_out for a launch: the kernel is flags[0]."""
        tile = (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
        return one_pass_left_out(flags[0], major, m, tile)

    def _wgrad_spills(c, m, major, flags):
        """Whether weight-gradient config ``c`` spills for m experts in the variant ``flags``
        (the launch's: flags[2] is WANT_W)."""
        tile = (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_T"], c.num_warps)
        return bool(flags[2]) and tile in _WGRAD_W_SPILLS[2 if m <= 2 else 6]
    # Problems of at most this many multiply-adds (bucketed sizes) take the first config
    # untimed: they are launch-bound, and tuning them would cost more than it saves.
    _SMALL_PROBLEM = 2**24
    # Under the interpreter: one config, tiles of 32 (its cost grows with the number of programs).
    _INTERPRETER_TILES = dict(BLOCK_T=32, BLOCK_N=32, BLOCK_K=32)

    def _shared_memory_budget():
        try:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return int(getattr(props, "shared_memory_per_block_optin", 0)) or 99 * 1024
        except Exception:  # noqa: BLE001
            return 99 * 1024  # sm_86/sm_89, the smallest of the sm_80+ parts

    def _prune(configs, shared_elements, element_size, m, work):
        """Drop the configs whose tiles cannot fit in shared memory (the compiler would reject
        them, after compiling); problems of at most _SMALL_PROBLEM multiply-adds (``work``, from
        bucketed sizes) then take the first config that fits, untimed."""
        budget = _shared_memory_budget()
        need = lambda c: shared_elements(c.kwargs, c.num_stages, m) * element_size  # noqa: E731
        fits = [c for c in configs if need(c) <= budget] or [min(configs, key=need)]
        return fits[:1] if work <= _SMALL_PROBLEM else fits

    # Elements of shared memory a config takes: num_stages - 1 pipeline buffers of the loop's
    # loads (the activation tile and the m expert tiles), plus room for one activation tile and
    # one weight tile (the SWAP form keeps the mixed tile in registers, but sm_80 and the
    # epilogue's transposed store use shared memory too). An upper bound of what Triton 3.9
    # compiles for sm_80 and sm_90 (tests/test_triton_compile.py checks that against the
    # compiler). The forward's activation tile is (BLOCK_T, BLOCK_K) of x; dx's is
    # (BLOCK_T, BLOCK_K) of dy (its reduction step is BLOCK_K output features), and its loop
    # also loads beta's rows for each step.
    def _gemm_shared(c, stages, m):
        act_tile, weight_tile = c["BLOCK_T"] * c["BLOCK_K"], c["BLOCK_N"] * c["BLOCK_K"]
        return (stages - 1) * (act_tile + m * weight_tile) + act_tile + weight_tile

    def _grad_input_shared(c, stages, m):
        act_tile, weight_tile = c["BLOCK_T"] * c["BLOCK_K"], c["BLOCK_N"] * c["BLOCK_K"]
        per_stage = act_tile + m * weight_tile + m * c["BLOCK_K"]
        return (stages - 1) * per_stage + act_tile + weight_tile + m * c["BLOCK_K"]

    def _wgrad_shared(c, stages, m):
        per_stage = c["BLOCK_T"] * (c["BLOCK_N"] + c["BLOCK_K"])
        return (stages - 1) * per_stage + 2 * c["BLOCK_N"] * c["BLOCK_K"]  # + fp32 G tile


# -------------------------------------------------------------------- launchers
def _key(n):
    """Tuning key of a size: its power-of-two bucket, so that nearby shapes share a config."""
    return 1 << max(int(n) - 1, 0).bit_length()


# Under the interpreter: whether the one-pass kernels run in their SWAP form (the tests run both).
_INTERPRETER_SWAP = True


def _swapped(device):
    """SWAP for the one-pass kernels (see _forward_kernel): on sm_90 and newer."""
    if device.type != "cuda":
        return _INTERPRETER_SWAP
    return _major(device) >= 9


def _wide(t):
    """Whether a kernel's element offsets into ``t`` may overflow int32: its extent, plus a tile
    (up to 256 rows or columns) past each edge, which the kernels form and then mask or clamp."""
    return sum((n + 256) * abs(s) for n, s in zip(t.shape, t.stride())) >= 2**31


def _cdiv(a, b):  # plain Python: triton.cdiv is a jit function, slow to call from the host
    return -(-a // b)


class _Tuned:
    """A JIT kernel with its tile configurations, their shared-memory estimate (None: all
    fit, and all are timed) and the configurations to leave out (left_out(config, m, major,
    flags of the launch): those that spill registers, say; None: none; left out unless all
    are).

    The configuration is chosen once per problem key (the launch's flags, sizes bucketed to
    powers of two, m, dtype, dot precision): for small problems the first that fits, untimed;
    otherwise the fastest, timed on the problem itself. Launches then go straight to the JIT
    function's run(): Triton's autotuner would build a key from every argument (a str(dtype) per
    tensor) on every call, which cost more host time than the launch itself. Under the
    interpreter: the first configuration with the tiles of _INTERPRETER_TILES."""

    def __init__(self, fn, configs, shared=None, left_out=None):
        self.fn, self.configs, self.shared, self.left_out = fn, configs, shared, left_out
        self.chosen = {}

    def launch(self, d, flags, tokens, grid_of, args, constants):
        """Runs the kernel on ``args``, constexprs ``constants``, with this problem's
        configuration; returns the launch options (tiles included)."""
        key = (flags, _key(tokens))
        options = d.options.get(key)
        if options is None:
            tiles = self._choose(d, key, grid_of, args, constants)
            options = d.options[key] = dict(constants, **tiles)
        self.fn.run(*args, grid=grid_of(options), warmup=False, **options)
        return options

    def _choose(self, d, key, grid_of, args, constants):
        if _INTERPRETED:
            return {k: _INTERPRETER_TILES.get(k, v) for k, v in self.configs[0].kwargs.items()}
        problem = key + (d.n_out_key, d.n_in_key, d.m, d.dtype, d.precision, d.major)
        tiles = self.chosen.get(problem)
        if tiles is None:
            configs = self.configs
            if self.left_out is not None:
                configs = [c for c in configs
                           if not self.left_out(c, d.m, d.major, key[0])] or configs
            if self.shared is not None:
                work = key[1] * d.n_out_key * d.n_in_key
                configs = _prune(configs, self.shared, d.element_size, d.m, work)
            candidates = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                          for c in configs]
            if len(candidates) > 1:
                times = [self._time(c, grid_of, args, constants) for c in candidates]
                candidates = [candidates[times.index(min(times))]]
            tiles = self.chosen[problem] = candidates[0]
        return tiles

    def _time(self, tiles, grid_of, args, constants):
        def run():
            self.fn.run(*args, grid=grid_of(tiles), warmup=False, **constants, **tiles)
        try:  # 10 + 40 ms per config, not do_bench's 25 + 100: this runs in a training step
            return triton.testing.do_bench(run, warmup=10, rep=40)
        except Exception:  # noqa: BLE001  e.g. out of resources: not a candidate
            return float("inf")


def _types(dtype):
    """(accumulator, tl.dot operand) types. The interpreter multiplies bf16 as raw integers
    (triton 3.9), so there bf16 operands go in as fp32: the same exact products."""
    if dtype == torch.float64:
        return tl.float64, tl.float64
    dot = {torch.float16: tl.float16, torch.float32: tl.float32,
           torch.bfloat16: tl.float32 if _INTERPRETED else tl.bfloat16}[dtype]
    return tl.float32, dot


def _tf32_allowed():
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # newer torch refuses the legacy flag once fp32_precision was set
        return getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"


def _precision(dtype):
    return "tf32" if dtype == torch.float32 and _tf32_allowed() else "ieee"


def _bias_args(bias, beta):
    """(pointer, kind, expert stride, row stride); kind 0 none, 1 shared, 2 per expert."""
    if bias is None:
        return beta, 0, 0, 0
    if bias.dim() == 1:
        return bias, 1, 0, bias.stride(0)
    return bias, 2, bias.stride(0), bias.stride(1)


class _Dims:
    """A problem's sizes, types and launch constants, checked once per shape, dtype, device,
    strategy and dot precision (_problem keeps them); ``options`` keeps each kernel's launch
    options per token bucket."""

    def __init__(self, experts, beta, n_in, strategy, precision):
        # The op's contract checked shapes, dtypes and devices; these checks guard direct calls.
        if experts.dtype not in _DTYPES:
            raise TypeError(f"mos_linear (triton): experts have dtype {experts.dtype}; expected "
                            f"one of {', '.join(map(str, _DTYPES))}")
        if experts.dim() != 3 or beta.dim() != 2:
            raise ValueError("mos_linear (triton): expected experts (m, N_max, K_max) and beta "
                             f"(n_out, m), got {tuple(experts.shape)} and {tuple(beta.shape)}")
        self.n_in = n_in
        self.m, self.n_max, self.k_max = experts.shape
        self.n_out = beta.shape[0]
        if beta.shape[1] != self.m or not (1 <= self.n_out <= self.n_max
                                           and 1 <= self.n_in <= self.k_max):
            raise ValueError(f"mos_linear (triton): beta {tuple(beta.shape)} and n_in = {n_in} "
                             f"do not fit experts {tuple(experts.shape)}")
        choose_strategy(0, self.n_out, n_in, self.m, experts.dtype, strategy)  # checks the name
        self.requested, self.dtype, self.precision = strategy, experts.dtype, precision
        self.device = experts.device
        self.major = _major(experts.device)
        self.element_size = experts.element_size()
        self.acc, self.dot = _types(experts.dtype)
        self.acc_torch = torch.float64 if experts.dtype == torch.float64 else torch.float32
        self.n_out_key, self.n_in_key = _key(self.n_out), _key(n_in)
        self.gemm = dict(M=self.m, ACC=self.acc, DOT=self.dot, PRECISION=precision)
        # The one-pass kernels' launch constants with 32-bit offsets, and with 64-bit ones for
        # tensors too large for 32 (per call: x, dy and the outputs change with the tokens).
        self.wide_experts = _wide(experts[0])
        swap = _swapped(experts.device)
        self.one_pass = {wide: dict(self.gemm, WIDE=wide, SWAP=swap) for wide in (False, True)}
        self.forward = {wide: dict(self.one_pass[wide], RELATIVE=self.m <= RELATIVE_MAX_EXPERTS)
                        for wide in (False, True)}
        # dx in the SWAP form reads beta's slice for each step along the dot's reduction: as
        # int32 words of two experts (half inputs, even m, rows of m contiguous values) those
        # are 4-byte loads that cp.async pipelines; 2-byte ones are synchronous loads in the loop
        self.beta_words = swap and self.element_size == 2 and self.m % 2 == 0
        self.grad_input = {(wide, words, layerwise): dict(self.one_pass[wide], BETA_WORDS=words,
                                                          LAYERWISE=layerwise)
                           for wide in (False, True) for words in (False, True)
                           for layerwise in (False, True)}
        self.options = {}

    def strategy(self, tokens):
        return choose_strategy(tokens, self.n_out, self.n_in, self.m, self.dtype, self.requested,
                               self.device)


_problems = {}


def _problem(experts, beta, n_in, strategy):
    precision = _precision(experts.dtype)  # per call: it follows torch's TF32 flag
    key = (experts.shape, beta.shape, n_in, experts.dtype, experts.device, strategy, precision)
    d = _problems.get(key)
    if d is None:
        d = _Dims(experts, beta, n_in, strategy, precision)
        if not _INTERPRETED:  # the interpreter's tiles change between tests
            if len(_problems) >= 4096:
                _problems.clear()
            _problems[key] = d
    return d


def _dims(x, experts, beta, strategy):
    if x.dim() != 2 or x.dtype != experts.dtype:
        raise ValueError(f"mos_linear (triton): x must be (T, n_in) {experts.dtype}, got "
                         f"{tuple(x.shape)} {x.dtype}")
    return _problem(experts, beta, x.shape[1], strategy)


def _device(t):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _combine(experts, beta, bias, d):
    """W_a (n_out, n_in) in the input dtype, and b_a (None without bias)."""
    weight = experts.new_empty(d.n_out, d.n_in)
    bias_ptr, bias_kind, stride_bias0, stride_bias1 = _bias_args(bias, beta)
    mixed_bias = experts.new_empty(d.n_out) if bias_kind == 2 else weight
    _COMBINE.launch(
        d, "combine", 0, lambda o: (_cdiv(d.n_out, o["BLOCK_N"]), _cdiv(d.n_in, o["BLOCK_K"])),
        (experts, beta, bias_ptr, weight, mixed_bias, d.n_out, d.n_in, *experts.stride(),
         *beta.stride(), stride_bias0, stride_bias1, bias_kind), dict(M=d.m, ACC=d.acc))
    if bias_kind == 0:
        return weight, None
    return weight, (bias[:d.n_out] if bias_kind == 1 else mixed_bias)


def forward(x, experts, beta, bias, strategy="auto"):
    d = _dims(x, experts, beta, strategy)
    tokens = x.shape[0]
    with _device(x):
        if d.strategy(tokens) == "combine":
            weight, mixed_bias = _combine(experts, beta, bias, d)
            return torch.nn.functional.linear(x, weight, mixed_bias).contiguous()
        y = x.new_empty(tokens, d.n_out)
        if tokens == 0:
            return y
        bias_ptr, bias_kind, stride_bias0, stride_bias1 = _bias_args(bias, beta)
        wide = d.wide_experts or _wide(x) or _wide(y)
        _FORWARD.launch(
            d, ("forward", wide), tokens,
            lambda o: (_cdiv(tokens, o["BLOCK_T"]) * _cdiv(d.n_out, o["BLOCK_N"]),),
            (x, experts, beta, bias_ptr, y, tokens, d.n_out, d.n_in, *x.stride(),
             *experts.stride(), *beta.stride(), stride_bias0, stride_bias1, y.stride(0),
             bias_kind), d.forward[wide])
        return y


def _grad_input(dy, x, experts, beta, d, strategy):
    if strategy == "combine":
        return torch.mm(dy, _combine(experts, beta, None, d)[0])
    tokens = x.shape[0]
    dx = x.new_empty(tokens, d.n_in)
    if tokens == 0:
        return dx
    wide = d.wide_experts or _wide(dy) or _wide(dx)
    words = d.beta_words and beta.stride() == (d.m, 1) and beta.storage_offset() % 2 == 0
    layerwise = beta.stride(0) == 0
    # triton.reinterpret: a wrapper, cheaper on the host than Tensor.view
    beta_arg, beta_strides = (triton.reinterpret(beta, tl.int32), (d.m // 2, 1)) if words \
        else (beta, beta.stride())
    _GRAD_INPUT.launch(
        d, ("grad_input", wide, words, layerwise), tokens,
        lambda o: (_cdiv(tokens, o["BLOCK_T"]) * _cdiv(d.n_in, o["BLOCK_N"]),),
        (dy, experts, beta_arg, dx, tokens, d.n_out, d.n_in, *dy.stride(), *experts.stride(),
         *beta_strides, dx.stride(0)), d.grad_input[wide, words, layerwise])
    return dx


def _row_sums(dy, d):
    """s = sum_t dy[t] by torch, for the paths that do not read dy in the weight-gradient
    kernel. Not dy.sum(0, dtype=float32): for half inputs that first copies dy to fp32, a
    (T, n_out) fp32 temporary; torch's half sums accumulate in fp32 anyway and round once."""
    return dy.sum(0).to(d.acc_torch)


def backward(dy, x, experts, beta, bias, needs, strategy="auto"):
    d = _dims(x, experts, beta, strategy)
    tokens = x.shape[0]
    if dy.shape != (tokens, d.n_out) or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"mos_linear (triton) backward: dy must be ({tokens}, {d.n_out}) "
                         f"{x.dtype} on {x.device}, got {tuple(dy.shape)} {dy.dtype} on "
                         f"{dy.device}")
    strategy = d.strategy(tokens)
    with _device(x):
        # The combine strategy's dx needs W_a: the weight-gradient kernel writes it from the
        # expert tiles it reads anyway, when it runs.
        weight = None
        if needs[0] and strategy == "combine" and (needs[1] or needs[2]):
            weight = experts.new_empty(d.n_out, d.n_in)
        grads = _weight_side_grads(d, strategy, tokens, experts, beta, bias, needs[1:], dy=dy,
                                   x=x, weight=weight)
        if weight is not None:
            dx = torch.mm(dy, weight)
        else:
            dx = _grad_input(dy, x, experts, beta, d, strategy) if needs[0] else None
        return (dx,) + grads


def combine(experts, beta, bias, n_in):
    """W_a (n_out, n_in) and, for a per-expert bias, b_a (n_out,); None otherwise."""
    d = _problem(experts, beta, n_in, "combine")
    expert_bias = bias if bias is not None and bias.dim() == 2 else None
    with _device(experts):
        weight, mixed_bias = _combine(experts, beta, expert_bias, d)
    return weight, mixed_bias


def combine_backward(d_weight, d_mixed_bias, experts, beta, bias, needs):
    """(dexperts, dbeta, dbias) from the gradients of W_a (n_out, n_in) and, for a per-expert
    bias, of b_a (n_out,): the weight-gradient epilogue with G = d_weight."""
    d = _problem(experts, beta, d_weight.shape[1], "combine")
    if d_weight.shape != (d.n_out, d.n_in) or d_weight.dtype != experts.dtype:
        raise ValueError(f"mos_combine (triton) backward: d_weight must be ({d.n_out}, "
                         f"{d.n_in}) {experts.dtype}, got {tuple(d_weight.shape)} "
                         f"{d_weight.dtype}")
    expert_bias = bias if bias is not None and bias.dim() == 2 else None
    if expert_bias is not None and (d_mixed_bias is None
                                    or tuple(d_mixed_bias.shape) != (d.n_out,)):
        raise ValueError(f"mos_combine (triton) backward: a per-expert bias needs d_mixed_bias "
                         f"of shape ({d.n_out},)")
    sums = d_mixed_bias.to(d.acc_torch).contiguous() if expert_bias is not None else None
    with _device(experts):
        return _weight_side_grads(d, "combine", 0, experts, beta, expert_bias, needs,
                                  product=d_weight, sums=sums)


def _weight_side_grads(d, strategy, tokens, experts, beta, bias, needs, dy=None, x=None,
                       product=None, sums=None, weight=None):
    """(dexperts, dbeta, dbias), None where not wanted (needs = (dexperts, dbeta, dbias)):
    from dy and x, or from a given product G (n_out, n_in) and the column sums of dy (acc
    dtype, or None without a bias that needs them). A given ``weight`` (n_out, n_in), with
    dexperts or dbeta wanted, receives W_a."""
    want_de, want_dbeta, want_dbias = (bool(n) for n in needs)
    want_dbias = want_dbias and bias is not None
    bias_ptr, bias_kind, stride_bias0, stride_bias1 = _bias_args(bias, beta)
    want_s = want_dbias or (want_dbeta and bias_kind == 2)
    de = dbeta = dbias = None
    if not (want_de or want_dbeta or want_dbias):
        return de, dbeta, dbias

    from_g = product is not None or strategy == "combine"
    row_sums = experts.new_empty(d.n_out, dtype=d.acc_torch)
    if want_s and from_g:
        row_sums = sums if product is not None else _row_sums(dy, d)
    n_parts = 0
    if want_de or want_dbeta:
        if product is not None:
            grad_rows = dy = x = product  # dy and x are not read when the kernel is given G
        else:
            grad_rows = torch.mm(dy.t(), x) if from_g else dy
        if want_de:
            de = experts.new_empty(experts.shape)
        max_parts = _cdiv(d.n_in, _MIN_WGRAD_BLOCK_K) if want_dbeta else 0
        parts = experts.new_empty((max_parts, d.n_out, d.m), dtype=d.acc_torch)
        rows, cols = (d.n_max, d.k_max) if want_de else (d.n_out, d.n_in)
        want_s_here = want_s and not from_g
        options = _WEIGHT_GRAD.launch(
            d, ("weight_grad", from_g, weight is not None, want_de, want_dbeta, want_s_here),
            tokens, lambda o: (_cdiv(rows, o["BLOCK_N"]), _cdiv(cols, o["BLOCK_K"])),
            (dy, x, grad_rows, experts, beta, de if want_de else grad_rows,
             parts if want_dbeta else grad_rows, row_sums,
             weight if weight is not None else grad_rows, tokens, d.n_out, d.n_in, d.n_max,
             d.k_max, *dy.stride(), *x.stride(), *grad_rows.stride(), *experts.stride(),
             *beta.stride(), d.n_max * d.k_max, int(want_de), int(want_dbeta),
             int(want_s_here)),
            dict(d.gemm, FROM_G=from_g, WANT_W=weight is not None))
        n_parts = _cdiv(d.n_in, options["BLOCK_K"]) if want_dbeta else 0
        assert n_parts <= max_parts
    elif want_s and not from_g:
        row_sums = _row_sums(dy, d)

    if want_dbeta or want_dbias:
        if want_dbeta:
            dbeta = beta.new_empty(d.n_out, d.m)
        if want_dbias:
            dbias = bias.new_empty(bias.shape)
        block = 128
        _beta_bias_grad_kernel.run(
            parts if want_dbeta else row_sums, row_sums, beta, bias_ptr,
            dbeta if want_dbeta else row_sums, dbias if want_dbias else row_sums, n_parts,
            d.n_out, d.n_max, *beta.stride(), stride_bias0, stride_bias1, bias_kind,
            int(want_dbeta), int(want_dbias), grid=(_cdiv(d.n_max, block),), warmup=False,
            M=d.m, ACC=d.acc, BLOCK=block, num_warps=4)
    return de, dbeta, dbias


if triton is not None:
    _FORWARD = _Tuned(_forward_kernel, _GEMM_CONFIGS, _gemm_shared, _one_pass_left_out)
    _GRAD_INPUT = _Tuned(_grad_input_kernel, _GEMM_CONFIGS, _grad_input_shared, _one_pass_left_out)
    _WEIGHT_GRAD = _Tuned(_weight_grad_kernel, _WGRAD_CONFIGS, _wgrad_shared, _wgrad_spills)
    _COMBINE = _Tuned(_combine_kernel, _COMBINE_CONFIGS)
