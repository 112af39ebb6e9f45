"""How many cores tinynet computes on, and noticing that other programs need some of them.

Two thread pools can do tinynet's work on the CPU: the BLAS library's (OpenBLAS
under NumPy: the matrix products of the plain path) and tinynet's own
(:func:`tinynet.nn.fast.threads.parallel_for`: the memory-bound passes, and on the fast
path the matrix products too, cut into pieces with BLAS held on one thread:
:mod:`tinynet.nn.fast.gemm`).  By default both use every core this process may run on.

That is right on an idle machine and badly wrong on a busy one.  OpenBLAS's
threads wait for work by spinning, and a matrix product is only as fast as
its slowest thread: when another program holds one of two cores, the thread
that shares that core runs a fraction of the time and the other spins waiting
for it.  Measured on a 2-core VM with one core taken by a spinning process, a
ResNet18 step took 1311 ms on two threads and 697 ms on one (the issue that
asked for this module; ``benchmarks/busy.py`` measures it again).

So :class:`ThreadGovernor`, with ``threads="auto"`` (the scripts' default):

* before training, samples the machine for :data:`SAMPLE_SECONDS` and uses
  the cores that other processes leave free (at least one);
* while training, every :data:`RECHECK_SECONDS`, measures how much CPU the
  *other* processes used since the last check (the system's busy time from
  ``/proc/stat`` minus this process's own, from ``os.times``: what tinynet
  itself uses does not count, so the decision does not feed on itself) and
  changes the thread count when the free cores changed.

``threads=N`` fixes N threads (both pools) and never changes it.  Where
``/proc/stat`` does not exist (macOS, Windows) "auto" means every core.
Nothing here runs at import.
"""
from __future__ import annotations

import os
import time

__all__ = ["available_cores", "other_processes_cores", "set_threads", "ThreadGovernor", "parse_threads",
           "SAMPLE_SECONDS", "RECHECK_SECONDS", "BUSY_THRESHOLD"]

#: How long the first look at the machine lasts (it runs once, before training).
SAMPLE_SECONDS = 0.25
#: How often the governor looks again while training (a look, one read of /proc/stat and os.times, costs ~0.02 ms).
RECHECK_SECONDS = 10.0
#: A core counts as taken when other processes use at least this fraction of it on average.
BUSY_THRESHOLD = 0.5


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, or the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity on macOS and Windows
        return max(1, os.cpu_count() or 1)


def _system_busy_seconds():
    """CPU seconds all processes spent busy since boot (``/proc/stat``), or None where it cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already in user.
    busy = sum(ticks[:8]) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_busy_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _mark():
    """``(wall clock, system busy seconds, own busy seconds)`` now: the start of a measurement."""
    return time.perf_counter(), _system_busy_seconds(), _own_busy_seconds()


def _others_since(mark):
    """``(cores' worth of CPU the other processes used since mark, a new mark)``; None where unknown.

    The system's busy time minus this process's own: what tinynet itself uses never counts.
    """
    now = _mark()
    (t0, system0, own0), (t1, system1, own1) = mark, now
    if system0 is None or system1 is None or t1 <= t0:
        return None, now
    return max(0.0, (system1 - system0) - (own1 - own0)) / (t1 - t0), now


def other_processes_cores(seconds: float = SAMPLE_SECONDS):
    """How many cores' worth of CPU the other processes used over the next ``seconds`` (None: unknown)."""
    mark = _mark()
    if mark[1] is None:
        return None
    time.sleep(seconds)
    return _others_since(mark)[0]


def free_cores(others, cores: int | None = None) -> int:
    """The cores left when other processes use ``others`` cores' worth (at least 1; all when unknown)."""
    cores = available_cores() if cores is None else cores
    if others is None:
        return cores
    taken = int(others + (1.0 - BUSY_THRESHOLD))  # rounds at BUSY_THRESHOLD: 0.5 of a core counts as taken
    return max(1, min(cores, cores - taken))


def set_threads(n: int) -> None:
    """Compute on ``n`` threads: the BLAS library's pool and tinynet's own (:func:`tinynet.backend.set_num_threads`)."""
    from threadpoolctl import threadpool_limits

    from . import backend

    threadpool_limits(limits=n, user_api="blas")
    backend.set_num_threads(n)


def parse_threads(text) -> "int | str":
    """``"auto"`` or a positive int, from a command-line value; ``ValueError`` with a one-line reason otherwise."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected 'auto' or a number of threads, got {text!r}") from None
    if not 1 <= n <= 1024:
        raise ValueError(f"expected 'auto' or a number of threads from 1 to 1024, got {n}")
    return n


class ThreadGovernor:
    """Chooses the thread count at the start of a run and, with ``"auto"``, adapts it while training.

    Parameters
    ----------
    threads : "auto" or int
        ``"auto"``: the free cores, re-measured every ``recheck`` seconds;
        an int: that many threads, always.
    log : callable, optional
        Told (one line) when the count is chosen or changed.
    recheck : float
        Seconds between two looks at the machine while training.
    """

    def __init__(self, threads="auto", log=None, recheck: float = RECHECK_SECONDS, sample: float = SAMPLE_SECONDS):
        self.mode = parse_threads(threads)
        self.log = log or (lambda *a, **k: None)
        self.recheck = float(recheck)
        self.cores = available_cores()
        self.changes = 0  # how often "auto" changed the count after the start
        if self.mode == "auto":
            others = other_processes_cores(sample) if self.cores > 1 else None
            self.threads = free_cores(others, self.cores)
            why = (f"other programs use {others:.1f} of {self.cores} cores" if others is not None
                   else f"{self.cores} cores")
            self.reason = f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} (auto: {why})"
        else:
            self.threads = self.mode
            self.reason = f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} (--threads {self.mode})"
        set_threads(self.threads)
        self._since = _mark()

    def tick(self) -> None:
        """Called after every training step; looks at the machine again every ``recheck`` seconds ("auto")."""
        if self.mode != "auto" or self.cores == 1 or self._since[1] is None:
            return
        if time.perf_counter() - self._since[0] < self.recheck:
            return
        others, self._since = _others_since(self._since)
        if others is None:
            return
        wanted = free_cores(others, self.cores)
        if wanted != self.threads:
            self.log(f"threads: {self.threads} -> {wanted} (other programs used {others:.1f} of {self.cores} "
                     f"cores over the last {self.recheck:.0f} s)")
            self.threads = wanted
            self.changes += 1
            set_threads(wanted)
