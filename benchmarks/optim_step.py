"""One optimizer step over ResNet18's parameters (11.2 M float32), plain loop vs the fast step, in one process.

    python benchmarks/optim_step.py                    # Adam, AdamW, Adam with L2 decay
    python benchmarks/optim_step.py --rounds 31

Variants, alternated round by round (medians and minima reported):

* ``plain``: :func:`tinynet.optim.adam._adam_step_plain` parameter by parameter
  (the formulas line by line, allocating);
* ``fast, 1 thread``: the optimizer's step with ``backend.set_num_threads(1)``,
  timed by the thread's CPU time as well (another process on the same cores
  disturbs that much less than the wall clock);
* ``fast``: the optimizer's step as it runs, its passes split over the threads.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tinynet import backend, optim  # noqa: E402
from tinynet.models import resnet18  # noqa: E402
from tinynet.nn.fast import threads as thread_pool  # noqa: E402
from tinynet.optim import adam  # noqa: E402


def _plain_step(opt):
    for group in opt.param_groups:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            state = opt.state.setdefault(id(p), {})
            if not state:
                state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
            state["step"] += 1
            t = state["step"]
            decay = 1.0 - lr * wd if wd and opt._decoupled else 1.0
            coupled = wd if wd and not opt._decoupled else 0.0
            adam._adam_step_plain(p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], b1, b2,
                                  lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t), eps, coupled, decay)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    threads = backend.num_threads()
    for name, cls, wd in (("Adam", optim.Adam, 0.0), ("AdamW", optim.AdamW, 1e-2), ("Adam+L2", optim.Adam, 5e-4)):
        opts = []
        for _ in range(3):
            params = list(resnet18(10).parameters())
            for p in params:
                p.grad = rng.standard_normal(p.shape).astype(np.float32)
            opts.append(cls(params, lr=1e-3, weight_decay=wd))

        def one_thread(opt):
            # thread_pool._num_threads directly: set_num_threads would shut the pool down and the threaded
            # variant would pay for starting it again every round
            saved, thread_pool._num_threads = thread_pool._num_threads, 1
            try:
                opt.step()
            finally:
                thread_pool._num_threads = saved

        variants = {"plain": (lambda: _plain_step(opts[0]), time.perf_counter),
                    "plain, CPU time": (lambda: _plain_step(opts[0]), time.thread_time),
                    "fast, 1 thread, CPU time": (lambda: one_thread(opts[1]), time.thread_time),
                    f"fast, {threads} threads": (opts[2].step, time.perf_counter)}
        times = {k: [] for k in variants}
        for r in range(args.rounds + 1):
            for k, (step, clock) in variants.items():
                t = clock()
                step()
                if r:  # round 0 makes the state and warms up
                    times[k].append(clock() - t)
        row = "  ".join(f"{k} {statistics.median(v) * 1e3:6.2f} ms (min {min(v) * 1e3:.2f})" for k, v in times.items())
        print(f"{name:8s} {row}", flush=True)


if __name__ == "__main__":
    main()
