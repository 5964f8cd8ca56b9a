#!/usr/bin/env bash
# A GPU session in one call of at most 10 minutes (an H100/H200 machine with torch, triton, nvcc
# and pytest, no network): build the extension for this GPU only, the GPU tests that matter most,
# kernel time per strategy and shape, host time per call. Writes to $OUT (default /tmp/gpu_out)
# these 8 files and no others:
#   device.txt steps.txt build.log tests.log kernel_time.json host_time.json run.log summary.md
#
#   bash benchmarks/gpu_run.sh
#
# Every step runs under its own timeout, cut to what is left of the run's budget (BUDGET_SECONDS,
# default 560) after the time the later steps are guaranteed, so that a hang in one step keeps
# what the others measured; kernel_time.json is written case by case. steps.txt says how each
# step ended. STEPS picks steps (default build,tests,kernel,host; "compile" adds the Triton
# ahead-of-time compile check if time is left). MOS_COMMIT names the copied tree's commit.
set -uo pipefail
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
: > "$out/steps.txt"
: > "$out/run.log"
exec 3>&1 > >(tee -a "$out/run.log") 2>&1
start=$(date +%s)
budget=${BUDGET_SECONDS:-560}
steps=",${STEPS:-build,tests,kernel,host},"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Seconds a step may take: at most $1, leaving $2 for the steps after it (at least 10).
allow() {
  local left=$(( budget - ($(date +%s) - start) - $2 ))
  (( left > $1 )) && left=$1
  (( left < 10 )) && left=10
  echo "$left"
}

# A line on the console and in run.log, whatever the caller redirected.
say() { echo "$*" | tee -a "$out/run.log" >&3; }

# step NAME CAP RESERVE COMMAND...: the command under its timeout; a line in steps.txt.
step() {
  local name=$1 cap=$2 reserve=$3 t0 limit rc note=""
  shift 3
  t0=$(date +%s)
  limit=$(allow "$cap" "$reserve")
  say "== $name (limit $limit s): $*"
  timeout -k 10 "$limit" "$@"
  rc=$?
  (( rc == 124 || rc == 137 )) && note=" (timed out at $limit s)"
  echo "$name: exit $rc$note, $(( $(date +%s) - t0 )) s" >> "$out/steps.txt"
  say "$name: exit $rc$note, $(( $(date +%s) - t0 )) s"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${MOS_COMMIT:-unknown}"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)

if [[ $steps == *,build,* ]]; then
  # The system compiler: a build with another g++ than libstdc++'s crashed in TORCH_CHECK messages.
  CC=${CC:-/usr/bin/gcc} CXX=${CXX:-/usr/bin/g++} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} \
    MAX_JOBS=${MAX_JOBS:-16} step build 240 330 python setup.py build_ext --inplace > "$out/build.log" 2>&1
  tail -3 "$out/build.log"
  # One OpenMP runtime in the process (the extension is linked with -fopenmp; torch bundles libgomp).
  python -c "import torch, mos_kernels._C, re; print('libgomp loaded:', sorted(set(re.findall(r'\S*libgomp\S*', open('/proc/self/maps').read()))))" >> "$out/device.txt" 2>&1
fi
python -c "import mos_kernels; print('backends', mos_kernels.available_backends('cuda'), 'auto ->', mos_kernels.resolve_backend('auto', 'cuda'))" >> "$out/device.txt" 2>&1
tail -2 "$out/device.txt"

pytest=(python -m pytest -q --tb=line -p no:cacheprovider -o console_output_style=classic)
if [[ $steps == *,tests,* ]]; then
  # The cuda backend (auto's choice on GPUs) against the float64 reference, both strategies, the
  # module, opcheck and torch.compile (CUDA graphs included); then Triton's, which compiles a
  # kernel per variant on first use.
  echo "== tests-cuda" >> "$out/tests.log"
  step tests-cuda 150 230 "${pytest[@]}" tests/test_cuda.py tests/test_module.py tests/test_ops.py \
    -k "not triton" >> "$out/tests.log" 2>&1
  echo "== tests-triton" >> "$out/tests.log"
  step tests-triton 150 160 "${pytest[@]}" tests/test_triton.py tests/test_ops.py -k triton \
    >> "$out/tests.log" 2>&1
  grep -E "passed|failed|error" "$out/tests.log" | tail -4
fi

if [[ $steps == *,kernel,* ]]; then
  # Kernel time: CUDA events around many calls queued behind a GPU sleep (the host's launch
  # overhead hidden), per strategy: cuda one_pass / combine / saved, triton one_pass / combine,
  # beside the dense slice and the roofline model. T = 2048 first (MT training's token counts).
  step kernel 150 70 python benchmarks/roofline.py --devices H100 --measure --measure-dtype bfloat16 \
    --measure-shapes "mt-ffn1 d640 f3072" "mt-ffn2 d640 f3072" "bert-ffn1 h768" "bert-ffn2 h768" \
    --measure-tokens 2048 16384 --measure-experts 2 --reps 50 --out "$out/kernel_time.json" \
    | grep -E "^measured|^wrote|Error|error"
fi

if [[ $steps == *,host,* ]]; then
  # Host time per call at tiny shapes: wall time per call, 20 calls per sample then a sync.
  step host 90 15 python benchmarks/bench_host.py --device cuda --dtype bfloat16 --reps 60 \
    --json "$out/host_time.json"
fi

python benchmarks/gpu_summary.py --dir "$out" > "$out/summary.md"
if [[ $steps == *,compile,* ]] && (( $(allow 600 0) > 60 )); then
  # Triton's ahead-of-time compile check on this machine's Triton version (CI has another).
  echo "== tests-compile" >> "$out/tests.log"
  step compile 120 5 "${pytest[@]}" tests/test_triton_compile.py >> "$out/tests.log" 2>&1
  python benchmarks/gpu_summary.py --dir "$out" > "$out/summary.md"
fi
say "total $(( $(date +%s) - start )) s; summary: $out/summary.md"
