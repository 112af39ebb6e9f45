"""Communicators: the handful of collectives data-parallel training needs, over MPI or NCCL.

A communicator joins ``size`` processes (*ranks*, numbered ``0 .. size-1``)
that each run the same script, started by ``mpiexec -n N``.  Training needs
four collectives, each called by every rank in the same order:

* ``allreduce_(buf)``: every rank's ``buf`` becomes the element-wise sum over
  ranks (in place);
* ``allgather(a)``: a ``(size, *a.shape)`` array of every rank's ``a``;
* ``broadcast_(buf, root)``: every rank's ``buf`` becomes ``root``'s;
* ``sum_numbers(values)``: the sums of a few Python numbers (metrics), on the host.

:class:`MPICommunicator` runs them with mpi4py on NumPy buffers (CPU
training); with ``nccl=True`` CuPy arrays go through NCCL
(``cupy.cuda.nccl``, reached through :func:`tinynet.backend.cuda_collectives`)
on the current CUDA stream, while MPI still carries the host numbers and the
bootstrap (NCCL's unique id is broadcast over MPI).  :class:`LocalCommunicator`
is the world of one process: every collective is the identity, so code
written for data parallelism runs unchanged without MPI.

Faults.  A collective waits for every rank, so a rank that died, hangs or
raised would leave the others waiting forever.  Three guards bound that:

* an exception nobody catches, on any rank, prints one line and calls
  ``MPI_Abort``, which makes ``mpiexec`` stop every rank
  (:func:`install_abort_on_error`); a rank that ends with a non-zero exit
  status does the same through :meth:`MPICommunicator.finish`;
* a rank killed by a signal is seen by ``mpiexec`` itself, which stops the
  others;
* a watchdog thread aborts the job when one collective has waited longer than
  ``timeout`` seconds (a rank stuck in a loop, or one that skipped a
  collective): MPI's blocking collectives have no timeout of their own.

On GPUs the watched window does not end when the call returns.  An NCCL call
only queues the collective on the CUDA stream and returns at once; the wait for
the other ranks happens on the GPU, and the host meets it at its next
read-back, where nothing would watch it.  So each collective on CuPy arrays
records a CUDA event on the stream after it, and the watchdog thread polls the
event (``cudaEventQuery``, which never blocks) until the GPU has run the
collective: past the timeout, it aborts the job as for MPI.  The main thread
never waits for it, so the GPU's queue stays full (PyTorch's NCCL watchdog
works the same way); CuPy releases the GIL while the main thread waits in a
read-back, so the watchdog runs meanwhile.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time

import numpy as np

from .. import backend

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "DistributedError", "DEFAULT_TIMEOUT"]

#: Seconds a collective may wait for the other ranks before the job is aborted.  A training
#: step's collectives wait at most for the slowest rank's step; checkpoints and validation add
#: seconds.  ``TINYNET_DISTRIBUTED_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """Distributed training cannot start (no mpi4py, no MPI library, a bad setting)."""


class Communicator:
    """The interface every communicator offers (see the module docstring)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank among the processes of this machine (which GPU to use)
    local_size: int = 1

    @property
    def name(self) -> str:
        """``rank R of N``, for messages."""
        return f"rank {self.rank} of {self.size}"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes files."""
        return self.rank == 0

    def allreduce_(self, buf, timeout=None):
        raise NotImplementedError

    def allgather(self, a, timeout=None):
        raise NotImplementedError

    def broadcast_(self, buf, root: int = 0, timeout=None):
        raise NotImplementedError

    def sum_numbers(self, values, timeout=None) -> list:
        """The sums over ranks of a few numbers, as float64 (exact for counts below 2**53)."""
        buf = np.asarray(values, dtype=np.float64).copy()
        return self.allreduce_(buf, timeout=timeout).tolist()

    def agree(self, value, root: int = 0):
        """Rank ``root``'s ``value`` (a number, or a tuple of numbers) on every rank.

        For decisions that must be the same everywhere but are taken from a
        clock (a time budget): each rank would otherwise decide from its own.
        """
        buf = np.atleast_1d(np.asarray(value, dtype=np.float64)).copy()
        self.broadcast_(buf, root)
        if isinstance(value, (tuple, list)):
            return tuple(type(v)(b) for v, b in zip(value, buf.tolist()))
        return type(value)(buf[0])

    def barrier(self, timeout=None) -> None:
        self.sum_numbers([0.0], timeout=timeout)

    def abort(self, message: str, status: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(status)

    def finish(self, status: int) -> int:
        """Call at the end of the program with its exit status; returns it (see :class:`MPICommunicator`)."""
        return status

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalCommunicator(Communicator):
    """A world of one process: every collective leaves its argument as it is."""

    def allreduce_(self, buf, timeout=None):
        return buf

    def allgather(self, a, timeout=None):
        xp = backend.get_array_module(a)
        return xp.asarray(a)[None]

    def broadcast_(self, buf, root: int = 0, timeout=None):
        if root != 0:
            raise ValueError(f"broadcast_: root {root} does not exist in a world of one process")
        return buf


def _mpi():
    """mpi4py's ``MPI`` module, imported on first use (tinynet imports without it)."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise DistributedError(
            f"distributed training needs mpi4py and an MPI library, which could not be imported ({error}); "
            f"install them with `pip install -e \".[mpi]\"` in the tinynet checkout (mpi4py and the mpich wheel, "
            f"which brings mpiexec), "
            f"then start N processes with `mpiexec -n N python SCRIPT --distributed ...`") from None
    return MPI


