"""Replay every CuPy call tinynet made on the CuPy stand-in, on a real CuPy: where do the two differ?

The stand-in (tests/cupy_standin) is strict where CuPy 14 is strict as far as its authors read CuPy's
source; this script checks that reading against the real thing in the first minute on a GPU.
``tests/cupy_standin/recorded_calls.json`` holds one example of each call the GPU tests and the
example scripts made on the stand-in (name, arguments as dtype and shape or as values, keywords), and
what the stand-in did when this script replayed it (returned: the dtypes and shapes; or raised: the
exception's name).  Replayed on another ``cupy``, each call is made with arrays of those dtypes and
shapes (floats 1, integers 0, booleans True), and every difference is printed as it is found::

    DIFF ndarray.reshape(float32/(2, 3), int, copy=none): stand-in returns float32/(3, 2); here raises TypeError

    python benchmarks/conformance_replay.py                  # on `import cupy` (a GPU): the check
    python benchmarks/conformance_replay.py --standin        # on the stand-in (CI: no difference)
    python benchmarks/conformance_replay.py --jobs 8         # 8 processes (CuPy compiles each kernel once)
    python benchmarks/conformance_replay.py --record         # regenerate the JSON file (on the CPU)

Ends with one line ``RESULT {"calls": ..., "replayed": ..., "differences": ..., "not_run": ...,
"seconds": ...}``; exit status 1 when a call differs.  ``--budget`` (default 30 s) stops starting calls
once spent: CuPy compiles every kernel at its first call (about 0.1 to 0.5 s each with NVRTC, kept in
CUPY_CACHE_DIR for what runs after), so the calls expected to raise (the stand-in's refusals) run
first, then the rest by name.  A CUDA error (an illegal address) ends the replay: the context is lost.

What it cannot check: values (the arrays hold constants), anything a call's outcome depends on beyond
its dtypes and shapes, and the calls no test made.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

import numpy

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALLS = ROOT / "tests" / "cupy_standin" / "recorded_calls.json"


# ---------------------------------------------------------------------------
# Building the arguments
# ---------------------------------------------------------------------------
class Unreplayable(Exception):
    """An argument that the file describes but cannot rebuild (a stream, a memory pointer...)."""


def _fill(dtype, shape, module, contiguous=True):
    dtype = numpy.dtype(dtype)
    if not contiguous and len(shape):  # a strided view: a wider array, its last column dropped
        return module.ones(tuple(shape[:-1]) + (shape[-1] + 1,), dtype)[..., :-1] if dtype.kind in "fcb" \
            else module.zeros(tuple(shape[:-1]) + (shape[-1] + 1,), dtype)[..., :-1]
    return module.ones(shape, dtype) if dtype.kind in "fcb" else module.zeros(shape, dtype)


def build(encoded, xp):
    """The value ``encoded`` describes, with ``xp`` arrays for the device arrays."""
    kind = next(iter(encoded))
    if kind == "array":
        return _fill(encoded["array"], encoded["shape"], xp, encoded.get("contiguous", True))
    if kind == "host":
        return _fill(encoded["host"], encoded["shape"], numpy)
    if kind == "host_list":
        return _fill(encoded["host_list"], encoded["shape"], numpy).tolist()
    if kind == "scalar":
        return numpy.dtype(encoded["scalar"]).type(encoded["value"])
    if kind in ("bool", "int", "str"):
        return encoded["value"]
    if kind == "float":
        return float(encoded["value"])
    if kind == "complex":
        return complex(*encoded["value"])
    if kind == "none":
        return None
    if kind in ("list", "tuple"):
        items = [build(v, xp) for v in encoded[kind]]
        return items if kind == "list" else tuple(items)
    if kind == "slice":
        return slice(*(build(v, xp) for v in encoded["slice"]))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "dtype":
        return numpy.dtype(encoded["dtype"])
    raise Unreplayable(f"{kind} {encoded[kind]}")


def outcome_of(value, xp) -> dict:
    """What a call returned, as dtypes, shapes and types (the stand-in's encoding of results)."""
    if isinstance(value, xp.ndarray):
        return {"array": value.dtype.name, "shape": list(value.shape)}
    if isinstance(value, numpy.ndarray):
        return {"host": value.dtype.name, "shape": list(value.shape)}
    if isinstance(value, numpy.generic):
        return {"scalar": value.dtype.name}
    if value is None:
        return {"none": True}
    if isinstance(value, (bool, int, float, complex, str)):
        return {"type": type(value).__name__}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [outcome_of(v, xp) for v in value]}
    return {"other": type(value).__name__}


