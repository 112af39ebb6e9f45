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
import contextlib
import itertools
import json
import os
import pathlib
import platform
import re
import signal
import sys

import numpy as np

from . import backend
from .data.folder import RUN_FOLDER_MARKER
from .io.files import atomic_write
from .train import CheckpointError, NonFiniteLossError, TrainingInterrupted

__all__ = ["UsageError", "FailedRun", "InterruptedAfterTraining", "CommandLineParser", "check_device",
           "check_output_folder", "check_seed",
           "check_image_size", "hardware", "run_command", "write_json", "remove_stale_temporaries",
           "claim_output_folder", "check_outside", "remove_abandoned_partials", "MAX_IMAGE_SIZE"]

#: The largest --image-size / --size accepted.  The decoded dataset grows with its square (N x S x S x 3
#: bytes), and so does every activation: ResNet18 at 512 px and batch 64 already needs about 40 GB for one
#: training step.  A larger value would end in a MemoryError (or the kernel's OOM killer) far into the run.
MAX_IMAGE_SIZE = 512


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


class FailedRun(Exception):
    """The run ended without a result that can be reported (a loss that is not a number): exit status 1."""


class InterruptedAfterTraining(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after the last epoch, while the test numbers, figures and report were being made.

    The checkpoint holds every epoch, so ``--resume`` trains nothing and finishes the results.
    """


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


#: The largest value of the counting options: 10**12 epochs or images per batch is a typo, never a plan.
MOST = {"epochs": 100_000, "batch_size": 65_536}


def check_counts(args, names) -> None:
    """Each option of ``names`` (attributes of ``args``) a positive integer, at most :data:`MOST` where listed."""
    for name in names:
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    for name in names:
        value, most = getattr(args, name), MOST.get(name)
        if most is not None and value > most:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {most}, got {value}")


def check_threads(value) -> None:
    """``--threads``: "auto" or a count (:func:`tinynet.cores.parse_threads`), else a :class:`UsageError`."""
    from .cores import parse_threads

    try:
        parse_threads(value)
    except ValueError as error:
        raise UsageError(f"--threads: {error}") from None


def add_threads_argument(parser) -> None:
    """``--threads auto|N``: how many CPU threads compute (:mod:`tinynet.cores`)."""
    parser.add_argument("--threads", default=os.environ.get("TINYNET_THREADS", "auto"), metavar="auto|N",
                        help="CPU threads for the matrix products and tinynet's own passes; 'auto' (the default, "
                             "or $TINYNET_THREADS) uses the cores other programs leave free, and gives cores back "
                             "while they need them")


def start_threads(threads, log):
    """The :class:`tinynet.cores.ThreadGovernor` for ``--threads`` (logged); a :class:`UsageError` for a bad value."""
    from .cores import ThreadGovernor

    try:
        governor = ThreadGovernor(threads, log=log)
    except ValueError as error:
        raise UsageError(f"--threads: {error}") from None
    log(f"threads: {governor.reason}")
    return governor


def check_seed(seed: int) -> int:
    """``seed`` if NumPy can seed a generator with it (0 .. 2**32 - 1, as ``numpy.random.seed`` wants)."""
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed must lie in 0..{2**32 - 1}, got {seed}")
    return seed


def check_image_size(option: str, size: int) -> int:
    """``size`` if it lies in 1 .. :data:`MAX_IMAGE_SIZE`; ``option`` names it in the error."""
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise UsageError(f"{option} must lie in 1..{MAX_IMAGE_SIZE} pixels, got {size} (the images and every "
                         f"activation grow with its square)")
    return size


# What tinynet.io.files.atomic_write names its temporary file: ".<target name>.<12 hex digits>.tmp".
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{12}\.tmp")


def remove_stale_temporaries(folder, targets) -> list:
    """Delete the temporary files a killed run left in ``folder`` while writing one of ``targets`` (names).

    A write through :func:`~tinynet.io.files.atomic_write` removes its
    temporary file when it fails, but a SIGKILL or a power cut gives it no
    chance.  Only files of exactly that pattern, for the files this program
    writes, are removed; returns their paths.  Call it only while holding the
    folder (:func:`claim_output_folder`): no other run is writing there then,
    so every such file is a dead run's.
    """
    removed = []
    for path in pathlib.Path(folder).iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and match["target"] in targets and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


# What tinynet.data.archive names a cache file while writing it: "<cache name>.npz.partial-<the writer's pid>".
_PARTIAL = re.compile(r".+\.npz\.partial-(?P<pid>[0-9]+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True


def remove_abandoned_partials(folder) -> list:
    """Delete the half-written cache files (``<name>.npz.partial-<pid>``) in ``folder`` whose writer is dead.

    The writer's pid is in the name, so a cache that another run is writing
    right now (several runs may share a cache folder) is left alone; a pid
    that a new process has taken since keeps its leftover until it ends.
    Returns the paths removed.
    """
    removed = []
    for path in pathlib.Path(folder).iterdir():
        match = _PARTIAL.fullmatch(path.name)
        if match and not _alive(int(match["pid"])) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def check_outside(out, data, out_option: str = "--out", data_option: str = "--data") -> None:
    """Refuse an output folder inside (or equal to) the data folder: the run's figures would become images."""
    out_real, data_real = pathlib.Path(out).resolve(), pathlib.Path(data).resolve()
    if out_real == data_real or data_real in out_real.parents:
        raise UsageError(f"{out_option} {str(out)!r} is inside {data_option} {str(data)!r}: the run's figures would "
                         f"be read as training images; choose an output folder outside the data folder")


def _holds_run(folder: pathlib.Path, run_files) -> bool:
    return any((folder / name).exists() for name in run_files)


def _lock(folder: pathlib.Path):
    """An open, exclusively locked ``folder/.tinynet-run``, or the pid of the live run that holds it (an int).

    ``flock`` locks belong to the open file: the kernel releases them when the
    process ends, however it ends (SIGKILL included), so a dead run never
    holds a folder.  Without ``fcntl`` (Windows) folders are not locked.
    """
    try:
        import fcntl
    except ImportError:
        return None
    file = open(folder / RUN_FOLDER_MARKER, "a+")  # created if missing; never truncated before the lock is ours
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read(20).strip()
        file.close()
        return int(holder) if holder.isdigit() else -1
    except BaseException:
        file.close()
        raise
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")  # for the message another run prints; the lock itself is what counts
    file.flush()
    return file


def claim_output_folder(path, run_files, *, resume: bool, keep) -> tuple[pathlib.Path, str | None]:
    """The folder this run writes into, created and locked until ``keep`` (an ``ExitStack``) closes.

    ``--resume`` continues the run in ``path`` itself; a live run still
    writing there refuses it (:class:`UsageError`).  A new run never
    overwrites a run: it takes the first of ``path``, ``path-2``, ``path-3``,
    ... that holds none of ``run_files`` (the names a run writes) and that no
    live run holds, as Lightning and Ultralytics number their runs.  Returns
    the folder and, when it is not ``path``, a sentence saying why (for the
    run's first log line).
    """
    path = pathlib.Path(path)
    base = path if path.name else path.resolve()  # "." has no name to number
    for number in itertools.count(1):
        folder = path if number == 1 else base.with_name(f"{base.name}-{number}")
        if not resume and _holds_run(folder, run_files):
            continue
        check_output_folder(folder)
        lock = _lock(folder)
        if isinstance(lock, int):
            if resume:
                raise UsageError(f"--out {str(path)!r} is in use by a run still writing there (pid {lock}); "
                                 f"wait for it to end, or stop it first")
            continue
        if not resume and _holds_run(folder, run_files):  # a run finished there while this one was choosing
            if lock is not None:
                lock.close()
            continue
        if lock is not None:
            keep.callback(lock.close)
        if folder == path:
            return folder, None
        return folder, (f"this run writes to {folder}: {path} holds an earlier run, which is kept (pass --resume to "
                        f"continue that one instead)")


def write_json(path, value) -> pathlib.Path:
    """Write ``value`` as indented JSON to ``path`` atomically (a kill midway leaves the old file or none)."""
    path = pathlib.Path(path)
    with atomic_write(path) as file:
        file.write(json.dumps(value, indent=2, default=str).encode())
    return path


def hardware(device: str) -> dict:
    """What a run's numbers were measured on, for its metrics file: on the GPU also its model, driver,
    CUDA runtime and CuPy versions (:func:`tinynet.backend.gpu_info`)."""
    info = {"device": device, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}
    if backend.normalize_device(device) == "cuda":
        info.update(backend.gpu_info())
    return info


def run_command(prog: str, job) -> int:
    """Call ``job()`` and turn the errors a user can cause into a message and an exit status.

    0: done; 2: bad input (:class:`UsageError`, an unusable checkpoint), one
    line on stderr; 1: the loss became NaN (in training, validation or the
    test), memory ran out, or a file could not be written (a full disk); 130:
    Ctrl-C, after the checkpoint was saved; 143: SIGTERM (what ``kill``, a
    batch scheduler or a container stop sends), handled exactly as Ctrl-C.
    """
    # A file name that is not valid UTF-8 (or not in the terminal's encoding) is printed with escapes
    # rather than stopping the run with a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        with _sigterm_as_ctrl_c() as sigterm:
            job()
    except (UsageError, CheckpointError) as error:
        _say(f"{prog}: error: {error}")
        return 2
    except (NonFiniteLossError, FailedRun) as error:
        _say(f"{prog}: {error}")
        return 1
    except MemoryError:
        _say(f"{prog}: error: out of memory; lower --batch-size or the image size")
        return 1
    except OSError as error:  # CheckpointWriteError says which checkpoint is still intact
        _say(f"{prog}: error: {error}")
        return 1
    except TrainingInterrupted as stop:
        how = "terminated (SIGTERM): " if sigterm.received else ""
        _say(f"\n{prog}: {how}{stop}; run again with --resume to continue")
        return 143 if sigterm.received else 130
    except InterruptedAfterTraining:
        how = "terminated (SIGTERM)" if sigterm.received else "interrupted"
        _say(f"\n{prog}: {how} after training, while the results were written; the checkpoint holds every epoch; "
              f"run again with --resume to finish the test numbers, figures and report (no epoch is trained again)")
        return 143 if sigterm.received else 130
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if sigterm.received else "interrupted"
        _say(f"\n{prog}: {how} outside training; every checkpoint written so far is intact; run again with "
              f"--resume to continue")
        return 143 if sigterm.received else 130
    return 0


def _say(text: str) -> None:
    """``text`` and its newline to stderr in one write: ranks under ``mpiexec`` share the stream, and
    a line written in two pieces can be cut by another rank's."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class _sigterm_as_ctrl_c:
    """Within the block, SIGTERM raises KeyboardInterrupt, so that training saves and stops as on Ctrl-C.

    Further SIGTERMs are then ignored, so that the checkpoint being written
    is finished (as :func:`~tinynet.train.fit` ignores a second Ctrl-C).
    Outside the main thread signals cannot be handled, and nothing changes.
    """

    received = False

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.received = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False
