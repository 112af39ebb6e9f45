"""Everything that needs a GPU, in one call of the device machine (at most 530 s), most important first.

    bash benchmarks/gpu_check.sh                   # the whole check, on `cuda`
    bash benchmarks/gpu_check.sh --only tests_plain,bench_64   # a rerun of some steps
    bash benchmarks/gpu_check.sh --dry-run         # the same driver on the CPU (CuPy stand-in, no GPU)
    bash benchmarks/gpu_check.sh --plan            # the plan below, as JSON

With the device tool: ``run(command="bash benchmarks/gpu_check.sh", timeout_s=570)``.  The script
runs the project's virtual environment's Python (``.venv/bin/python``) when there is one, else
``python3`` (on the device machine, the one with CuPy and PyTorch; ``$PYTHON`` overrides both).

Why one call.  The device machine allows 600 s per command and 900 s of device time per session,
counting its start-up (a minute or more), every command and the idle time between calls; a machine
idle for 30 s is given back, and the next call starts a bare one, without CuPy's compiled kernels.
One call of at most 530 s, with its start-up, leaves about 250 s: enough for one rerun of a failed
step (``--only``).  Each step has a hard timeout (its cap), and the caps sum to 530 s.

What it prints, as it goes (every line flushed): each step's banner ``== <step> (timeout N s): ...``,
its own output, and its end ``== <step>: ok|failed|timed out (exit N) in S s``; the probes print one
``RESULT {...}`` line per item as soon as it is read, so a step killed half-way still says what it
read; last, a one-line summary of every step.  What it returns in ``$OUT`` (the device tool's output
folder; else /tmp/gpu_check), written as it goes, 7 files:

* ``gpu_check.log``: everything printed;
* ``gpu_check.json``: the plan, then each step's status, exit code, seconds and RESULT items,
  rewritten after every step (a kill leaves the steps done so far);
* ``conformance.json``: the conformance replay's summary and each call where CuPy differs from the
  stand-in (benchmarks/conformance_replay.py);
* ``tests_fused.xml``, ``tests_plain.xml``: JUnit XML of ``pytest -m gpu`` with the fused kernels and
  on the plain path (``TINYNET_FAST=0``);
* ``example_resnet.json``: the metrics.json of ``train_resnet.py --device cuda`` (its checkpoints and
  figures stay in /tmp/gpu_check_runs);
* ``bench_64.json``: tinynet against PyTorch-CUDA, batch 64, every case.

Plan (seconds; caps are the steps' timeouts; expected values are estimates: nothing here has run on
a GPU yet, and CuPy's first compilations, NVRTC and CUB, were never timed):

==============  ==========================================================  ========  ===
step            what                                                        expected  cap
==============  ==========================================================  ========  ===
conformance     every call of recorded_calls.json replayed on CuPy, in      20-35     45
                8 processes: the stand-in's leniencies, checked first;
                compiles CuPy's kernels for the steps after it
env             versions, GPU, driver, NVRTC, one element-wise and one      5         15
                reduction kernel
warmup          float32 only: two train steps of the CNN and of ResNet18,   20-40     50
                each timed (the first compiles the fused kernels and
                CuPy's own: the cold compilation time)
tests_fused     pytest -m gpu, fused kernels                                70-110    150
tests_plain     pytest -m gpu, the plain path (TINYNET_FAST=0)              50-70     90
example_resnet  train_resnet.py --device cuda, 1 epoch (scikit-learn        30-50     70
                digits), no t-SNE
bench_64        batch 64, every case, TF32 off, peak-memory probes          60-90     110
==============  ==========================================================  ========  ===

Sum of the caps: 530 s (one command may run 600 s).  With the start-up (120 s at most) the call
takes 650 of the session's 900 s: 250 s spare.  ``tests/test_gpu_check_plan.py`` checks these sums
and runs the whole plan with ``--dry-run`` on the CPU.
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

# The device machine's limits (the device tool's README), and what this plan assumes around its call.
LIMITS = {"per_call_s": 600, "session_s": 900, "files_back": 8, "file_mib": 16, "folders_deep": 2}
CALL_CAP_S = 540  # the plan's steps run at most this long: the command's 600 s less a margin
START_UP_S = 120  # starting a machine and sending the working tree: "a minute or more"
RUNS = Path("/tmp/gpu_check_runs")  # big outputs (checkpoints, figures) stay here, not in $OUT
CACHE = Path("/tmp/gpu_check_cupy_cache")  # CuPy's compiled kernels, for every step of the call
LOG, STATUS = "gpu_check.log", "gpu_check.json"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    timeout_s: int
    expected_s: int
    command: tuple  # on the GPU; "{py}", "{out}", "{runs}" are filled in
    dry_command: tuple  # the CPU stand-in for --dry-run: same plumbing, on the CuPy stand-in or the CPU
    env: tuple = ()  # extra environment variables, (name, value) pairs
    artefacts: tuple = ()  # small files the step writes into $OUT
    copy_back: tuple = ()  # (file under {runs}, name in $OUT): small results copied from the run folder


PYTEST = ("{py}", "-u", "-m", "pytest", "-v", "-rA", "--durations=15", "-p", "no:cacheprovider", "-m", "gpu")
PROBE = ("{py}", "-u", "benchmarks/gpu_check.py", "--probe")
REPLAY = ("{py}", "-u", "benchmarks/conformance_replay.py", "--json", "{out}/conformance.json")
BENCH = ("{py}", "-u", "benchmarks/run.py")
DRY_TESTS = ("tests/gpu/test_standin_strict.py",)  # the dry run checks the plumbing, not the suite

STEPS = (
    Step("conformance", 45, 30, REPLAY + ("--jobs", "8", "--budget", "35"), REPLAY + ("--standin", "--budget", "20"),
         artefacts=("conformance.json",)),
    Step("env", 15, 5, PROBE + ("env", "cuda"), PROBE + ("env", "cpu")),
    Step("warmup", 50, 30, PROBE + ("warmup", "cuda"), PROBE + ("warmup", "cpu")),
    Step("tests_fused", 150, 90, PYTEST + ("--junitxml", "{out}/tests_fused.xml", "tests"),
         PYTEST + ("--junitxml", "{out}/tests_fused.xml") + DRY_TESTS, artefacts=("tests_fused.xml",)),
    Step("tests_plain", 90, 60, PYTEST + ("--junitxml", "{out}/tests_plain.xml", "tests"),
         PYTEST + ("--junitxml", "{out}/tests_plain.xml") + DRY_TESTS, env=(("TINYNET_FAST", "0"),),
         artefacts=("tests_plain.xml",)),
    Step("example_resnet", 70, 40, ("{py}", "-u", "examples/train_resnet.py", "--device", "cuda", "--epochs", "1",
                                    "--no-tsne", "--no-progress", "--out", "{runs}/resnet"),
         ("{py}", "-u", "examples/train_resnet.py", "--device", "cpu", "--epochs", "1", "--limit", "12",
          "--image-size", "32", "--no-tsne", "--no-progress", "--out", "{runs}/resnet"),
         copy_back=(("resnet/metrics.json", "example_resnet.json"),)),
    Step("bench_64", 110, 75, BENCH + ("--device", "cuda", "--batch", "64", "--json", "{out}/bench_64.json"),
         BENCH + ("--device", "cpu", "--batch", "2", "--only", "Linear 2048", "--no-torch", "--no-memory",
                  "--warmup", "1", "--json", "{out}/bench_64.json"), artefacts=("bench_64.json",)),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def plan() -> dict:
    """Device seconds of the call: every step's cap, their sum, the start-up, and what is left of the session."""
    caps = {step.name: step.timeout_s for step in STEPS}
    call = sum(caps.values())
    return {"steps_s": caps, "call_s": call, "start_up_s": START_UP_S, "total_s": START_UP_S + call,
            "spare_s": LIMITS["session_s"] - START_UP_S - call, "limits": LIMITS}