class _Watchdog:
    """Aborts the job when one collective has waited longer than its timeout.

    The main thread marks the start and end of each call (:meth:`enter`,
    :meth:`leave`), and hands over each collective it queued on a GPU with a
    ``done()`` that says whether the GPU has run it (:meth:`queued`); a daemon
    thread looks once per ``tick`` seconds.  MPI is initialised with
    ``MPI_THREAD_MULTIPLE`` (mpi4py's default), so the watchdog may call
    ``MPI_Abort`` while the main thread is inside a collective.
    """

    def __init__(self, comm, tick: float = 0.25):
        self.comm, self.tick = comm, tick
        self.what, self.deadline, self.began = None, None, None
        #: (what, began, deadline, done) of the collectives queued on the GPU and not yet seen done, oldest
        #: first: the GPU runs them in that order.  Appended by the main thread, emptied by the watchdog's.
        self.on_gpu = collections.deque()
        self.thread = threading.Thread(target=self._watch, name="tinynet-collective-watchdog", daemon=True)
        self.thread.start()

    def enter(self, what: str, timeout: float | None) -> None:
        self.what, self.began = what, time.monotonic()
        self.deadline = None if timeout is None else self.began + timeout

    def leave(self) -> None:
        self.deadline = None

    def queued(self, done) -> None:
        """The collective of the window now watched was only queued on the GPU: keep watching it, under
        the same name and deadline, after :meth:`leave`, until ``done()`` (a CUDA event's query) is true."""
        if self.deadline is not None:
            self.on_gpu.append((self.what, self.began, self.deadline, done))

    def _watch(self):
        while True:
            time.sleep(self.tick)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                self._abort(self.what, self.began, deadline)
            while self.on_gpu and self._done(self.on_gpu[0][3]):
                self.on_gpu.popleft()
            if self.on_gpu and time.monotonic() > self.on_gpu[0][2]:
                what, began, deadline, _ = self.on_gpu[0]
                self._abort(what, began, deadline)

    @staticmethod
    def _done(done) -> bool:
        try:
            return bool(done())
        except Exception:  # a CUDA error: the main thread meets it at its next call; keep watching the rest
            return True

    def _abort(self, what, began, deadline):
        self.comm.abort(f"{self.comm.name}: {what} waited {time.monotonic() - began:.0f} s for the other ranks "
                        f"(timeout {deadline - began:g} s): a rank hangs, died or skipped a collective; stopping "
                        f"every rank", status=3)


