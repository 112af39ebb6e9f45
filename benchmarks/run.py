"""tinynet vs PyTorch, side by side, in one process: one command, a table and a JSON file.

    python benchmarks/run.py                      # CPU, batch 64, every case
    python benchmarks/run.py --device cuda        # CuPy vs PyTorch-CUDA
    python benchmarks/run.py --only resnet18 --repeat 30 --json out.json
    python benchmarks/run.py --device cuda --tf32 both   # strict float32, then TF32, in both frameworks

Every case is timed as the median of ``--repeat`` runs (at least 20) after
``--warmup`` runs.  On the GPU each run is timed with CUDA events recorded on
the stream around it (never host clocks around asynchronous launches).  Both
frameworks use the same number of threads: PyTorch is set to the thread count
of NumPy's BLAS.  The float32 matrix-product peak is measured in the same run
(a 2048x2048 product on the CPU, 8192x8192 on the GPU), so "% peak" compares
like with like.

Peak memory of a training step is measured in a fresh subprocess per
framework: on the CPU, the peak resident set size (VmHWM, reset through
/proc/self/clear_refs) during two steps minus the resident size before the
model was built, so it counts weights, gradients, optimizer state,
activations and workspaces; on the GPU, the memory pool's bytes (CuPy's
``total_bytes``, PyTorch's ``max_memory_reserved``).

TF32 (the GPU's matrix units rounding float32 operands to 10 mantissa bits)
is set explicitly in both frameworks, since their defaults differ: CuPy's
matrix products are strict float32 unless ``CUPY_TF32`` is set, while
PyTorch's cuDNN convolutions use TF32 by default.  ``--tf32 off`` (the
default) times strict float32 in both, ``on`` TF32 in both (cuBLAS compute
type TF32 in CuPy; ``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32`` in PyTorch), ``both`` every case in each
mode.  Each row records its mode, and the header the settings read back from
both frameworks.  On the CPU there is no TF32: only ``off`` is accepted.

The BLAS kernel in use is printed (threadpoolctl).  These machines set
OPENBLAS_CORETYPE=Haswell, which holds NumPy's matrix product to AVX2 kernels
while PyTorch uses its own; to compare both at full speed, unset it (and
OPENBLAS_L2_SIZE) for the whole command, which applies to both frameworks:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/run.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import cases as case_defs  # noqa: E402
from tinynet import backend  # noqa: E402


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------
def blas_info() -> list:
    from threadpoolctl import threadpool_info

    return [{k: info.get(k) for k in ("internal_api", "architecture", "num_threads", "version", "filepath")}
            for info in threadpool_info() if info.get("user_api") == "blas"]


def blas_summary() -> str:
    """The BLAS libraries NumPy uses, in one line: ``openblas 0.3.31 (SkylakeX), ...``."""
    return ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']})" for b in blas_info()) or "unknown"


def blas_threads() -> int:
    infos = blas_info()
    return int(infos[0]["num_threads"]) if infos else (os.cpu_count() or 1)


def torch_module(device: str, threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        return None
    return torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def isa() -> str:
    """The widest x86 vector extension the CPU reports (AVX-512, AVX2, ...), from /proc/cpuinfo's flags."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
                    if flag in flags:
                        return name
                break
    except OSError:
        pass
    return platform.machine() or "unknown"


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def time_cpu(step, warmup: int, repeat: int, after=None) -> list:
    """Seconds of each of ``repeat`` runs of ``step`` after ``warmup`` untimed ones.

    ``after()``, if given, runs untimed after each timed run (benchmarks/busy.py: the thread governor's tick).
    """
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if after is not None:
            after()
    return times


def time_cuda_cupy(step, warmup: int, repeat: int) -> list:
    import cupy

    for _ in range(warmup):
        step()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeat):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1000.0)
    return times


def time_cuda_torch(torch, step, warmup: int, repeat: int) -> list:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times


def matmul_peak(device: str, repeat: int = 10) -> float:
    """Measured float32 GEMM GFLOP/s of the array library tinynet uses on ``device``."""
    if device == "cuda":
        import cupy

        n = 8192
        a = cupy.random.rand(n, n, dtype=cupy.float32)
        b = cupy.random.rand(n, n, dtype=cupy.float32)
        times = time_cuda_cupy(lambda: a @ b, 3, repeat)
    else:
        n = 2048
        rng = np.random.default_rng(0)
        a = rng.random((n, n), dtype=np.float32)
        b = rng.random((n, n), dtype=np.float32)
        times = time_cpu(lambda: a @ b, 2, repeat)
    return 2 * n ** 3 / min(times) / 1e9


