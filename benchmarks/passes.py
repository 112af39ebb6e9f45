"""Old against new for the memory-bound passes, in one process, alternating rounds (medians).

    python benchmarks/passes.py                    # every case, against git revision c4b3ed4
    python benchmarks/passes.py --base HEAD~1 --only pool --rounds 15

The old versions of tinynet/nn/{pool,norm,activation,layout,conv}.py are
loaded from the git revision ``--base`` as modules of their own (beside the
package's, sharing its other modules), so both run on the same inputs, the
same threads and the same noisy machine; each round times the old then the
new function (best of 3 calls), and the table reports medians over the
rounds and their ratio.  The machine has two cores shared with other jobs:
only the ratio is meaningful.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import tinynet.nn  # noqa: E402,F401
from tinynet import backend  # noqa: E402


def old_module(name: str, base: str):
    """tinynet/nn/<name>.py as it was at git revision ``base``, imported as ``tinynet.nn._old_<name>``."""
    if Path(base).is_dir():  # a folder holding other versions of the files (to compare two variants)
        source = (Path(base) / f"{name}.py").read_text() if (Path(base) / f"{name}.py").exists() else \
            (ROOT / "tinynet" / "nn" / f"{name}.py").read_text()
    else:
        source = subprocess.run(["git", "show", f"{base}:tinynet/nn/{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"tinynet.nn._old_{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "tinynet.nn"
    exec(compile(source, f"{base}:tinynet/nn/{name}.py", "exec"), module.__dict__)
    return module


def chwn(rng, n, c, h, w):
    """An (N, C, H, W) float32 activation stored CHWN, as the layers make them."""
    return rng.standard_normal((c, h, w, n), dtype=np.float32).transpose(3, 0, 1, 2)


def cases(base: str):
    rng = np.random.default_rng(0)
    from tinynet.nn.fast import activation, conv, layout, norm, pool  # the fast path's functions
    old = {name: old_module(name, base) for name in ("pool", "norm", "activation", "layout", "conv")}

    def pool_pair(shape, k, s, p):
        x = chwn(rng, *shape)
        out, cache = pool.max_pool2d_forward(x, (k, k), (s, s), (p, p))
        dout = chwn(rng, *out.shape)
        yield (f"maxpool fwd {k}/{s}/{p} {shape}", lambda: old["pool"].max_pool2d_forward(x, (k, k), (s, s), (p, p)),
               lambda: pool.max_pool2d_forward(x, (k, k), (s, s), (p, p)))
        yield (f"maxpool bwd {k}/{s}/{p} {shape}", lambda: old["pool"].max_pool2d_backward(dout, cache),
               lambda: pool.max_pool2d_backward(dout, cache))

    yield from pool_pair((64, 64, 32, 32), 3, 2, 1)  # the ResNet stem
    yield from pool_pair((64, 32, 64, 64), 4, 4, 0)  # the CNN's first pool

    for shape in ((64, 64, 32, 32), (64, 128, 8, 8)):
        x2 = layout.channel_matrix(chwn(rng, *shape))
        c = x2.shape[0]
        gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c, dtype=np.float32)
        _, _, _, cache = norm.batch_norm_forward_train(x2, gamma, beta, 1e-5)
        dy2 = rng.standard_normal(x2.shape, dtype=np.float32)
        yield (f"batchnorm fwd {shape}", lambda: old["norm"].batch_norm_forward_train(x2, gamma, beta, 1e-5),
               lambda: norm.batch_norm_forward_train(x2, gamma, beta, 1e-5))
        yield (f"batchnorm bwd {shape}", lambda: old["norm"].batch_norm_backward_train(dy2, cache),
               lambda: norm.batch_norm_backward_train(dy2, cache))

    for shape in ((64, 64, 32, 32), (64, 128, 8, 8)):
        x = chwn(rng, *shape)
        _, mask = activation.relu_forward(x)
        dy = chwn(rng, *shape)
        yield (f"relu fwd {shape}", lambda: old["activation"].relu_forward(x), lambda: activation.relu_forward(x))
        yield (f"relu bwd {shape}", lambda: old["activation"].relu_backward(dy, mask),
               lambda: activation.relu_backward(dy, mask))
        yield (f"add {shape}", lambda: old["layout"].add(x, dy), lambda: layout.add(x, dy))

    for shape, k, s, p in (((64, 64, 16, 16), 3, 1, 1), ((64, 128, 8, 8), 3, 1, 1), ((64, 64, 16, 16), 3, 2, 1)):
        x = chwn(rng, *shape)
        n, c, h, w = shape
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        buf = np.empty((c, k, k, oh, ow, n), dtype=np.float32)
        col = conv.im2col(x, (k, k), (s, s), (p, p), out=buf)
        yield (f"im2col {k}/{s}/{p} {shape}", lambda: old["conv"].im2col(x, (k, k), (s, s), (p, p), out=buf),
               lambda: conv.im2col(x, (k, k), (s, s), (p, p), out=buf))
        yield (f"col2im {k}/{s}/{p} {shape}", lambda: old["conv"].col2im(col, shape, (k, k), (s, s), (p, p)),
               lambda: conv.col2im(col, shape, (k, k), (s, s), (p, p)))


def _cpu_busy() -> float:
    """Seconds of CPU time the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [float(v) for v in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def others_load(fn) -> float:
    """Run ``fn``; return how many cores *other* processes kept busy meanwhile (on average)."""
    busy, own, wall = _cpu_busy(), sum(os.times()[:2]), time.perf_counter()
    fn()
    wall = time.perf_counter() - wall
    return max(0.0, (_cpu_busy() - busy) - (sum(os.times()[:2]) - own)) / wall


def best_of(fn, calls=3):
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="c4b3ed4", help="git revision of the old code, or a folder of variants of its files (default: c4b3ed4)")
    parser.add_argument("--only", help="regular expression selecting cases by name")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, help="backend.set_num_threads (default: all CPUs)")
    parser.add_argument("--quiet", type=float, metavar="CORES",
                        help="keep only rounds in which other processes used at most CORES cores (e.g. 0.1); "
                             "the machine is shared, and a busy core says nothing about either version")
    args = parser.parse_args(argv)
    if args.threads:
        backend.set_num_threads(args.threads)
    backend.keep_freed_host_memory()  # as the training scripts do: no page faults from freed memory
    quiet = "" if args.quiet is None else f" in which other processes used <= {args.quiet} cores"
    print(f"threads {backend.num_threads()}, old = {args.base}; ms, medians of {args.rounds} alternating rounds{quiet}")
    print(f"{'case':44s} {'old':>8s} {'new':>8s} {'new/old':>8s}")
    for name, old_fn, new_fn in cases(args.base):
        if args.only and not re.search(args.only, name):
            continue
        old_fn(), new_fn()  # warm up
        times = {"old": [], "new": []}
        tries = 0
        while len(times["old"]) < args.rounds and tries < args.rounds * 20:
            tries += 1
            pair = {}

            def one_round():
                pair["old"] = best_of(old_fn)
                pair["new"] = best_of(new_fn)

            if args.quiet is not None and others_load(one_round) > args.quiet:
                continue  # other processes took a core meanwhile: not a comparison of the two versions
            elif args.quiet is None:
                one_round()
            for k in times:
                times[k].append(pair[k])
        if not times["old"]:
            print(f"{name:44s} never quiet")
            continue
        o, n = (statistics.median(times[k]) * 1e3 for k in ("old", "new"))
        print(f"{name:44s} {o:8.2f} {n:8.2f} {n / o:8.2f}", flush=True)


if __name__ == "__main__":
    main()
