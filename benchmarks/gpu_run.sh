#!/usr/bin/env bash
# A GPU session's work: build with CUDA, run the GPU tests, the kernel-time roofline measurement
# and the op benchmark, and leave logs and results in $OUT (default /tmp/gpu_out).
#   bash benchmarks/gpu_run.sh [extra bench_op.py args...]
# STEPS picks the parts (default build,tests,roofline,bench; "train" adds whole training steps);
# TEST_SECONDS / ROOFLINE_SECONDS / BENCH_SECONDS / TRAIN_SECONDS cap them. A lease whose calls
# are limited to 10 minutes takes two calls (three with train), each while the machine is still
# warm (the build is kept):
#   STEPS=build,tests TEST_SECONDS=420 bash benchmarks/gpu_run.sh
#   STEPS=roofline,bench ROOFLINE_SECONDS=200 BENCH_SECONDS=330 bash benchmarks/gpu_run.sh
#   STEPS=train TRAIN_SECONDS=500 bash benchmarks/gpu_run.sh
# MOS_COMMIT: the commit of the copied tree (it has no .git), recorded in the JSON.
set -uo pipefail
out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
steps=",${STEPS:-build,tests,roofline,bench},"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"

if [[ $steps == *,build,* ]]; then
  # The system compiler: a build with another g++ than libstdc++'s crashed in TORCH_CHECK messages.
  start=$(date +%s)
  CC=${CC:-/usr/bin/gcc} CXX=${CXX:-/usr/bin/g++} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MAX_JOBS=16 python setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  # One OpenMP runtime in the process (the extension is linked with -fopenmp; torch bundles libgomp).
  python -c "import torch, mos_kernels._C, re; print('libgomp loaded:', sorted(set(re.findall(r'\S*libgomp\S*', open('/proc/self/maps').read()))))" | tee -a "$out/device.txt"
fi
python -c "import mos_kernels; print('backends', mos_kernels.available_backends('cuda'), 'auto ->', mos_kernels.resolve_backend('auto', 'cuda'))" | tee -a "$out/device.txt"

if [[ $steps == *,tests,* ]]; then
  # The cuda backend's tests first (auto's choice on GPUs); Triton's compile a kernel per variant.
  # Last, the ahead-of-time compile check with this machine's Triton (CI has another version).
  timeout "${TEST_SECONDS:-900}" python -m pytest -q --tb=line -p no:cacheprovider tests/test_cuda.py \
    tests/test_module.py tests/test_ops.py tests/test_triton.py tests/test_triton_compile.py \
    > "$out/tests.log" 2>&1
  echo "tests: exit $?"; grep -E "passed|failed|error" "$out/tests.log" | tail -15
fi

if [[ $steps == *,roofline,* ]]; then
  # Kernel time with the host overhead hidden (GPU sleep ahead of the queued calls), beside the
  # roofline model: the figures the fused/dense targets are about.
  timeout "${ROOFLINE_SECONDS:-300}" python benchmarks/roofline.py --devices H100 A100 --measure \
    --measure-dtype bfloat16 --out "$out/roofline_measured.json" > "$out/roofline.log" 2>&1
  echo "roofline: exit $?"; grep -E "^measured" "$out/roofline.log"
fi

if [[ $steps == *,bench,* ]]; then
  timeout "${BENCH_SECONDS:-900}" python benchmarks/bench_op.py --device cuda --dtype bfloat16 \
    --tokens 512 2048 4096 8192 16384 --modes fwd bwd fwdbwd --strategies --saved --reps 20 \
    --iters 20 --no-eval-cache \
    --out "$out/op_cuda_bf16" "$@" > "$out/bench.log" 2>&1
  echo "bench: exit $?"; cat "$out/bench.log"
fi

if [[ $steps == *,train,* ]]; then
  # Whole sandwich steps with fused AdamW, fp32 weights under bf16 autocast as the trainers'
  # --amp bf16 runs them: standard vs MoS naive / fused (/ saved for BERT).
  timeout "${TRAIN_SECONDS:-900}" sh -c "python benchmarks/bench_bert_train.py --device cuda \
    --preset full --dtype float32 --amp bf16 --reps 20 --json $out/bert_train_cuda_amp.json && \
    python benchmarks/bench_mt_train.py --device cuda --shapes small,full --kinds neuron --reps 20 \
    --amp bf16 --json $out/mt_train_cuda_amp.json" > "$out/train.log" 2>&1
  echo "train: exit $?"; cat "$out/train.log"
fi
