"""ResNet18's evaluation forward with and without BatchNorm folding (tinynet.nn.fusion), in one process.

    python benchmarks/eval_fusion.py                    # batch 1, 8 and 64, 64x64 images
    python benchmarks/eval_fusion.py --batches 64 --size 64 --rounds 9

Variants, alternated round by round so that the machine's noise hits them alike
(medians reported): "layers" runs every layer by itself (fusion off), "fused"
is what tinynet does (BatchNorm's scale and shift, the shortcut and the ReLU in
place on the convolution's output).  ``--one-thread`` times the CPU time of one thread (BLAS included), which
another process on the same cores disturbs much less than the wall clock.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import tinynet  # noqa: E402
from tinynet.models import resnet18  # noqa: E402
from tinynet.nn.fast import epilogues as fusion  # noqa: E402  (the evaluation-time epilogues)

VARIANTS = ("layers", "fused")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--one-thread", action="store_true",
                    help="BLAS and tinynet on one thread, timed by the thread's CPU time: less noise on a "
                         "shared machine, for comparing the variants' work")
    args = ap.parse_args(argv)
    clock = time.perf_counter
    if args.one_thread:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        tinynet.backend.set_num_threads(1)
        clock = time.thread_time
    rng = np.random.default_rng(0)
    model = resnet18(10).eval()
    can_fuse = fusion.can_run_in_place
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
        times = {k: [] for k in VARIANTS}
        with tinynet.no_grad():
            for r in range(args.rounds + 1):
                for name in VARIANTS:
                    fusion.can_run_in_place = can_fuse if name == "fused" else (lambda *a, **k: False)
                    t = clock()
                    model(x)
                    if r:  # round 0 warms up
                        times[name].append(clock() - t)
        fusion.can_run_in_place = can_fuse
        base = statistics.median(times["layers"])
        row = "  ".join(f"{k} {statistics.median(v) * 1e3:7.2f} ms (min {min(v) * 1e3:.1f}, {base / statistics.median(v):.2f}x)"
                        for k, v in times.items())
        print(f"batch {batch:3d} @{args.size}x{args.size}: {row}", flush=True)


if __name__ == "__main__":
    main()
