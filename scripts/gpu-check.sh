#!/usr/bin/env bash
# gpu-check.sh - everything a GPU machine needs to check, in one run (under 8 minutes on one
# H100): build with the CUDA backend, run the CUDA parity tests (every kernel and whole models
# against the CPU backend) and the rest of the unit suite, then the GPU benchmarks: decode
# tokens/s at batch 1, 8 and 32 on a ~1.1B-parameter F16 synthetic model and on its Q4_K_M
# quantization, each with its roofline ratio, and full vs TidalDecode decode step time at 1K-32K cached tokens.
#
# Needs the build dependencies of `make` (make deps installs them on Debian) and the CUDA
# toolkit at $CUDA_HOME (default /usr/local/cuda). The model-level tests read stories260K from
# ../shared/models, or from $TIDALD_SHARED_MODELS. Exits non-zero when a build, a test or a
# benchmark fails, or when a CUDA test skips although a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
phase() { printf '\n=== %s (t+%ds)\n' "$1" $(( $(date +%s) - T0 )); }
JOBS=$(nproc 2>/dev/null || echo 2)
OUT=${GPU_CHECK_OUT:-build/gpu-check}
mkdir -p "$OUT"

phase "device"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv
else
  echo "nvidia-smi not found"
fi

phase "build (CUDA=1)"
make -s -j"$JOBS" CUDA=1 all build/unit_tests build/bench_gpu build/bench_attention

phase "CUDA parity tests"
MODELS=${TIDALD_SHARED_MODELS:-../shared/models}
export TIDALD_SHARED_MODELS=$MODELS
if [ ! -f "$MODELS/stories260K.gguf" ]; then
  echo "warning: $MODELS/stories260K.gguf missing: the model-level parity tests skip"
fi
mkdir -p build/test-tmp
set +e
TIDALD_TEST_TMP=$PWD/build/test-tmp build/unit_tests --filter 'cuda/*' --verbose 2>&1 | tee "$OUT/parity.log"
st=${PIPESTATUS[0]}
set -e
grep -E '^\[(PASS|FAIL|SKIP)\]|Synthesis' "$OUT/parity.log" | grep -v 'Test is disabled' || true
if [ "$st" != 0 ]; then echo "gpu-check: CUDA parity tests FAILED"; exit 1; fi
if grep -q '^\[SKIP\] cuda::.*no CUDA GPU' "$OUT/parity.log"; then
  echo "gpu-check: the CUDA tests skipped: this machine's GPU is not usable (see above)"; exit 1
fi

phase "model parity again with CUDA graphs off (every op launched eagerly)"
TIDALD_CUDA_GRAPHS=0 TIDALD_TEST_TMP=$PWD/build/test-tmp \
  build/unit_tests --filter 'cuda/*stories260k*' --verbose 2>&1 | grep -E '^\[(PASS|FAIL|SKIP)\]|Synthesis' | grep -v 'Test is disabled'
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu-check: parity without graphs FAILED"; exit 1; }

phase "whole unit suite (CPU tests; the backend tests see the GPU)"
TIDALD_TEST_TMP=$PWD/build/test-tmp build/unit_tests --jobs "$JOBS" 2>&1 | tail -3

phase "end to end: greedy text on stories260K, CPU vs CUDA"
if [ -f "$MODELS/stories260K.gguf" ]; then
  for d in cpu cuda; do
    build/tidald generate --model "$MODELS/stories260K.gguf" --prompt "Once upon a time" \
      --temperature 0 --max-tokens 64 --device "$d" >"$OUT/gen-$d.txt" 2>"$OUT/gen-$d.err"
  done
  cat "$OUT/gen-cuda.txt"; echo
  if cmp -s "$OUT/gen-cpu.txt" "$OUT/gen-cuda.txt"; then echo "identical"; else
    echo "gpu-check: CUDA text differs from the CPU's"; diff "$OUT/gen-cpu.txt" "$OUT/gen-cuda.txt" || true; exit 1; fi
fi

phase "models"
make -s build/models/b1-f16.gguf build/models/long-f16.gguf build/models/b1-Q4_K_M.gguf

phase "decode throughput and roofline (b1-f16, ~1.1B parameters)"
build/bench_gpu build/models/b1-f16.gguf --device cuda | tee "$OUT/bench_gpu.jsonl"
echo "--- the same with CUDA graphs off (kernel launches per step instead of one graph)"
TIDALD_CUDA_GRAPHS=0 build/bench_gpu build/models/b1-f16.gguf --device cuda | tee "$OUT/bench_gpu_nographs.jsonl"

phase "decode throughput and roofline, quantized (b1-Q4_K_M: the dp4a GEMV kernels)"
build/bench_gpu build/models/b1-Q4_K_M.gguf --device cuda | tee "$OUT/bench_gpu_q4km.jsonl"

phase "full vs TidalDecode (budget 256), long-f16, F16 cache"
build/bench_attention build/models/long-f16.gguf 256 f16 cuda | tee "$OUT/bench_attention.jsonl"

phase "done"
echo "gpu-check: all passed in $(( $(date +%s) - T0 )) s; figures in $OUT/"
