"""``cupy.cuda`` of the stand-in: N fake devices, streams and events, a memory pool that reports the
stand-in's live bytes, and ``nccl`` collectives run over MPI (one process per rank).

Every operation of the stand-in is done when it returns, except the NCCL collectives: as on a GPU, a
call only queues its collective and returns at once.  The queue runs (an MPI call that waits for the
other ranks) at the host's next synchronisation (``synchronize()``, ``done``, a read-back) or before
the next operation of the stand-in (which a GPU would run after it, on the same stream).  So a rank
that skipped a collective leaves the others waiting where they would wait on GPUs.

Every ``synchronize()``, and every ``done`` asked by the main thread, is counted as a host-device
synchronisation in ``cupy_standin.stats`` (asked by another thread, as tinynet's collective watchdog
does, ``done`` only reads whether the queue has run so far, and waits for nothing).
"""
from __future__ import annotations

import ctypes
import os
import threading
import types

import numpy

_current = [0]


def _count():
    return int(os.environ.get("TINYNET_CUPY_STANDIN_DEVICES", "1"))


def is_available():
    return _count() > 0


def _sync(kind):
    from . import _sync as sync
    sync(kind)


class CUDARuntimeError(RuntimeError):
    pass


def _check(device):
    if not 0 <= int(device) < _count():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return int(device)


def _get_device_properties(device):
    _check(device)
    return {"name": b"CuPy stand-in (no GPU)", "totalGlobalMem": 80 << 30, "major": 9, "minor": 0,
            "multiProcessorCount": 1}


runtime = types.ModuleType("cupy.cuda.runtime")
runtime.CUDARuntimeError = CUDARuntimeError
runtime.getDeviceCount = _count
runtime.getDevice = lambda: _current[0]
runtime.setDevice = lambda d: _current.__setitem__(0, _check(d))
runtime.getDeviceProperties = _get_device_properties
runtime.driverGetVersion = lambda: 13000  # CUDA 13.0, as cupy-cuda13x 14.2 with driver 580
runtime.runtimeGetVersion = lambda: 13000
runtime.deviceSynchronize = lambda: _sync("deviceSynchronize")
runtime.memGetInfo = lambda: (80 << 30, 80 << 30)
runtime.is_hip = False


class Device:
    def __init__(self, device=None):
        self.id = _current[0] if device is None else _check(device)
        self._previous = []

    def use(self):
        _current[0] = self.id

    def __enter__(self):
        self._previous.append(_current[0])
        self.use()
        return self

    def __exit__(self, *exc):
        _current[0] = self._previous.pop()

    def synchronize(self):
        _sync("Device.synchronize")

    compute_capability = property(lambda self: "90")
    mem_info = property(lambda self: runtime.memGetInfo())

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


def get_device_id():
    return _current[0]


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.ptr = 0 if null else id(self)
        self._previous = []

    def synchronize(self):
        _sync("Stream.synchronize")

    def query(self):
        return self.done

    def use(self):
        _streams[0] = self
        return self

    def __enter__(self):
        self._previous.append(_streams[0])
        return self.use()

    def __exit__(self, *exc):
        _streams[0] = self._previous.pop()

    @property
    def done(self):
        """Whether the stream has run all it was given (cudaStreamQuery; see :class:`Event`)."""
        if _on_main_thread():
            _sync("Stream.done")
        return _counts["run"] >= _counts["queued"]

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass


Stream.null = Stream(null=True)
_streams = [Stream.null]


def get_current_stream(device_id=None):
    return _streams[0]


def _on_main_thread():
    return threading.current_thread() is threading.main_thread()


class Event:
    """Marks a place in the stream: done once the collectives queued before it have run.

    Asked by the main thread, ``done`` runs the queue first (the host meets the GPU there); asked by
    another thread, it only reads how far the queue has run, as ``cudaEventQuery`` would.
    """

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.ptr = id(self)
        self._position = 0

    def record(self, stream=None):
        self._position = _counts["queued"]

    def synchronize(self):
        _sync("Event.synchronize")

    @property
    def done(self):
        if _on_main_thread():
            _sync("Event.done")
        return _counts["run"] >= self._position


def get_elapsed_time(start, end):
    return 0.0


class MemoryPool:
    def used_bytes(self):
        from . import stats
        return stats.live_bytes

    total_bytes = used_bytes

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        pass

    def get_limit(self):
        return 0


class PinnedMemoryPool:
    def free_all_blocks(self):
        pass

    def n_free_blocks(self):
        return 0


_pool = MemoryPool()


def get_default_memory_pool():
    return _pool


def set_allocator(allocator=None):
    pass


def set_pinned_memory_allocator(allocator=None):
    pass


