"""The Triton kernels compiled for sm_80 and sm_90 without a GPU (tests/triton_compile.py).

The interpreter runs the kernels' Python and never lowers it; these tests lower it. Every
variant the backend launches must compile; the config pruner's shared-memory estimate must
bound what the compiler allocates (small problems launch the first config that the estimate
says fits, untimed, so an estimate below the truth is a launch failure); and for bf16, what most
GPU training runs, every autotune configuration must fit an A100's and an H100's shared memory
and spill at most a few registers."""
import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _nvidia_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(),
                                reason="this triton has no NVIDIA backend to compile for")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_PER_BLOCK = {80: 166912, 90: 232448}  # opt-in shared memory per block: A100, H100
FEW_SPILLED_BYTES = 64
RUNS = {
    "bf16": ["--dtypes", "bfloat16", "--experts", "2", "--all-configs", "--targets", "90", "80"],
    "bf16-m6": ["--dtypes", "bfloat16", "--experts", "6", "--all-configs", "--targets", "90"],
    "tf32-m6": ["--dtypes", "float32", "--precisions", "tf32", "--experts", "6", "--all-configs",
                "--targets", "90"],
    "first-configs": ["--dtypes", "float16", "float32", "float64", "--targets", "90", "80"],
}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

    def run(args):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_compile.py"),
                                 *args], capture_output=True, text=True, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-4000:]
        return [json.loads(line) for line in result.stdout.splitlines()]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(RUNS, pool.map(run, RUNS.values())))


def describe(row):
    tiles = " ".join(f"{k}={v}" for k, v in row["config"].items())
    return f"{row['kernel']} {row['dtype']} m={row['m']} sm_{row['arch']} {tiles}"


def test_every_variant_compiles(compiled):
    rows = [row for run in compiled.values() for row in run]
    assert len(rows) > 100
    failed = [f"{describe(r)}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)


def test_pruner_estimate_bounds_the_compiler(compiled):
    rows = [row for run in compiled.values() for row in run if "estimate" in row]
    assert rows
    under = [f"{describe(r)}: estimate {r['estimate']} < {r['shared']} bytes" for r in rows
             if r["estimate"] < r["shared"]]
    assert not under, "\n".join(under)


def test_bf16_configs_fit_and_barely_spill(compiled):
    rows = compiled["bf16"]
    assert {r["arch"] for r in rows} == set(SHARED_PER_BLOCK)
    too_big = [f"{describe(r)}: {r['shared']} bytes" for r in rows
               if r["shared"] > SHARED_PER_BLOCK[r["arch"]]]
    assert not too_big, "\n".join(too_big)
    spilling = [f"{describe(r)}: {r['registers']} registers, {r['stack']} bytes of stack"
                for r in rows if r["stack"] > FEW_SPILLED_BYTES]
    assert not spilling, "\n".join(spilling)
