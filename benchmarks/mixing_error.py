"""How much precision the Triton one-pass kernels' half-precision mixing costs.

They mix half inputs in the input dtype, each step rounded to nearest (docs/design.md,
section 5): dx as beta_0 E_0 then one fused multiply-add per further expert; the forward, for
m <= RELATIVE_MAX_EXPERTS, relative to each row's pivot expert p (largest |beta|): E_p plus one
fused multiply-add of beta_i / beta_p per further expert, the output scaled by beta_p in fp32.
combine and the CUDA kernels mix in fp32 and round once. Two tables:

  weight  rms error of the mixed weight against float64: rounding once, every step (dx), every
          step relative to the pivot (the forward; the weight it applies, beta_p times the
          rounded tile), and the last two against the first (N(0, 1) experts of 512 x 512,
          softmax beta); the per-step models are those tests/test_triton.py holds the kernels
          to (test_half_mixing_rounds_every_step, test_relative_mixing_rounds_every_step)
  op      the op's forward through the Triton backend (on CPU: under TRITON_INTERPRET=1), max
          error over the output relative to its largest value, one_pass against combine

    python benchmarks/mixing_error.py
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # no effect on a GPU machine's CUDA tensors
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

import mos_kernels  # noqa: E402
from mos_kernels.backends import triton_backend  # noqa: E402
from oracle import DEVICE, make_inputs, reference64, relative_mix64, run  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16)


def rms(w, exact):
    return ((w.double() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()


def weight_table():
    print("| dtype | m | rounded once | every step | relative | every step / once | "
          "relative / once |\n|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for m in (2, 3, 4, 6, 8):
            experts = torch.randn(m, 512, 512, generator=g).to(dtype).double()
            beta = torch.randn(512, m, generator=g).softmax(-1).to(dtype).double()
            exact = (beta.t()[:, :, None] * experts).sum(0)
            step = (beta[:, :1] * experts[0]).to(dtype)
            for i in range(1, m):
                step = (beta[:, i:i + 1] * experts[i] + step.double()).to(dtype)
            once, per_step = rms(exact.to(dtype), exact), rms(step, exact)
            tile, scale = relative_mix64(experts, beta, dtype, lambda v: v.to(dtype))
            rel = rms(scale.double() * tile, exact)
            print(f"| {str(dtype)[6:]} | {m} | {once:.2e} | {per_step:.2e} | {rel:.2e} | "
                  f"{per_step / once:.2f} | {rel / once:.2f} |")


def op_table():
    print("\n| dtype | m | one_pass | combine |\n|---|---|---|---|")
    for dtype in DTYPES:
        for m in (1, 2, 3, 4, 6):
            tensors = make_inputs(40, 70, 33, 72, 40, m, False, "expert", dtype)
            errors = []
            for strategy in ("one_pass", "combine"):
                def op(x, e, b, bias, out_features, strategy=strategy):
                    return mos_kernels.mos_linear(x, e, b, bias, out_features=out_features,
                                                  backend="triton", strategy=strategy)
                y, _, dy = run(op, tensors, 33)
                y_ref = reference64(tensors, 33, dy)[0]
                errors.append(((y.double().cpu() - y_ref).abs().max()
                               / y_ref.abs().max()).item())
            print(f"| {str(dtype)[6:]} | {m} | {errors[0]:.2e} | {errors[1]:.2e} |")


if __name__ == "__main__":
    weight_table()
    reason = triton_backend.unavailable_reason(DEVICE)
    op_table() if reason is None else print(f"\nno op table: {reason}")