# ---------------------------------------------------------------------------------------------
# NCCL over MPI.  Buffers are given as pointers (``array.data.ptr``), as to real NCCL; the stand-in's
# "device memory" is host memory, so a pointer is read and written through ctypes.  A collective is
# queued (its send buffer read at once: every operation before it is done) and run by :func:`flush`.
# ---------------------------------------------------------------------------------------------
nccl = types.ModuleType("cupy.cuda.nccl")
nccl.available = True
_NCCL_DTYPES = {0: numpy.int8, 1: numpy.uint8, 2: numpy.int32, 3: numpy.uint32, 4: numpy.int64, 5: numpy.uint64,
                6: numpy.float16, 7: numpy.float32, 8: numpy.float64}
for _code, _name in ((0, "NCCL_INT8"), (1, "NCCL_UINT8"), (2, "NCCL_INT32"), (3, "NCCL_UINT32"), (4, "NCCL_INT64"),
                     (5, "NCCL_UINT64"), (6, "NCCL_FLOAT16"), (7, "NCCL_FLOAT32"), (8, "NCCL_FLOAT64")):
    setattr(nccl, _name, _code)
nccl.NCCL_SUM, nccl.NCCL_PROD, nccl.NCCL_MAX, nccl.NCCL_MIN, nccl.NCCL_AVG = 0, 1, 2, 3, 4


class NcclError(RuntimeError):
    pass


nccl.NcclError = NcclError

#: Collectives queued and not yet run: (callable, the buffers it writes, kept alive until it has run).
_queued: list = []
#: How many collectives were queued, and how many have run, since the process started (for events).
_counts = {"queued": 0, "run": 0}


def flush():
    """Run the queued collectives, in order (each waits for the other ranks, as the GPU would)."""
    while _queued:
        run, _keep = _queued.pop(0)
        run()
        _counts["run"] += 1


def _buffer(ptr, count, datatype):
    dtype = numpy.dtype(_NCCL_DTYPES[datatype])
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return numpy.frombuffer(raw, dtype=dtype, count=count)


def _owner(ptr):
    """The buffer behind ``ptr`` (registered when ``array.data`` was read), so that it outlives the queue."""
    from . import _pointers
    return _pointers.get(ptr)


def get_unique_id():
    return tuple(int(b) for b in os.urandom(16))


class NcclCommunicator:
    """A communicator of ``ndev`` ranks over MPI_COMM_WORLD (each rank one process, on its current device).

    Its collectives travel on a duplicate of MPI_COMM_WORLD, as NCCL's own channels are apart from
    MPI's: a rank in an MPI collective never completes another rank's NCCL collective.
    """

    def __init__(self, ndev, commId, rank):
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        if world.Get_size() != ndev or world.Get_rank() != rank:
            raise NcclError(f"NCCL stand-in: rank {rank} of {ndev} must be MPI rank {world.Get_rank()} of "
                            f"{world.Get_size()}")
        self._ndev, self._rank, self.device_id = ndev, rank, _current[0]
        devices = world.allgather((os.uname().nodename, self.device_id))
        if len(set(devices)) != len(devices):
            raise NcclError("ncclInvalidUsage: two ranks on one GPU (NCCL needs one device per rank)")
        self._mpi = world.Dup()

    def _op(self, op):
        from mpi4py import MPI
        return {0: MPI.SUM, 1: MPI.PROD, 2: MPI.MAX, 3: MPI.MIN}[op]

    def _queue(self, name, run, *pointers):
        from . import _record
        _record(f"nccl.{name}", (), {}, flush=False)
        _queued.append((run, [_owner(p) for p in pointers]))
        _counts["queued"] += 1

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        send, op = _buffer(sendbuf, count, datatype).copy(), self._op(op)
        self._queue("allReduce", lambda: self._mpi.Allreduce(send, _buffer(recvbuf, count, datatype), op=op),
                    recvbuf)

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):
        send = _buffer(sendbuf, count, datatype).copy()
        self._queue("allGather", lambda: self._mpi.Allgather(send, _buffer(recvbuf, count * self._ndev, datatype)),
                    recvbuf)

    def bcast(self, buff, count, datatype, root, stream):
        self._queue("bcast", lambda: self._mpi.Bcast(_buffer(buff, count, datatype), root=root), buff)

    def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream):
        if sendbuf != recvbuf and self._rank == root:
            _buffer(recvbuf, count, datatype)[...] = _buffer(sendbuf, count, datatype)
        self.bcast(recvbuf, count, datatype, root, stream)

    def rank_id(self):
        return self._rank

    def size(self):
        return self._ndev

    def device_id_(self):
        return self.device_id

    def destroy(self):
        pass

    def abort(self):
        _counts["run"] += len(_queued)
        _queued.clear()


nccl.get_unique_id = get_unique_id
nccl.NcclCommunicator = NcclCommunicator
nccl.get_version = lambda: 22000
