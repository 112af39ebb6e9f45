"""What every tinynet command line shares: one-line errors, checked options, and the exit statuses.

``tinynet.experiment`` (behind ``examples/train_cnn.py`` and
``examples/train_resnet.py``) and ``examples/pretrain_resnet.py`` build their
parsers and their ``main`` from these pieces, so that a mistake a user can
make (a bad option, ``--device cuda`` without a GPU, an output folder that
cannot be written, an unusable checkpoint) ends every script the same way:
one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys

import numpy as np

from . import backend
from .train import CheckpointError, NonFiniteLossError, TrainingInterrupted

__all__ = ["UsageError", "CommandLineParser", "check_device", "check_output_folder", "hardware", "run_command"]


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line and exit status 2 (argparse would print the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_device(device: str) -> str:
    """``device`` normalised ("cpu" or "cuda"); a :class:`UsageError` when it is unknown or has no GPU."""
    try:
        return backend.check_device(device)
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error)) from None


def check_output_folder(path) -> pathlib.Path:
    """Create the folder ``path`` if needed and make sure a file can be written in it."""
    out = pathlib.Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"output folder {str(out)!r} cannot be written: {error.strerror or error}") from None
    return out


def hardware(device: str) -> dict:
    """What a run's numbers were measured on, for its metrics file."""
    return {"device": device, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}


def run_command(prog: str, job) -> int:
    """Call ``job()`` and turn the errors a user can cause into a message and an exit status.

    0: done; 2: bad input (:class:`UsageError`, an unusable checkpoint), one
    line on stderr; 1: the loss became NaN, or a file could not be written (a
    full disk); 130: Ctrl-C, after the checkpoint was saved.
    """
    # A file name that is not valid UTF-8 (or not in the terminal's encoding) is printed with escapes
    # rather than stopping the run with a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        job()
    except (UsageError, CheckpointError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # CheckpointWriteError says which checkpoint is still intact
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        print(f"\n{prog}: {stop}; run again with --resume to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted outside training; every checkpoint written so far is intact", file=sys.stderr)
        return 130
    return 0
