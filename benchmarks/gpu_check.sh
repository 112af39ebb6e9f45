#!/usr/bin/env bash
# Everything that needs a GPU, as three short device calls (tests, bench, examples) that each fit the
# device machine's limits; the timing plan and what each call returns are in benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh tests                 # call 1 (device timeout_s 360)
#   bash benchmarks/gpu_check.sh bench                 # call 2 (device timeout_s 240)
#   bash benchmarks/gpu_check.sh examples [DATA_DIR]   # call 3, only with >= 180 s of device time left (timeout_s 160)
#   bash benchmarks/gpu_check.sh --dry-run tests       # the same plumbing on the CPU, without CuPy
#   bash benchmarks/gpu_check.sh --plan                # the timing plan, as JSON
#
# Results go to $OUT (the device tool's output folder) or /tmp/gpu_check: <stage>.log and <stage>.json,
# written as each step runs, and a few small artefacts; big files stay in /tmp/gpu_check_runs.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u benchmarks/gpu_check.py "$@"