# ---------------------------------------------------------------------------
# Making one call
# ---------------------------------------------------------------------------
_kernels: dict = {}


def _kernel(name, xp):
    """The ElementwiseKernel tinynet calls ``name`` (``tinynet_<key of tinynet.kernels.SOURCES>``)."""
    if name not in _kernels:
        from tinynet import kernels

        in_params, out_params, body, preamble = kernels.SOURCES[name[len("tinynet_"):]]
        _kernels[name] = xp.ElementwiseKernel(in_params, out_params, body, name, preamble=preamble)
    return _kernels[name]


def _target(name, xp):
    """The callable ``name`` names; a method's object is the first argument (None here)."""
    if name.startswith("ElementwiseKernel:"):
        return _kernel(name.split(":", 1)[1], xp)
    if name.startswith("random.Generator."):
        return getattr(xp.random.default_rng(0), name.rsplit(".", 1)[1])
    module, parts = xp, name.split(".")
    if parts[0] == "numpy":  # a NumPy function called with CuPy arrays (NumPy's dispatch protocols)
        module, parts = numpy, parts[1:]
    for part in parts:
        module = getattr(module, part)
    return module


def call(entry, xp):
    """Make the call ``entry`` describes on ``xp``; its outcome, encoded."""
    name = entry["name"]
    args = [build(a, xp) for a in entry["args"]]
    kwargs = {k: build(v, xp) for k, v in entry["kwargs"].items()}
    try:
        with warnings.catch_warnings(), numpy.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            if name == "ndarray.__getitem__":
                result = args[0][args[1]]
            elif name == "ndarray.__setitem__":
                args[0][args[1]] = args[2]
                result = None
            elif name.startswith("ndarray."):
                result = getattr(args[0], name.split(".", 1)[1])(*args[1:], **kwargs)
            else:
                result = _target(name, xp)(*args, **kwargs)
            _synchronize(xp)
    except Exception as error:  # noqa: BLE001 (the outcome is what is compared)
        if "CUDA" in type(error).__name__ or "cudaError" in str(error):
            raise
        return {"raises": type(error).__name__}
    return {"returns": outcome_of(result, xp)}


def _synchronize(xp):
    """On a GPU, wait for the call's kernels, so that an asynchronous error is blamed on its call."""
    runtime = getattr(getattr(xp, "cuda", None), "runtime", None)
    if runtime is not None and not getattr(xp, "is_standin", False):
        runtime.deviceSynchronize()


def describe(entry) -> str:
    """``name(float32/(2, 3), int, axis=int)``: one line for a call."""
    def one(v):
        kind = next(iter(v))
        if kind in ("array", "host"):
            return f"{'np.' if kind == 'host' else ''}{v[kind]}/{tuple(v['shape'])}"
        if kind in ("list", "tuple"):
            return f"{kind}[{', '.join(one(x) for x in v[kind][:4])}{', ...' if len(v[kind]) > 4 else ''}]"
        if kind == "scalar":
            return f"np.{v['scalar']}({v['value']})"
        if kind in ("float", "dtype"):
            return str(v.get("value", v.get("dtype")))
        if kind in ("int", "bool", "str"):
            return repr(v["value"])
        return kind
    args = [one(a) for a in entry["args"]] + [f"{k}={one(v)}" for k, v in entry["kwargs"].items()]
    return f"{entry['name']}({', '.join(args)})"


def said(outcome) -> str:
    if "raises" in outcome:
        return f"raises {outcome['raises']}"
    return f"returns {json.dumps(outcome['returns'], separators=(',', ':'))}"