def returned_files() -> list:
    """The names the call leaves in $OUT: the log, the status JSON, and each step's small artefacts."""
    names = [LOG, STATUS]
    for step in STEPS:
        names += list(step.artefacts) + [name for _, name in step.copy_back]
    return names


# ---------------------------------------------------------------------------
# Running the steps
# ---------------------------------------------------------------------------
def _fill(command, **values) -> list:
    return [word.format(**values) for word in command]


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


def run_all(out: Path, *, dry_run: bool = False, only=None) -> int:
    """Run the steps (``only``: those named, in the plan's order), each within its cap; 1 if one failed."""
    out.mkdir(parents=True, exist_ok=True)
    steps = [step for step in STEPS if only is None or step.name in only]
    runs = RUNS / f"{'dry' if dry_run else 'gpu'}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    runs.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUPY_CACHE_DIR=str(CACHE),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if dry_run:
        env["TINYNET_GPU_CHECK_DRY_RUN"] = "1"
    status = {
        "dry_run": dry_run, "python": sys.executable, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "cap_s": sum(step.timeout_s for step in steps), "plan": plan(), "finished": False,
        "kernel_cache_files_at_start": sum(1 for p in CACHE.rglob("*") if p.is_file()),
        "steps": [{"name": s.name, "timeout_s": s.timeout_s, "expected_s": s.expected_s, "status": "pending"}
                  for s in steps],
    }
    json_path = out / STATUS
    _write_json(json_path, status)
    failed = 0
    with open(out / LOG, "a", buffering=1) as log:
        for step, record in zip(steps, status["steps"]):
            command = _fill(step.dry_command if dry_run else step.command, py=sys.executable, out=str(out),
                            runs=str(runs))
            banner = f"\n== {step.name} (timeout {step.timeout_s} s): {' '.join(command)}\n"
            log.write(banner)
            print(banner, end="", flush=True)
            record.update(status="running", command=command)
            _write_json(json_path, status)
            start = log.tell()
            rc, seconds = run_step(command, dict(env, **dict(step.env)), step.timeout_s, log)
            record.update(status="timed out" if rc == 124 else ("ok" if rc == 0 else "failed"), rc=rc,
                          seconds=round(seconds, 1))
            result = _results(out / LOG, start)
            if result:
                record["result"] = result
            for source, name in step.copy_back:
                if (runs / source).is_file():
                    shutil.copyfile(runs / source, out / name)
            failed |= rc != 0
            line = f"== {step.name}: {record['status']} (exit {rc}) in {seconds:.1f} s\n"
            log.write(line)
            print(line, end="", flush=True)
            _write_json(json_path, status)
    status["finished"] = True
    status["seconds"] = round(sum(s.get("seconds", 0) for s in status["steps"]), 1)
    _write_json(json_path, status)
    print("\ngpu_check: " + ", ".join(f"{s['name']} {s['status']} {s.get('seconds', 0):.0f}s" for s in status["steps"]),
          flush=True)
    return 1 if failed else 0


