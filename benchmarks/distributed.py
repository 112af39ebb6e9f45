"""One process with 2 threads against 2 MPI ranks with 1 thread each: ResNet18 at 32 px, global batch 128.

    python benchmarks/distributed.py                    # 3 alternating rounds, table and JSON
    python benchmarks/distributed.py --rounds 5 --steps 6 --json benchmarks/results/distributed.json

Each round runs, one after the other (so that other work on a shared machine
slows both alike):

* ``single``: one process, 2 BLAS threads, SGD steps on batch 128;
* ``ranks``: ``mpiexec -n 2``, 1 thread per rank, batch 64 per rank (the same
  global batch), gradients averaged by :class:`tinynet.distributed.DistributedOptimizer`;
  the time spent in its allreduces, and then, alone, the time of one
  allreduce of 11,689,512 float32 values (torchvision ResNet18's gradients,
  46.8 MB), after a barrier.

With ``--scan``, one process on 1 thread is also timed at per-rank batches
2 to 128: the images per second a rank keeps when N ranks share the global
batch of 128 (the projection in docs/distributed.md needs it).

Every number is the median over the timed steps of a round; the table gives
each round, so the spread shows how noisy the machine was.  The figures
quoted in docs/distributed.md come from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESNET18_GRADIENTS = 11_689_512  # torchvision's resnet18 (1000 classes)


def _step_loop(comm, batch, steps, warmup=2):
    """Seconds per step (median), and per step the seconds inside the gradient allreduces."""
    from tinynet import distributed, nn, optim
    from tinynet.models import resnet18

    import tinynet

    tinynet.manual_seed(0)
    net = resnet18(188, head="linear")
    net.set_input_grad(False)
    optimizer = optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if comm is not None:
        net, optimizer = distributed.prepare(net, optimizer, comm)
    rng = np.random.default_rng(comm.rank if comm is not None else 0)
    x = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 188, size=batch)
    loss_fn = nn.CrossEntropyLoss()
    times, comm_times = [], []
    for i in range(warmup + steps):
        if comm is not None:
            comm.barrier()
        before = getattr(optimizer, "comm_seconds", 0.0)
        started = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(net(x), y)
        net.backward(loss_fn.backward())
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
            comm_times.append(getattr(optimizer, "comm_seconds", 0.0) - before)
    return statistics.median(times), statistics.median(comm_times)


def child_single(steps):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(2):
        step, _ = _step_loop(None, 128, steps)
    return {"step_seconds": step, "images_per_second": 128 / step}


def child_scan(steps):
    from threadpoolctl import threadpool_limits

    out = {}
    with threadpool_limits(1):
        for batch in (2, 4, 8, 16, 32, 64, 128):
            step, _ = _step_loop(None, batch, steps, warmup=1)
            out[batch] = batch / step
    return out


def child_ranks(steps):
    from tinynet import distributed

    comm = distributed.init(limit_threads=True)
    step, comm_step = _step_loop(comm, 128 // comm.size, steps)
    buf = np.ones(RESNET18_GRADIENTS, dtype=np.float32)
    reduce_times = []
    for _ in range(5):
        comm.barrier()
        started = time.perf_counter()
        comm.allreduce_(buf)
        reduce_times.append(time.perf_counter() - started)
    step = comm.agree(step)  # rank 0's numbers
    comm_step = comm.agree(comm_step)
    return {"step_seconds": step, "images_per_second": 128 / step, "allreduce_in_step_seconds": comm_step,
            "comm_fraction": comm_step / step, "allreduce_46MB_seconds": comm.agree(statistics.median(reduce_times)),
            "ranks": comm.size, "rank": comm.rank}


def run_child(args, ranks, child=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = child or ("ranks" if ranks else "single")
    cmd = [sys.executable, __file__, "--child", child, "--steps", str(args.steps)]
    if ranks:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [str(pathlib.Path(sys.executable).with_name("mpiexec")), "-n", str(ranks)] + cmd
    else:
        env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--scan", action="store_true", help="also time 1 thread at per-rank batches 2..128")
    parser.add_argument("--json", help="write the rounds here")
    parser.add_argument("--child", choices=("single", "ranks", "scan"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("single", "scan"):
        print(json.dumps((child_single if args.child == "single" else child_scan)(args.steps)))
        return
    if args.child == "ranks":
        result = child_ranks(args.steps)
        if result["rank"] == 0:
            print(json.dumps(result))
        return
    rounds = []
    print(f"{'round':>5}  {'1 x 2 threads':>14}  {f'{args.ranks} ranks x 1':>14}  {'allreduce/step':>14}  "
          f"{'comm %':>6}  {'46.8 MB allreduce':>17}")
    for r in range(args.rounds):
        single, ranks = run_child(args, 0), run_child(args, args.ranks)
        rounds.append({"single": single, "ranks": ranks})
        print(f"{r + 1:>5}  {single['images_per_second']:>10.1f} img/s  {ranks['images_per_second']:>8.1f} img/s  "
              f"{1e3 * ranks['allreduce_in_step_seconds']:>11.1f} ms  {100 * ranks['comm_fraction']:>5.1f}%  "
              f"{1e3 * ranks['allreduce_46MB_seconds']:>14.1f} ms", flush=True)

    def spread(values):
        return f"median {statistics.median(values):.1f}, min {min(values):.1f}, max {max(values):.1f}"

    print("single img/s:", spread([r["single"]["images_per_second"] for r in rounds]))
    print("ranks img/s: ", spread([r["ranks"]["images_per_second"] for r in rounds]))
    print("allreduce ms:", spread([1e3 * r["ranks"]["allreduce_46MB_seconds"] for r in rounds]))
    scan = None
    if args.scan:
        scan = run_child(args, 0, "scan")
        print("1 thread, img/s by per-rank batch:", ", ".join(f"{b}: {r:.0f}" for b, r in scan.items()))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rounds": rounds, "steps": args.steps, "scan": scan,
                                                       "cores": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