class MPICommunicator(Communicator):
    """Collectives over ``MPI_COMM_WORLD`` (NumPy buffers), and over NCCL for CuPy arrays with ``nccl=True``.

    Parameters
    ----------
    timeout : seconds one collective may wait before the job is aborted
        (None: wait forever).
    nccl : build an NCCL communicator too, one GPU per rank (GPU ``local_rank``
        of its machine), for the collectives on CuPy arrays.
    """

    def __init__(self, timeout: float | None = DEFAULT_TIMEOUT, nccl: bool = False):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.timeout = timeout
        self._watchdog = _Watchdog(self)
        self._nccl = self._nccl_communicator() if nccl else None

    # -- NCCL ------------------------------------------------------------------------
    def _nccl_communicator(self):
        cuda = backend.cuda_collectives()
        if self.local_rank >= cuda.device_count():
            raise DistributedError(f"{self.name}: {self.local_size} ranks on this machine but only "
                                   f"{cuda.device_count()} GPU(s); NCCL needs one GPU per rank")
        cuda.use_device(self.local_rank)
        uid = cuda.nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self._cuda = cuda
        return cuda.nccl.NcclCommunicator(self.size, uid, self.rank)

    def _watch_on_gpu(self):
        """Keep the NCCL call just queued on the current stream watched until the GPU has run it.

        The call returned at once; the wait for the other ranks happens on the GPU.  A CUDA event
        recorded after it tells the watchdog thread when it is done (see the module docstring).
        """
        if self.size > 1:  # a world of one has nobody to wait for
            event = self._cuda.record_event()
            self._watchdog.queued(lambda: event.done)

    def _nccl_dtype(self, dtype):
        nccl = self._cuda.nccl
        table = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                 np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int64): nccl.NCCL_INT64,
                 np.dtype(np.int32): nccl.NCCL_INT32}
        try:
            return table[np.dtype(dtype)]
        except KeyError:
            raise TypeError(f"{self.name}: NCCL collectives on {dtype} arrays are not supported") from None

    def _on_gpu(self, buf) -> bool:
        if not backend.is_cupy_array(buf):
            return False
        if self._nccl is None:
            raise DistributedError(f"{self.name}: a collective on a CuPy array needs the NCCL communicator; "
                                   f"initialise with tinynet.distributed.init(device='cuda')")
        if not buf.flags.c_contiguous:
            raise ValueError(f"{self.name}: NCCL collectives need C-contiguous arrays, got strides {buf.strides}")
        return True

    # -- collectives -----------------------------------------------------------------
    def _timed(self, what, timeout):
        self._watchdog.enter(what, self.timeout if timeout is None else timeout)

    def allreduce_(self, buf, timeout=None):
        self._timed(f"allreduce of {buf.size} values", timeout)
        try:
            if self._on_gpu(buf):
                self._nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._nccl_dtype(buf.dtype),
                                     self._cuda.nccl.NCCL_SUM, self._cuda.stream_pointer())
                self._watch_on_gpu()  # NCCL only queued it
            else:
                self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        finally:
            self._watchdog.leave()
        return buf

    def allgather(self, a, timeout=None):
        xp = backend.get_array_module(a)
        a = xp.ascontiguousarray(a)
        out = xp.empty((self.size,) + a.shape, dtype=a.dtype)
        self._timed(f"allgather of {a.size} values", timeout)
        try:
            if self._on_gpu(a):
                self._nccl.allGather(a.data.ptr, out.data.ptr, a.size, self._nccl_dtype(a.dtype),
                                     self._cuda.stream_pointer())
                self._watch_on_gpu()
            else:
                self.comm.Allgather(a, out)
        finally:
            self._watchdog.leave()
        return out

    def broadcast_(self, buf, root: int = 0, timeout=None):
        self._timed(f"broadcast of {buf.size} values", timeout)
        try:
            if self._on_gpu(buf):
                self._nccl.bcast(buf.data.ptr, buf.size, self._nccl_dtype(buf.dtype), root,
                                 self._cuda.stream_pointer())
                self._watch_on_gpu()
            else:
                self.comm.Bcast(buf, root=root)
        finally:
            self._watchdog.leave()
        return buf

    def barrier(self, timeout=None) -> None:
        self._timed("barrier", timeout)
        try:
            self.comm.Barrier()
        finally:
            self._watchdog.leave()

    # -- faults ----------------------------------------------------------------------
    def abort(self, message: str, status: int = 1) -> None:
        """Print ``message`` (one line) and stop every rank of the job with exit status ``status``."""
        os.write(2, (message.replace("\n", " ") + "\n").encode(errors="backslashreplace"))
        time.sleep(0.2)  # let mpiexec forward the line before it tears the job down
        self.comm.Abort(status)

    def finish(self, status: int) -> int:
        """End of the program: a non-zero ``status`` on any one rank stops them all.

        A rank that returns an error (a bad option, a NaN loss) while the
        others are inside a collective would leave them waiting; ``mpiexec``
        only notices ranks that die.  The error itself was already printed.
        Ctrl-C (130) reaches every rank: the others then leave quietly, and
        rank 0 aborts only after it has saved the checkpoint.
        """
        if status and self.size > 1 and not (status == 130 and not self.is_main):  # alone: nobody waits
            self.abort(f"{self.name}: exiting with status {status}; stopping every rank", status)
        return status