def _results(log_path: Path, start: int) -> dict:
    """The ``RESULT {...}`` lines a step printed (from byte ``start`` of the log), merged into one dict."""
    merged = {}
    with open(log_path, "rb") as log:
        log.seek(start)
        for line in log.read().decode(errors="replace").splitlines():
            if line.startswith("RESULT "):
                try:
                    merged.update(json.loads(line[len("RESULT "):]))
                except ValueError:
                    merged.setdefault("unreadable_result_lines", 0)
                    merged["unreadable_result_lines"] += 1
    return merged


# ---------------------------------------------------------------------------
# Probes (run as steps, in their own process, so that a hang is killed by the step's timeout)
# ---------------------------------------------------------------------------
def result(key, value) -> None:
    """Print one result item at once, so that a step killed later still returns it."""
    print("RESULT " + json.dumps({key: value}, default=str), flush=True)


def probe_env(device: str) -> dict:
    import platform

    import numpy

    from tinynet import backend

    info = {"python": platform.python_version(), "executable": sys.executable, "numpy": numpy.__version__,
            "device": device, "cupy_available": backend.cupy_available(), "gpu_available": backend.gpu_available()}
    for key, value in info.items():
        result(key, value)
    items = {"torch": _torch_version}
    if device == "cuda":  # each item on its own: on a first run, one failing call must not hide the rest
        import cupy

        runtime = cupy.cuda.runtime
        items.update({
            "cupy": lambda: cupy.__version__,
            "accelerators": lambda: os.environ.get("CUPY_ACCELERATORS", "(default)"),
            "gpu_info": backend.gpu_info,
            "nvrtc": lambda: list(cupy.cuda.nvrtc.getVersion()),
            "device_count": runtime.getDeviceCount,
            "first_kernels_s": _first_kernels_seconds,
        })
    for key, read in items.items():
        try:
            info[key] = read()
        except Exception as error:  # recorded, not raised
            info[key] = f"error: {type(error).__name__}: {error}"
        result(key, info[key])
    return info


