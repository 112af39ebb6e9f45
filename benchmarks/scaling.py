"""How the cost of a training step grows with batch size, image size and threads, tinynet vs PyTorch.

    python benchmarks/scaling.py                                   # the issue's grid, ResNet18 and the CNN
    python benchmarks/scaling.py --models resnet18 --batches 16 64 --sizes 32 64 --threads 2

For every thread count the grid runs in a fresh subprocess (BLAS, PyTorch
and tinynet's pass threads are all set to that count before anything is
timed), and inside it every cell times tinynet and PyTorch alternately,
``--rounds`` times, the median of each framework's rounds being its time:
two frameworks measured in one process, minutes apart at most, so their
ratio survives the noise of a shared machine better than either time.
A cell whose tinynet step is estimated (from the cells already measured)
to exceed ``--max-step-s`` or whose activations would not fit in memory
is skipped and printed as "-", with the reason.
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


def _step_time(step, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def grid(args) -> dict:
    """Time the grid with ``args.threads`` threads everywhere (run in the subprocess for that count).

    The thread settings are restored on return.
    """
    from threadpoolctl import threadpool_limits

    from tinynet import backend

    try:
        import torch
    except ImportError:
        torch = None
    torch_threads = torch.get_num_threads() if torch is not None else None
    backend.keep_freed_host_memory()
    try:
        with threadpool_limits(args.threads):
            backend.set_num_threads(args.threads)
            if torch is not None:
                torch.set_num_threads(args.threads)
            return _grid(args, torch)
    finally:
        backend.set_num_threads(None)
        if torch is not None:
            torch.set_num_threads(torch_threads)


def _grid(args, torch) -> dict:
    from benchmarks import cases
    from benchmarks.run import blas_info, cpu_name, isa

    rows = []
    per_image_pixel, largest = {}, {}  # model -> seconds per image-pixel, and work of the cell it is from
    for model in args.models:
        for batch in args.batches:
            for size in args.sizes:
                row = {"model": model, "batch": batch, "size": size, "threads": args.threads}
                if model == "cnn" and size % 16:
                    row["skipped"] = "the CNN needs a multiple of 16"
                    rows.append(row)
                    continue
                work = batch * size * size
                estimate = per_image_pixel.get(model, 0.0) * work
                if estimate > args.max_step_s:
                    row["skipped"] = f"estimated {estimate:.0f} s a step > --max-step-s {args.max_step_s}"
                    rows.append(row)
                    continue
                # Activations grow with batch * pixels: a ResNet18 step peaks at about 2.1 KB per image-pixel
                # (541 MB at batch 64 of 64x64, benchmarks/run.py); 2.5 KB leaves a margin.
                if model == "resnet18" and work * 2.5e3 > args.max_memory_gb * 1e9:
                    row["skipped"] = f"about {work * 2.5e3 / 1e9:.0f} GB of activations > --max-memory-gb"
                    rows.append(row)
                    continue
                steps = {"tinynet": cases.tinynet_train_step(model, batch, size)("cpu")}
                if torch is not None:
                    steps["torch"] = cases.torch_train_step(model, batch, size)("cpu")
                times = {name: [] for name in steps}
                for r in range(args.rounds):
                    for name, step in steps.items():
                        times[name].append(_step_time(step, 1 if r == 0 else 0))
                for name in steps:
                    row[f"{name}_ms"] = 1000 * statistics.median(times[name])
                if "torch_ms" in row:
                    row["ratio"] = row["tinynet_ms"] / row["torch_ms"]
                # the cost per image-pixel of the largest cell so far (small cells have more overhead per pixel)
                if work >= largest.get(model, 0):
                    largest[model], per_image_pixel[model] = work, row["tinynet_ms"] / 1000 / work
                del steps
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    header = {"cpu": cpu_name(), "isa": isa(), "blas": blas_info(), "threads": args.threads,
              "torch": getattr(torch, "__version__", None),
              "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}
    return {"header": header, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "cnn"], choices=("resnet18", "cnn"))
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 224])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per cell (median)")
    parser.add_argument("--max-step-s", type=float, default=30.0, help="skip cells estimated to be slower")
    parser.add_argument("--max-memory-gb", type=float, default=12.0, help="skip ResNet18 cells needing more")
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.threads = args.threads[0]
        print(json.dumps(grid(args)))
        return 0
    results = []
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--rounds", str(args.rounds),
               "--max-step-s", str(args.max_step_s), "--max-memory-gb", str(args.max_memory_gb),
               "--models", *args.models, "--batches", *map(str, args.batches), "--sizes", *map(str, args.sizes)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    header = results[0]["header"]
    print(f"CPU {header['cpu']} ({header['isa']}); BLAS " + ", ".join(
        f"{b['internal_api']} {b['version']} kernel {b['architecture']}" for b in header["blas"])
        + f"; PyTorch {header['torch']}; OPENBLAS env {header['env']}")
    print(f"\n{'model':<9}{'batch':>6}{'size':>6}{'thr':>4}{'tinynet ms':>12}{'torch ms':>10}{'ratio':>7}"
          f"{'tn ms/img':>10}")
    for result in results:
        for row in result["rows"]:
            head = f"{row['model']:<9}{row['batch']:>6}{row['size']:>6}{row['threads']:>4}"
            if "skipped" in row:
                print(f"{head}{'-':>12}{'-':>10}{'-':>7}{'':>10}  ({row['skipped']})")
                continue
            torch_ms = f"{row['torch_ms']:10.1f}" if "torch_ms" in row else f"{'-':>10}"
            ratio = f"{row['ratio']:7.2f}" if "ratio" in row else f"{'-':>7}"
            print(f"{head}{row['tinynet_ms']:12.1f}{torch_ms}{ratio}{row['tinynet_ms'] / row['batch']:10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
