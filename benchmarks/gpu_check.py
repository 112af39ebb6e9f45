"""Everything that needs a GPU, as three short device calls that fit the lent machine's limits.

    bash benchmarks/gpu_check.sh tests                # call 1: environment, kernel warm-up, CuPy test suite twice
    bash benchmarks/gpu_check.sh bench                # call 2: GPU benchmarks against PyTorch-CUDA, TF32 off and on
    bash benchmarks/gpu_check.sh examples [DATA_DIR]  # call 3 (if time is left): both example scripts on cuda
    bash benchmarks/gpu_check.sh --dry-run STAGE      # the same steps on the CPU, without CuPy: checks the plumbing
    bash benchmarks/gpu_check.sh --plan               # print the timing plan below and exit

The device machine (see the device tool's README) allows 600 s per command and
900 s of device time per session, counting its start-up (a minute or more),
every command, and the idle time between calls (it stays warm 30 s).  At most
8 files of 16 MiB come back from ``$OUT`` per call, which is emptied before
each call.  So each stage is one call; each step in it has a hard timeout; the
stage writes ``$OUT/<stage>.log`` (every step's whole output, unbuffered, as it
comes) and ``$OUT/<stage>.json`` (the plan, then each step's status, exit code
and seconds, rewritten after every step), so a stage killed half-way still
returns what it did.  Big files (the examples' checkpoints and figures) stay
in ``/tmp/gpu_check_runs``; only their metrics come back.

Timing plan (seconds; caps are the steps' timeouts, expected values are
estimates, since nothing here has run on a GPU yet):

==========  ==========================================================  ========  ===
stage       step                                                        expected  cap
==========  ==========================================================  ========  ===
(start-up)  machine start and transfer of the working tree              60-120    120
tests       env: versions, GPU, NVRTC, one trivial kernel               5         15
tests       warmup: each fused kernel compiled (float32, float64),      20-40     60
            then one CNN and one ResNet18 train step: CuPy's first-time
            NVRTC and CUB (reduction) compilations, timed and cached on
            disk (CUPY_CACHE_DIR) for the steps after it
tests       pytest -m gpu, fused kernels                                60-100    140
tests       pytest -m gpu, the plain path (TINYNET_FAST=0):           40-60     85
            the fused kernels' compilations are not needed, the rest
            are cached
bench       batch 64, every case, TF32 off, with peak-memory probes     60-90     130
            (4 subprocesses, each imports CuPy or PyTorch)
bench       batch 256, model cases, TF32 off then on, no memory probes  30-50     70
examples    train_cnn.py --device cuda, 3 epochs (scikit-learn digits   20-40     50
            unless DATA_DIR is given)
examples    train_resnet.py --device cuda, 2 epochs, no t-SNE           30-60     70
(gaps)      idle between calls, 30 s each after calls 1, 2 and 3        90        90
==========  ==========================================================  ========  ===

Sums of the caps: tests 300 s, bench 200 s, examples 120 s per call (each half
the 600 s a command may run, so ``timeout_s`` can be the cap plus a margin);
start-up 120 + 300 + 200 + 120 + gaps 90 = 830 s of the 900 s, 70 s spare.
Run ``examples`` only if the device tool's ``status`` still shows at least
180 s; ``tests/test_gpu_check_plan.py`` checks these sums and runs every stage
with ``--dry-run`` on the CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# The device machine's limits (the device tool's README), and what this plan assumes around its calls.
LIMITS = {"per_call_s": 600, "session_s": 900, "files_back": 8, "file_mib": 16, "folders_deep": 2}
START_UP_S = 120  # starting a machine and sending the working tree: "a minute or more"
GAP_S = 30  # the machine stays warm 30 s after a call; the idle time until the next call counts
RUNS = Path("/tmp/gpu_check_runs")  # big outputs (checkpoints, figures) stay here, not in $OUT
CACHE = Path("/tmp/gpu_check_cupy_cache")  # CuPy's compiled kernels, kept across the calls of one machine


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    timeout_s: int
    expected_s: int
    command: tuple  # on the GPU; "{py}", "{out}", "{data}", "{runs}" are filled in
    dry_command: tuple  # the CPU stand-in for --dry-run: same plumbing, no CuPy, seconds
    env: tuple = ()  # extra environment variables, (name, value) pairs
    artefacts: tuple = ()  # small files the step writes into $OUT (beside <stage>.log and <stage>.json)
    copy_back: tuple = ()  # (file under {runs}, name in $OUT): small results copied from the run folder


PYTEST = ("{py}", "-u", "-m", "pytest", "-v", "-rA", "--durations=15", "-p", "no:cacheprovider", "-m", "gpu")
PROBE = ("{py}", "-u", "benchmarks/gpu_check.py", "--probe")
BENCH = ("{py}", "-u", "benchmarks/run.py")
BENCH_DRY = BENCH + ("--device", "cpu", "--batch", "2", "--only", "Linear 2048", "--no-torch", "--no-memory",
                     "--warmup", "1")
EXAMPLE_DRY = ("--device", "cpu", "--epochs", "1", "--limit", "12", "--image-size", "32", "--no-progress")

STAGES = {
    "tests": (
        Step("env", 15, 5, PROBE + ("env", "cuda"), PROBE + ("env", "cpu")),
        Step("warmup", 60, 30, PROBE + ("warmup", "cuda"), PROBE + ("warmup", "cpu")),
        Step("tests_fused", 140, 80, PYTEST + ("--junitxml", "{out}/tests_fused.xml", "tests"),
             PYTEST + ("--junitxml", "{out}/tests_fused.xml", "tests/gpu"), artefacts=("tests_fused.xml",)),
        Step("tests_plain", 85, 50, PYTEST + ("--junitxml", "{out}/tests_plain.xml", "tests"),
             PYTEST + ("--junitxml", "{out}/tests_plain.xml", "tests/gpu"),
             env=(("TINYNET_FAST", "0"),), artefacts=("tests_plain.xml",)),
    ),
    "bench": (
        Step("bench_64", 130, 75, BENCH + ("--device", "cuda", "--batch", "64", "--json", "{out}/bench_64.json"),
             BENCH_DRY + ("--json", "{out}/bench_64.json"), artefacts=("bench_64.json",)),
        Step("bench_256", 70, 40, BENCH + ("--device", "cuda", "--batch", "256", "--only", "step|forward",
                                           "--no-memory", "--tf32", "both", "--json", "{out}/bench_256.json"),
             BENCH_DRY + ("--json", "{out}/bench_256.json"), artefacts=("bench_256.json",)),
    ),
    "examples": (
        Step("example_cnn", 50, 30, ("{py}", "-u", "examples/train_cnn.py", "{data}", "--device", "cuda",
                                      "--epochs", "3", "--no-progress", "--out", "{runs}/cnn"),
             ("{py}", "-u", "examples/train_cnn.py", "{data}") + EXAMPLE_DRY + ("--out", "{runs}/cnn"),
             copy_back=(("cnn/metrics.json", "example_cnn.json"),)),
        Step("example_resnet", 70, 45, ("{py}", "-u", "examples/train_resnet.py", "{data}", "--device", "cuda",
                                         "--epochs", "2", "--no-tsne", "--no-progress", "--out", "{runs}/resnet"),
             ("{py}", "-u", "examples/train_resnet.py", "{data}") + EXAMPLE_DRY + ("--no-tsne", "--out",
                                                                                   "{runs}/resnet"),
             copy_back=(("resnet/metrics.json", "example_resnet.json"),)),
    ),
}


def stage_cap(stage: str) -> int:
    """The most seconds a stage can run: the sum of its steps' timeouts."""
    return sum(step.timeout_s for step in STAGES[stage])


