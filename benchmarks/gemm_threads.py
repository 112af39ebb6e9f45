"""Whose threads run the matrix products: BLAS's own, or tinynet's (tinynet.nn.fast.gemm)?

    python benchmarks/gemm_threads.py                      # the pass after a product, then the models
    python benchmarks/gemm_threads.py --models resnet18 --rounds 7

1. **The pass after a product.**  A 64 MB element-wise pass split over tinynet's threads
   (:func:`tinynet.nn.fast.threads.for_flat_pieces`), timed right after a 2-thread sgemm and right
   after a 1-thread one: OpenBLAS's threads spin for a while after a product, on the cores the
   pass wants.
2. **Whole steps.**  Training steps and evaluation forwards (batch 64, 64 px) with the products
   on BLAS's threads (``gemm._blas = []``: what tinynet did before) and on tinynet's (the
   default), and PyTorch at its defaults, in one process, alternating within every round.
   Each cell is the median over rounds of the median step of the round.

Prints the CPU model, its widest vector ISA and the BLAS kernel, as every benchmark here.
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

from benchmarks.cases import tinynet_eval_forward, tinynet_train_step, torch_eval_forward, torch_train_step  # noqa: E402
from benchmarks.run import blas_info, cpu_name, isa, time_cpu  # noqa: E402
from tinynet import backend  # noqa: E402
from tinynet.nn.fast import gemm  # noqa: E402
from tinynet.nn.fast.threads import for_flat_pieces  # noqa: E402


def pass_after_product(repeat: int = 21) -> dict:
    """ms of a split 64 MB pass right after a 1-thread and after a 2-thread 512^3 sgemm.

    BLAS is held at the one count for the whole loop, after half a second of rest (so that no
    thread still spins from earlier products), and given its count back at the end.
    """
    libs = gemm._blas_libraries()
    saved = [lib.get_num_threads() for lib in libs]
    src = np.random.default_rng(0).random(16 << 20, dtype=np.float32)
    dst = np.empty_like(src)
    g = np.ones((512, 512), np.float32)
    result = {}
    for blas_threads in (1, 2):
        for lib in libs:
            lib.set_num_threads(blas_threads)
        time.sleep(0.5)
        times = []
        for _ in range(repeat):
            g @ g
            start = time.perf_counter()
            for_flat_pieces(lambda x, y: np.multiply(x, 1.5, out=y), src, dst)
            times.append(time.perf_counter() - start)
        result[f"after a {blas_threads}-thread sgemm"] = 1000 * statistics.median(times)
    for lib, n in zip(libs, saved):
        lib.set_num_threads(n)
    return result


def products_on(owner: list, libs: list) -> None:
    """Give BLAS its own thread count back (the round before may have held it at one), then let
    ``gemm`` own the products (``owner`` = the BLAS libraries) or leave them to BLAS (``[]``)."""
    gemm._blas = libs
    gemm.release_blas_threads()
    gemm._blas = owner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "cnn", "user cnn"])
    p.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    backend.keep_freed_host_memory()
    print(f"CPU: {cpu_name()}, {isa()}, {backend.num_threads()} threads; BLAS: "
          + ", ".join(f"{i['internal_api']} {i['version']} ({i['architecture']})" for i in blas_info()))
    if not gemm._blas_libraries():
        print("threadpoolctl finds no BLAS library it can set: nothing to compare")
        return 1
    for name, ms in pass_after_product().items():
        print(f"64 MB pass on {backend.num_threads()} threads, {name}: {ms:.2f} ms")
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("(PyTorch does not import: tinynet alone)")
    libs = gemm._blas_libraries()
    for model in args.models:
        for mode in args.modes:
            make_tn = tinynet_train_step if mode == "train" else tinynet_eval_forward
            make_th = torch_train_step if mode == "train" else torch_eval_forward
            step = make_tn(model, 64)("cpu")  # one model, timed with each owner of the products
            th = make_th(model, 64)("cpu") if torch is not None else None
            rows: dict = {}
            for _ in range(args.rounds):
                for label, owner in (("BLAS's threads", []), ("tinynet's threads", libs)):
                    products_on(owner, libs)
                    rows.setdefault(label, []).append(statistics.median(time_cpu(step, 2, args.steps)))
                products_on(libs, libs)  # PyTorch's turn: NumPy's BLAS at its own count, as a user would have it
                if th is not None:
                    rows.setdefault("PyTorch", []).append(statistics.median(time_cpu(th, 2, args.steps)))
            cells = {label: 1000 * statistics.median(v) for label, v in rows.items()}
            text = "  ".join(f"{label}: {ms:.1f} ms" for label, ms in cells.items())
            ours = cells["tinynet's threads"]
            ratio = ours / cells["BLAS's threads"]
            vs = f"  tinynet's/PyTorch {ours / cells['PyTorch']:.2f}" if "PyTorch" in cells else ""
            print(f"{model:<9} {mode:<5} {text}  tinynet's/BLAS's {ratio:.2f}{vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
