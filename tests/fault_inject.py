"""Run an example's command line with one fault injected at a known point (used by tests/test_faults_*.py).

    python tests/fault_inject.py MODEL MODE AT MARKER -- [train_MODEL.py options]

``AT`` is 1-based.  Modes:

- ``pause``: in training step AT (counted across epochs; evaluation passes do
  not count), before its update, write MARKER and sleep, so that the test can
  kill the process (SIGKILL) or press Ctrl-C (SIGINT) mid-epoch;
- ``nan``: training step AT has a NaN loss;
- ``enospc``: checkpoint write number AT (after epoch AT, unless Ctrl-C was
  pressed) fails half-way with "No space left on device";
- ``stall``: checkpoint write number AT stops half-way: MARKER is written
  and the process sleeps, to be killed mid-write;
- ``hold``: AT is ``NAME:N``: the N-th atomic write of a file called NAME
  (checkpoint.npz, best.safetensors, metrics.json, ...) is held with its
  temporary file complete, just before the rename: MARKER is written and the
  process waits until MARKER.go exists (at most 60 s), then finishes the
  write; the test signals or kills it in between.

Everything else is the unmodified command line of ``examples/train_MODEL.py``.
Imported as a module, it gives the tests :func:`inject`, :func:`call_main`
(the command line in-process, quicker), :func:`run_cli` and :func:`start_cli`
(in a new process: for signals and the terminal's encoding) and :func:`image_folder`.
"""
import contextlib
import errno
import os
import pathlib
import sys
import time

import numpy as np

from tinynet import nn
from tinynet.experiment import main
from tinynet.nn.module import is_grad_enabled
from tinynet.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Small, quick runs: the options every test run of the command line shares.
QUICK = ("--epochs", "2", "--batch-size", "7", "--image-size", "16", "--no-progress")


def _command(model, args, fault):
    if fault is None:
        return [sys.executable, str(ROOT / "examples" / f"train_{model}.py"), *map(str, args)]
    mode, at, marker = fault
    return [sys.executable, __file__, model, mode, str(at), str(marker), "--", *map(str, args)]


def _env(extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def call_main(capsys, model, *args):
    """``train_<model>.py args`` in this process: ``(exit status, stdout, stderr)``."""
    try:
        status = main(model, [str(arg) for arg in args])
    except SystemExit as stop:  # argparse's errors
        status = stop.code
    except KeyboardInterrupt as error:  # would end the test session instead of failing the test
        raise AssertionError("main let a KeyboardInterrupt escape: the user sees a traceback") from error
    out, err = capsys.readouterr()
    return status, out, err


def run_cli(model, *args, fault=None, env=None, timeout=120):
    """Run ``examples/train_<model>.py args`` (with ``fault=(mode, at, marker)``, through this wrapper)."""
    import subprocess

    return subprocess.run(_command(model, args, fault), capture_output=True, text=True, timeout=timeout,
                          env=_env(env), cwd=ROOT)


def start_cli(model, *args, fault, env=None):
    """Start a run with a ``pause`` fault and return once it is paused at its marker: ``subprocess.Popen``."""
    import subprocess

    marker = pathlib.Path(fault[2])
    process = subprocess.Popen(_command(model, args, fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_env(env), cwd=ROOT)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run ended before pausing: {process.communicate()}")
        time.sleep(0.05)
    return process


def image_folder(root, per_class=10, size=16):
    """``root/dark`` and ``root/bright``, ``per_class`` PNGs each: two classes a small CNN tells apart at once."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("bright", 200)):
        folder = pathlib.Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return pathlib.Path(root)


class FullDisk:
    """Wraps a binary file: takes ``room`` bytes, then fails as a full disk does (ENOSPC).

    With ``marker``, it writes the marker file and sleeps instead of failing,
    so that the process can be killed half-way through the write.
    """

    def __init__(self, file, room=1000, marker=None):
        self.file, self.room, self.marker = file, room, marker

    def write(self, data):
        if len(data) > self.room:
            if self.marker is not None:
                self.file.write(data[:self.room])
                self.file.flush()  # half a checkpoint is on disk, in the temporary file
                pathlib.Path(self.marker).write_text("stalled")
                time.sleep(120)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def inject(mode: str, at: int, marker=None, patch=setattr) -> None:
    """Install fault ``mode`` at ``at``; ``patch`` is ``setattr``, or a test's ``monkeypatch.setattr``."""
    if mode in ("pause", "nan"):
        forward = nn.CrossEntropyLoss.forward
        steps = 0

        def faulty_forward(self, logits, target):
            nonlocal steps
            loss = forward(self, logits, target)
            if not is_grad_enabled():  # an evaluation pass
                return loss
            steps += 1
            if steps == at and mode == "pause":
                marker.write_text("paused")
                time.sleep(120)
            if steps == at and mode == "nan":
                return loss * np.float32(np.nan)
            return loss

        patch(nn.CrossEntropyLoss, "forward", faulty_forward)
    elif mode in ("enospc", "stall"):
        write_atomically = checkpoint.atomic_write
        saves = 0

        @contextlib.contextmanager
        def faulty_atomic_write(path):
            nonlocal saves
            saves += 1
            with write_atomically(path) as file:
                stall = marker if mode == "stall" else None
                yield FullDisk(file, marker=stall) if saves == at else file

        patch(checkpoint, "atomic_write", faulty_atomic_write)
    elif mode == "hold":
        name, _, number = str(at).rpartition(":")
        replace, writes = os.replace, 0

        def held_replace(source, target, *args, **kwargs):
            nonlocal writes
            if pathlib.Path(target).name == name:
                writes += 1
                if writes == int(number):
                    marker.write_text("held")
                    release, deadline = pathlib.Path(f"{marker}.go"), time.monotonic() + 60
                    while not release.exists() and time.monotonic() < deadline:
                        time.sleep(0.02)
            return replace(source, target, *args, **kwargs)

        patch(os, "replace", held_replace)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    model, mode, at, marker, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: fault_inject.py MODEL MODE AT MARKER -- [options]"
    inject(mode, at if mode == "hold" else int(at), pathlib.Path(marker))
    sys.exit(main(model, argv))