# ---------------------------------------------------------------------------
# Replaying a file
# ---------------------------------------------------------------------------
def ordered(calls) -> list:
    """The stand-in's refusals first (the claims a GPU must confirm), then the rest as in the file."""
    return [c for c in calls if "raises" in c["expect"]] + [c for c in calls if "raises" not in c["expect"]]


def replay(calls, xp, budget_s=30.0, out=None) -> dict:
    """Replay ``calls`` on ``xp``; prints each difference as found (to ``out``, default stdout); the summary."""
    out = out or sys.stdout
    started = time.monotonic()
    differences, skipped, replayed, stopped = [], 0, 0, None
    for entry in calls:
        if time.monotonic() - started > budget_s:
            break
        try:
            got = call(entry, xp)
        except Unreplayable:
            skipped += 1
            continue
        except Exception as error:  # a CUDA error: the context is lost, nothing after it can be trusted
            stopped = f"{describe(entry)}: {type(error).__name__}: {error}"
            print(f"STOPPED at {stopped}", file=out, flush=True)
            break
        replayed += 1
        if got != entry["expect"]:
            differences.append({"call": describe(entry), "stand_in": entry["expect"], "here": got})
            print(f"DIFF {describe(entry)}: stand-in {said(entry['expect'])}; here {said(got)}", file=out, flush=True)
    return {"calls": len(calls), "replayed": replayed, "differences": len(differences), "unreplayable": skipped,
            "not_run": len(calls) - replayed - skipped, "stopped": stopped,
            "seconds": round(time.monotonic() - started, 2), "diffs": differences}


def load(path=CALLS) -> list:
    return json.loads(pathlib.Path(path).read_text())["calls"]


def _module(standin: bool):
    if standin or os.environ.get("TINYNET_CUPY_STANDIN") == "1":
        sys.path.insert(0, str(ROOT / "tests"))
        import cupy_standin

        cupy_standin.install()
        return cupy_standin
    import cupy

    return cupy


# ---------------------------------------------------------------------------
# Recording the file (on the CPU, with the stand-in)
# ---------------------------------------------------------------------------
def _key(entry) -> str:
    def one(v):
        kind = next(iter(v))
        if kind in ("array", "host"):
            return f"{kind}:{v[kind]}/{len(v['shape'])}d"
        if kind in ("list", "tuple"):
            return f"{kind}[{','.join(one(x) for x in v[kind][:4])}]"
        return kind
    return json.dumps([entry["name"], [one(a) for a in entry["args"]], sorted(entry["kwargs"]),
                       next(iter(entry["outcome"]))])


def _size(entry) -> tuple:
    def elements(v):
        if isinstance(v, dict):
            return (int(numpy.prod(v["shape"])) if "shape" in v else 0) + sum(elements(x) for x in v.values())
        if isinstance(v, list):
            return sum(elements(x) for x in v)
        return 0
    return elements(entry["args"]) + elements(entry["kwargs"]), json.dumps(entry, sort_keys=True)


def record(path=CALLS) -> int:
    """Run the GPU tests on the stand-in, fused kernels on and off, keeping every call; write ``path``."""
    tests = ROOT / "tests"
    sys.path.insert(0, str(tests))
    import cupy_standin

    kept = {}
    with tempfile.TemporaryDirectory() as folder:
        for fast in ("1", "0"):
            env = dict(os.environ, TINYNET_CUPY_STANDIN="1", TINYNET_CUPY_STANDIN_CALLS=folder, TINYNET_FAST=fast)
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                   "tests/gpu", "--ignore", "tests/gpu/test_conformance_replay.py"], cwd=ROOT, env=env)
            if done.returncode:
                print(f"the GPU tests failed on the stand-in (TINYNET_FAST={fast}): fix them first", file=sys.stderr)
                return 1
        for name in sorted(glob.glob(os.path.join(folder, "calls-*.json"))):
            for entry in json.loads(pathlib.Path(name).read_text()):
                if entry["name"].startswith("nccl."):
                    continue  # pointers and MPI: tests/gpu/test_nccl.py runs those on two ranks
                key = _key(entry)
                if key not in kept or _size(entry) < _size(kept[key]):
                    kept[key] = entry
    cupy_standin.install()
    calls, changed = [], 0
    for key in sorted(kept):
        entry = kept[key]
        try:
            expect = call(entry, cupy_standin)
        except Unreplayable:
            continue
        if next(iter(expect)) != next(iter(entry["outcome"])):
            changed += 1  # the constants of the replay make it raise where the test's values did not (or back)
            print(f"note: {describe(entry)} {said(entry['outcome'])} in the tests, {said(expect)} when replayed")
        calls.append({"name": entry["name"], "args": entry["args"], "kwargs": entry["kwargs"], "expect": expect})
    text = ('{"about": "Every CuPy call tinynet made in tests/gpu on the CuPy stand-in (one example per name, '
            'argument dtypes/ndims, keywords and outcome) and what the stand-in did when it was replayed: '
            'benchmarks/conformance_replay.py. Regenerate with: python benchmarks/conformance_replay.py --record",\n'
            '"calls": [\n' + ",\n".join(json.dumps(c, sort_keys=True, separators=(",", ":")) for c in calls) + "\n]}\n")
    pathlib.Path(path).write_text(text)
    print(f"{len(calls)} calls written to {path} ({len(text) // 1024} KiB); {changed} replay with another outcome "
          f"than the test's values gave")
    return 0