# ---------------------------------------------------------------------------
# TF32
# ---------------------------------------------------------------------------
def set_tf32(enabled: bool, torch=None) -> dict:
    """Switch TF32 on or off for float32 matrix work in CuPy and PyTorch; return the settings read back.

    CuPy: the cuBLAS compute type of float32 products (``CUPY_TF32`` is read only
    once, at the first float32 product, so the compute type is set directly; the
    variable is set as well, for any subprocess).  PyTorch: matrix products and
    cuDNN convolutions.
    """
    import cupy
    from cupy._core import _routines_linalg as linalg

    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
    settings = {"tf32": enabled, "cupy_float32_compute_type": str(linalg.compute_type_to_str(
        linalg.get_compute_type(np.float32))), "cupy": cupy.__version__}
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        settings["torch_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        settings["torch_cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    return settings


def tf32_modes(option: str, device: str) -> list:
    """``--tf32`` as the list of modes to run: [False], [True] or [False, True]."""
    modes = {"off": [False], "on": [True], "both": [False, True]}[option]
    if device != "cuda" and modes != [False]:
        raise ValueError(f"--tf32 {option}: TF32 exists only on the GPU; on {device} use --tf32 off")
    return modes


# ---------------------------------------------------------------------------
# Memory (in a subprocess per framework)
# ---------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def memory_probe(framework: str, model: str, device: str, batch: int) -> dict:
    """Run two training steps and report the peak memory they needed (MB)."""
    threads = blas_threads()
    torch = torch_module(device, threads) if framework == "torch" else None
    builder = (case_defs.torch_train_step if framework == "torch" else case_defs.tinynet_train_step)(model, batch)
    if device == "cuda":
        if framework == "torch":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_reserved()
            step = builder("cuda")
            step(), step()
            torch.cuda.synchronize()
            return {"peak_mb": (torch.cuda.max_memory_reserved() - before) / 2**20, "what": "max_memory_reserved"}
        import cupy

        pool = cupy.get_default_memory_pool()
        before = pool.total_bytes()
        step = builder("cuda")
        step(), step()
        cupy.cuda.get_current_stream().synchronize()
        return {"peak_mb": (pool.total_bytes() - before) / 2**20, "what": "cupy pool total_bytes"}
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    step = builder("cpu")
    step(), step()
    return {"peak_mb": _status_mb("VmHWM") - before, "what": "peak RSS minus RSS before building the model"}


def measure_memory(framework: str, model: str, device: str, batch: int):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", framework, model,
           "--device", device, "--batch", str(batch)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        print(f"  (memory probe {framework}/{model} failed: {error})", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def run(args) -> dict:
    device = backend.check_device(args.device)
    modes = tf32_modes(args.tf32, device)
    threads = blas_threads()
    torch = None if args.no_torch else torch_module(device, threads)
    if device == "cuda":
        set_tf32(False, torch)  # the peak below is strict float32's; TF32's is measured per mode
    peak = matmul_peak(device)
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")}
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_name(),
        "isa": isa(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_info(),
        "env": env,
        "threads": threads,
        "torch": getattr(torch, "__version__", None),
        "batch": args.batch,
        "repeat": args.repeat,
        "matmul_peak_gflops": peak,
        "tf32_modes": modes,
    }
    if device == "cuda":
        import cupy

        header["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        header["cupy"] = cupy.__version__

    print(f"tinynet benchmarks on {device}: {header.get('gpu', header['cpu'])} ({header['isa']}), {threads} threads, "
          f"batch {args.batch}")
    for info in header["blas"]:
        print(f"  NumPy BLAS: {info['internal_api']} {info['version']}, kernel {info['architecture']}, "
              f"{info['num_threads']} threads")
    print(f"  OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE']}")
    print(f"  PyTorch: {header['torch'] or 'not available'}; float32 matmul peak {peak:.0f} GFLOP/s")

    rows = []
    header["tf32_settings"] = []
    for tf32 in modes:
        mode_peak = peak
        if device == "cuda":
            settings = set_tf32(tf32, torch)
            mode_peak = settings["matmul_peak_gflops"] = matmul_peak(device) if tf32 else peak
            header["tf32_settings"].append(settings)
            print(f"\n== TF32 {'on' if tf32 else 'off'}: {settings}", flush=True)
            print_row.printed_header = False  # a table per mode
        # % peak compares with this mode's own matmul peak; memory does not depend on the mode: measured once
        rows += run_cases(args, device, torch, mode_peak, tf32, memory=not args.no_memory and tf32 == modes[0])
    return {"header": header, "rows": rows}


def run_cases(args, device, torch, peak, tf32, memory) -> list:
    """Time every selected case once in the current TF32 mode; print and return the rows."""
    rows = []
    for case in case_defs.all_cases(args.batch):
        if args.only and not re.search(args.only, case.name):
            continue
        row = {"case": case.name, "kind": case.kind, "images": case.images, "gflop": 2 * case.macs / 1e9,
               "tf32": tf32}
        step = case.tinynet(device)
        times = (time_cuda_cupy if device == "cuda" else time_cpu)(step, args.warmup, args.repeat)
        row["tinynet_ms"] = 1000 * statistics.median(times)
        del step
        if torch is not None:
            step = case.torch(device)
            times = (time_cuda_torch(torch, step, args.warmup, args.repeat) if device == "cuda"
                     else time_cpu(step, args.warmup, args.repeat))
            row["torch_ms"] = 1000 * statistics.median(times)
            row["ratio"] = row["tinynet_ms"] / row["torch_ms"]
            del step
        if case.name.endswith("train step") and memory:
            model = case.name[:-len(" train step")]  # "user cnn train step" -> "user cnn"
            row["tinynet_peak_mb"] = measure_memory("tinynet", model, device, args.batch)
            if torch is not None:
                row["torch_peak_mb"] = measure_memory("torch", model, device, args.batch)
        for fw in ("tinynet", "torch"):
            if f"{fw}_ms" in row:
                seconds = row[f"{fw}_ms"] / 1000
                row[f"{fw}_img_s"] = case.images / seconds
                if case.macs:
                    row[f"{fw}_gflops"] = 2 * case.macs / seconds / 1e9
                    row[f"{fw}_pct_peak"] = 100 * row[f"{fw}_gflops"] / peak
        rows.append(row)
        print_row(row)
    return rows


COLUMNS = ("case", "tinynet ms", "torch ms", "ratio", "tn img/s", "torch img/s", "tn GFLOP/s", "% peak", "peak MB tn/torch")


def print_row(row) -> None:
    if not getattr(print_row, "printed_header", False):
        print()
        print(f"{COLUMNS[0]:<26}" + "".join(f"{c:>13}" for c in COLUMNS[1:-1]) + f"  {COLUMNS[-1]}")
        print_row.printed_header = True

    def num(key, fmt, width=13):
        value = row.get(key)
        return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    memory = ""
    if "tinynet_peak_mb" in row:
        memory = f"  {num('tinynet_peak_mb', '.0f', 0)} / {num('torch_peak_mb', '.0f', 0)}"
    print(f"{row['case']:<26}{num('tinynet_ms', '.1f')}{num('torch_ms', '.1f')}{num('ratio', '.2f')}"
          f"{num('tinynet_img_s', '.0f')}{num('torch_img_s', '.0f')}{num('tinynet_gflops', '.0f')}"
          f"{num('tinynet_pct_peak', '.0f')}{memory}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per case, at least 20 (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    parser.add_argument("--only", help="regular expression selecting cases by name")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--tf32", choices=("off", "on", "both"), default="off",
                        help="GPU only: strict float32 (off, the default), TF32 (on) or each in turn (both), "
                             "set the same way in CuPy and PyTorch")
    parser.add_argument("--json", help="where to write the results (default: benchmarks/results/<date>-<device>.json)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("FRAMEWORK", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backend.keep_freed_host_memory()  # as a training script does (tinynet no longer does it on import)
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, backend.normalize_device(args.device), args.batch)))
        return 0
    if args.repeat < 20:
        parser.error("--repeat must be at least 20 (medians of fewer runs are too noisy to compare)")
    try:
        results = run(args)
    except (RuntimeError, ValueError) as error:  # e.g. --device cuda without CuPy or a GPU, --tf32 on the CPU
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = Path(args.json) if args.json else (
        ROOT / "benchmarks" / "results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{results['header']['device']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
