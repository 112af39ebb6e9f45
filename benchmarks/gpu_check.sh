#!/usr/bin/env bash
# Everything that needs a GPU, in one device call of at most 530 s (the plan, and what it returns, are in
# the docstring of benchmarks/gpu_check.py):
#
#   bash benchmarks/gpu_check.sh                      # device tool: run(command=..., timeout_s=570)
#   bash benchmarks/gpu_check.sh --only tests_plain   # a rerun of some steps
#   bash benchmarks/gpu_check.sh --dry-run            # the same driver on the CPU, on the CuPy stand-in
#   bash benchmarks/gpu_check.sh --plan               # the plan, as JSON
#
# Returns in $OUT (else /tmp/gpu_check), written as each step runs: gpu_check.log (everything printed,
# as it comes), gpu_check.json (each step's status, seconds and RESULT items), conformance.json,
# tests_fused.xml, tests_plain.xml, example_resnet.json, bench_64.json.
#
# Python: $PYTHON if set, else the project's virtual environment (.venv/bin/python), else python3 (on the
# device machine: the one with CuPy and PyTorch).  The system python3 of a user's machine lacks tinynet's
# dependencies, and the tests would not even be collected.
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" -u benchmarks/gpu_check.py "$@"
