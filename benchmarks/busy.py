"""A training step on an idle machine and on one that is doing something else, tinynet vs PyTorch.

    python benchmarks/busy.py                          # ResNet18 and the CNN, batch 64, 64 px
    python benchmarks/busy.py --models resnet18 --rounds 5 --json busy.json

"Busy" is one process spinning on one core (``while True: pass``), the
simplest stand-in for another user's job, a browser or a second training run.
Every configuration is timed in this one process, alternately, ``--rounds``
times (median of ``--steps`` steps each, after a warm-up), so that their ratios
survive the noise of a shared machine:

* tinynet with N threads for every N up to the cores (``--threads N``; N = the
  cores is what it did before ``--threads auto``),
* tinynet with ``--threads auto`` (:class:`tinynet.cores.ThreadGovernor`, created
  for the condition, so its first look at the machine sees the spinner or not),
* PyTorch at its default (as many threads as cores).

Prints the CPU model, its widest vector ISA and the BLAS kernel, as every benchmark here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cases import tinynet_train_step, torch_train_step  # noqa: E402
from benchmarks.run import blas_info, cpu_name, isa, time_cpu  # noqa: E402
from tinynet import cores  # noqa: E402


def median_step(step, steps: int, warmup: int, tick=None) -> float:
    return statistics.median(time_cpu(step, warmup, steps, after=tick))


def measure(model: str, args, n_cores: int, torch) -> dict:
    tn = tinynet_train_step(model, args.batch, args.size)("cpu")
    th = torch_train_step(model, args.batch, args.size)("cpu") if torch is not None else None
    rows: dict = {}
    for _ in range(args.rounds):
        for n in range(1, n_cores + 1):
            cores.set_threads(n)
            rows.setdefault(f"tinynet {n} thread{'s' if n > 1 else ''}", []).append(
                median_step(tn, args.steps, args.warmup))
        governor = cores.ThreadGovernor("auto", recheck=args.recheck)
        rows.setdefault("tinynet auto", []).append(median_step(tn, args.steps, args.warmup, governor.tick))
        rows.setdefault("tinynet auto: threads chosen", []).append(governor.threads)
        if th is not None:
            torch.set_num_threads(n_cores)
            rows.setdefault("PyTorch default", []).append(median_step(th, args.steps, args.warmup))
    return {name: statistics.median(values) for name, values in rows.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "cnn"], choices=["resnet18", "cnn", "user cnn"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recheck", type=float, default=cores.RECHECK_SECONDS)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    n_cores = cores.available_cores()
    blas = blas_info()
    blas_text = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']})" for b in blas) or "unknown"
    print(f"CPU: {cpu_name()}, {isa()}, {n_cores} cores; BLAS: {blas_text}; "
          f"PyTorch {torch.__version__ if torch else 'not installed'}; OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE')}")
    results = {}
    for condition in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
        try:
            time.sleep(0.5 if spinner else 0)
            for model in args.models:
                row = measure(model, args, n_cores, torch)
                results[f"{model} {condition}"] = row
                print(f"{model:9s} {condition:5s} " + "  ".join(
                    f"{name}: {value * 1e3:.0f} ms" if "chosen" not in name else f"(auto chose {value:g})"
                    for name, value in row.items()), flush=True)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "isa": isa(), "blas": blas, "cores": n_cores,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