def _torch_version():
    try:
        import torch
    except ImportError:
        return None
    return {"version": torch.__version__, "cuda": torch.cuda.is_available()}


def _first_kernels_seconds() -> float:
    """Seconds for one element-wise and one reduction kernel: compiled, or read from CuPy's cache."""
    import cupy

    x = cupy.arange(10, dtype=cupy.float32)
    started = time.perf_counter()
    float((x * 2 + 1).sum())
    return round(time.perf_counter() - started, 2)


def probe_warmup(device: str) -> dict:
    """Two train steps of each model in float32, each timed: the first one compiles.

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
    for dtype in ("float32",):  # what users train in; float64 compiles its own kernels when a test needs them
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
                result(key, timings[key])
    kernel = getattr(kernels, "_compiled", None)  # name -> its ElementwiseKernel (CuPy keeps what it compiled)
    if device == "cuda" and kernel is not None:
        compiled = sorted(name for name in kernels.SOURCES if _compiled(kernel(name)))
        timings["fused_kernels_compiled"] = compiled
        timings["fused_kernels_not_compiled"] = sorted(set(kernels.SOURCES) - set(compiled))
        result("fused_kernels_compiled", compiled)
        result("fused_kernels_not_compiled", timings["fused_kernels_not_compiled"])
    return timings


def _compiled(elementwise_kernel) -> bool:
    import warnings

    with warnings.catch_warnings():  # CuPy warns when a kernel has not been compiled yet
        warnings.simplefilter("ignore")
        return bool(elementwise_kernel.cached_codes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run the steps' CPU stand-ins (no GPU needed)")
    parser.add_argument("--only", help="comma-separated steps to run (default: all): " + ", ".join(STEP_NAMES))
    parser.add_argument("--plan", action="store_true", help="print the plan as JSON and exit")
    parser.add_argument("--out", help="output folder (default: $OUT, else /tmp/gpu_check)")
    parser.add_argument("--probe", nargs=2, metavar=("WHAT", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        what, device = args.probe
        (probe_env if what == "env" else probe_warmup)(device)  # each item printed as it comes
        return 0
    if args.plan:
        print(json.dumps({"plan": plan(), "files": returned_files()}, indent=2))
        return 0
    only = None
    if args.only:
        only = set(args.only.split(","))
        if only - set(STEP_NAMES):
            parser.error(f"unknown step(s) {', '.join(sorted(only - set(STEP_NAMES)))}; the steps: "
                         + ", ".join(STEP_NAMES))
    out = Path(args.out or os.environ.get("OUT") or "/tmp/gpu_check")
    return run_all(out, dry_run=args.dry_run, only=only)


if __name__ == "__main__":
    sys.exit(main())