# ---------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default=str(CALLS), help="the recorded calls (default: %(default)s)")
    parser.add_argument("--standin", action="store_true", help="replay on the CuPy stand-in instead of CuPy")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds after which no call starts (30)")
    parser.add_argument("--jobs", type=int, default=1, help="processes replaying a share each (CuPy compiles "
                                                              "its kernels in parallel then)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # k/N: this process's share, for --jobs
    parser.add_argument("--json", help="write the summary, with every difference, to this file")
    parser.add_argument("--record", action="store_true", help="regenerate --calls by running tests/gpu on the stand-in")
    args = parser.parse_args(argv)
    if args.record:
        return record(args.calls)
    calls = ordered(load(args.calls))
    if args.jobs > 1:
        summary = _in_processes(args, len(calls))
    else:
        if args.part:
            k, n = map(int, args.part.split("/"))
            calls = calls[k::n]
        xp = _module(args.standin)
        summary = replay(calls, xp, args.budget)
        summary["cupy"] = getattr(xp, "__version__", "?")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=1))
    print("RESULT " + json.dumps({k: v for k, v in summary.items() if k != "diffs"}), flush=True)
    return 1 if summary["differences"] or summary["stopped"] else 0


def _in_processes(args, total) -> dict:
    """``--jobs`` children, each replaying every N-th call; their summaries summed."""
    with tempfile.TemporaryDirectory() as folder:
        children = [subprocess.Popen([sys.executable, __file__, "--calls", args.calls, "--budget", str(args.budget),
                                      "--part", f"{k}/{args.jobs}", "--json", os.path.join(folder, f"{k}.json")]
                                     + (["--standin"] if args.standin else []), stdout=subprocess.PIPE, text=True)
                    for k in range(args.jobs)]
        for child in children:
            for line in child.stdout:  # DIFF lines as they come, the children's RESULT lines dropped
                if not line.startswith("RESULT "):
                    print(line, end="", flush=True)
            child.wait()
        parts = [json.loads(pathlib.Path(folder, f"{k}.json").read_text())
                 for k in range(args.jobs) if pathlib.Path(folder, f"{k}.json").exists()]
    summary = {"calls": total, "jobs": args.jobs}
    for key in ("replayed", "differences", "unreplayable"):
        summary[key] = sum(p[key] for p in parts)
    summary["not_run"] = total - summary["replayed"] - summary["unreplayable"]
    summary["stopped"] = next((p["stopped"] for p in parts if p["stopped"]), None)
    summary["seconds"] = max((p["seconds"] for p in parts), default=0.0)
    summary["cupy"] = parts[0]["cupy"] if parts else "?"
    summary["diffs"] = [d for p in parts for d in p["diffs"]]
    if len(parts) < args.jobs:
        summary["stopped"] = summary["stopped"] or f"{args.jobs - len(parts)} of {args.jobs} processes wrote nothing"
    return summary


if __name__ == "__main__":
    sys.exit(main())
