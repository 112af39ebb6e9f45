#!/usr/bin/env bash
# Everything that needs a GPU, in one call (about 5-8 minutes on an H200):
#   1. the CuPy test suite, with the fused kernels and without them (plain CuPy code);
#   2. the GPU benchmarks: every case at batch 64, the model cases at batch 256, against PyTorch-CUDA;
#   3. optionally (--examples DATA_DIR): both example scripts with --device cuda for 10 epochs.
# Results go to $OUT (the device tool's output folder) or /tmp/gpu_check.
#
#   bash benchmarks/gpu_check.sh                          # tests + benchmarks
#   bash benchmarks/gpu_check.sh --examples path/to/popular-animals
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
status=0

"$py" - <<'PY' 2>&1 | tee "$out/environment.txt"
import cupy, numpy, sys
props = cupy.cuda.runtime.getDeviceProperties(0)
print("python", sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__)
print("gpu", props["name"].decode(), "memory GiB", round(props["totalGlobalMem"] / 2**30, 1))
PY

echo "== CuPy tests, fused kernels" | tee "$out/gpu_tests.txt"
timeout 300 "$py" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -25 | tee -a "$out/gpu_tests.txt" \
    || status=1
echo "== CuPy tests, plain CuPy code (TINYNET_FUSED_KERNELS=0)" | tee -a "$out/gpu_tests.txt"
TINYNET_FUSED_KERNELS=0 timeout 300 "$py" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -15 \
    | tee -a "$out/gpu_tests.txt" || status=1

echo "== benchmarks, batch 64" | tee "$out/gpu_bench.txt"
timeout 300 "$py" benchmarks/run.py --device cuda --batch 64 --json "$out/gpu_bench_64.json" 2>&1 \
    | tee -a "$out/gpu_bench.txt" || status=1
echo "== benchmarks, batch 256 (models)" | tee -a "$out/gpu_bench.txt"
timeout 240 "$py" benchmarks/run.py --device cuda --batch 256 --only "step|forward" \
    --json "$out/gpu_bench_256.json" 2>&1 | tee -a "$out/gpu_bench.txt" || status=1

if [ "${1:-}" = "--examples" ] && [ -n "${2:-}" ]; then
    for model in cnn resnet; do
        timeout 600 "$py" "examples/train_${model}.py" --data "$2" --device cuda --out "$out/run_${model}" \
            --no-progress 2>&1 | tail -20 | tee "$out/example_${model}.txt" || status=1
    done
fi
exit $status