def session_plan() -> dict:
    """Device seconds of the whole plan: start-up, every stage's cap, and the idle gap after each call."""
    calls = {stage: stage_cap(stage) for stage in STAGES}
    total = START_UP_S + sum(calls.values()) + GAP_S * len(calls)
    return {"start_up_s": START_UP_S, "calls_s": calls, "gaps_s": GAP_S * len(calls), "total_s": total,
            "spare_s": LIMITS["session_s"] - total, "limits": LIMITS}


def returned_files(stage: str) -> list:
    """The names a stage leaves in $OUT: its log and JSON, and each step's small artefacts."""
    names = [f"{stage}.log", f"{stage}.json"]
    for step in STAGES[stage]:
        names += list(step.artefacts) + [name for _, name in step.copy_back]
    return names


# ---------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------
def _fill(command, **values) -> list:
    out = []
    for word in command:
        if word == "{data}":  # the examples' data folder is optional: without it they use their bundled set
            out += ["--data", values["data"]] if values["data"] else []
        else:
            out.append(word.format(**values))
    return out


def run_step(command, env, timeout_s: int, log) -> tuple:
    """Run ``command`` with its output appended to ``log`` line by line (and echoed); (exit code, seconds).

    The child runs in its own process group, so a timeout ends it and everything it started;
    the exit code is then 124, as with coreutils' ``timeout``.  A group, not a session: the
    device machine ends a command's leftover processes when the command returns, except those
    that started a new session, and a step must never outlive the call it belongs to.
    """
    started = time.monotonic()
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **group)
    deadline = started + timeout_s
    timed_out = False
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(timeout=min(left, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            text = chunk.decode(errors="replace")
            log.write(text)
            log.flush()
            sys.stdout.write(text)
            sys.stdout.flush()
    if timed_out:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    proc.stdout.close()
    return (124 if timed_out else rc), time.monotonic() - started


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # a kill never leaves half a JSON file


def run_stage(stage: str, out: Path, *, dry_run: bool = False, data: str | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    runs = RUNS / f"{'dry' if dry_run else 'gpu'}-{stage}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    runs.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUPY_CACHE_DIR=str(CACHE),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if dry_run:
        env["TINYNET_GPU_CHECK_DRY_RUN"] = "1"
    status = {
        "stage": stage, "dry_run": dry_run, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "cap_s": stage_cap(stage), "plan": session_plan(), "finished": False,
        "kernel_cache_files_at_start": sum(1 for p in CACHE.rglob("*") if p.is_file()),
        "steps": [{"name": s.name, "timeout_s": s.timeout_s, "expected_s": s.expected_s, "status": "pending"}
                  for s in STAGES[stage]],
    }
    json_path = out / f"{stage}.json"
    _write_json(json_path, status)
    failed = 0
    with open(out / f"{stage}.log", "a", buffering=1) as log:
        for step, record in zip(STAGES[stage], status["steps"]):
            command = _fill(step.dry_command if dry_run else step.command, py=sys.executable, out=str(out),
                            runs=str(runs), data=data)
            banner = f"\n== {stage}/{step.name} (timeout {step.timeout_s} s): {' '.join(command)}\n"
            log.write(banner)
            print(banner, end="", flush=True)
            record.update(status="running", command=command)
            _write_json(json_path, status)
            rc, seconds = run_step(command, dict(env, **dict(step.env)), step.timeout_s, log)
            record.update(status="timed out" if rc == 124 else ("ok" if rc == 0 else "failed"), rc=rc,
                          seconds=round(seconds, 1))
            result = _last_result(out / f"{stage}.log")
            if step.command[:len(PROBE)] == PROBE and result is not None:
                record["result"] = result
            for source, name in step.copy_back:
                if (runs / source).is_file():
                    shutil.copyfile(runs / source, out / name)
            failed |= rc != 0
            line = f"== {stage}/{step.name}: {record['status']} (exit {rc}) in {seconds:.1f} s\n"
            log.write(line)
            print(line, end="", flush=True)
            _write_json(json_path, status)
    status["finished"] = True
    status["seconds"] = round(sum(s.get("seconds", 0) for s in status["steps"]), 1)
    _write_json(json_path, status)
    print(f"\n{stage}: " + ", ".join(f"{s['name']} {s['status']} {s.get('seconds', 0):.0f}s" for s in status["steps"]),
          flush=True)
    return 1 if failed else 0


def _last_result(log_path: Path):
    """The JSON after the last ``RESULT `` line a probe printed (None if there is none)."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
        if line.startswith("== "):
            return None
    return None


# ---------------------------------------------------------------------------
# Probes (run as steps, in their own process, so that a hang is killed by the step's timeout)
# ---------------------------------------------------------------------------
def probe_env(device: str) -> dict:
    import platform

    import numpy

    from tinynet import backend

    info = {"python": platform.python_version(), "numpy": numpy.__version__, "device": device,
            "cupy_available": backend.cupy_available(), "gpu_available": backend.gpu_available()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        info["torch"] = None
    if device == "cuda":  # each item on its own: on a first run, one failing call must not hide the rest
        import cupy

        runtime = cupy.cuda.runtime
        info["cupy"] = cupy.__version__
        info["accelerators"] = os.environ.get("CUPY_ACCELERATORS", "(default)")
        items = {
            "gpu": lambda: runtime.getDeviceProperties(0)["name"].decode(),
            "memory_gib": lambda: round(runtime.getDeviceProperties(0)["totalGlobalMem"] / 2**30, 1),
            "compute_capability": lambda: cupy.cuda.Device(0).compute_capability,
            "cuda_runtime": runtime.runtimeGetVersion,
            "driver": runtime.driverGetVersion,
            "nvrtc": lambda: list(cupy.cuda.nvrtc.getVersion()),
            "first_kernels_s": _first_kernels_seconds,
        }
        for key, read in items.items():
            try:
                info[key] = read()
            except Exception as error:  # recorded, not raised
                info[key] = f"error: {type(error).__name__}: {error}"
    return info


def _first_kernels_seconds() -> float:
    """Seconds for one element-wise and one reduction kernel: compiled, or read from CuPy's cache."""
    import cupy

    x = cupy.arange(10, dtype=cupy.float32)
    started = time.perf_counter()
    float((x * 2 + 1).sum())
    return round(time.perf_counter() - started, 2)


def probe_warmup(device: str) -> dict:
    """Two train steps of each model in float32 and float64, each timed: the first one compiles.

    The two models use every fused kernel of :mod:`tinynet.kernels` (convolution, max pooling,
    ReLU, BatchNorm, Adam) and CuPy's own element-wise and reduction kernels; CuPy compiles
    each at its first call for its argument types and keeps it in CUPY_CACHE_DIR, so the test
    steps after this one mostly read the cache.  The difference between the first and second
    step is the compilation time.  On the CPU (--dry-run) the images are smaller.
    """
    import tinynet
    from tinynet import backend, kernels, nn
    from tinynet.models import resnet18, simple_cnn

    size, batch = (64, 8) if device == "cuda" else (32, 2)
    models = (("cnn", lambda: simple_cnn(10, image_size=size)), ("resnet18", lambda: resnet18(10)))
    timings = {}
    for dtype in ("float32", "float64"):
        for label, make in models if device == "cuda" else models[:1]:  # the dry run: the CNN is enough
            tinynet.manual_seed(0)
            model = make().to(device, dtype=np.dtype(dtype))
            opt = tinynet.optim.Adam(model.parameters())
            loss_fn = nn.CrossEntropyLoss()
            rng = np.random.default_rng(0)
            x = backend.to_device(rng.standard_normal((batch, 3, size, size)).astype(dtype), device)
            y = backend.to_device(rng.integers(0, 10, batch), device)
            for attempt in ("first", "second"):
                started = time.perf_counter()
                loss = loss_fn(model(x), y)
                model.backward(loss_fn.backward())
                opt.step()
                opt.zero_grad()
                backend.synchronize(loss)
                key = f"{label}_{dtype}_train_step_{attempt}"
                timings[key] = round(time.perf_counter() - started, 3)
                print(f"{key}: {timings[key]} s", flush=True)
    kernel = getattr(kernels, "_compiled", None)  # name -> its ElementwiseKernel (CuPy keeps what it compiled)
    if device == "cuda" and kernel is not None:
        compiled = sorted(name for name in kernels.SOURCES if _compiled(kernel(name)))
        timings["fused_kernels_compiled"] = compiled
        timings["fused_kernels_not_compiled"] = sorted(set(kernels.SOURCES) - set(compiled))
    return timings


def _compiled(elementwise_kernel) -> bool:
    import warnings

    with warnings.catch_warnings():  # CuPy warns when a kernel has not been compiled yet
        warnings.simplefilter("ignore")
        return bool(elementwise_kernel.cached_codes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", nargs="?", choices=tuple(STAGES))
    parser.add_argument("data", nargs="?", help="examples only: the image folder (default: scikit-learn digits)")
    parser.add_argument("--dry-run", action="store_true", help="run the stage's CPU stand-ins (no CuPy needed)")
    parser.add_argument("--plan", action="store_true", help="print the timing plan as JSON and exit")
    parser.add_argument("--out", help="output folder (default: $OUT, else /tmp/gpu_check)")
    parser.add_argument("--probe", nargs=2, metavar=("WHAT", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        what, device = args.probe
        result = (probe_env if what == "env" else probe_warmup)(device)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.plan:
        print(json.dumps({"plan": session_plan(), "files": {s: returned_files(s) for s in STAGES}}, indent=2))
        return 0
    if args.stage is None:
        parser.error("name a stage: " + ", ".join(STAGES))
    if args.data and args.stage != "examples":
        parser.error("a data folder is for the examples stage only")
    out = Path(args.out or os.environ.get("OUT") or "/tmp/gpu_check")
    return run_stage(args.stage, out, dry_run=args.dry_run, data=args.data)


if __name__ == "__main__":
    sys.exit(main())
