"""The CuPy stand-in is as strict as CuPy 14 where tinynet could go wrong, and counts what it promises.

These test the stand-in itself (tests/cupy_standin), so they run on it everywhere, a GPU machine included;
each refusal here is also in the conformance replay's file (tests/cupy_standin/recorded_calls.json), which
checks on a real GPU that CuPy refuses it too (benchmarks/conformance_replay.py).
"""
import pathlib
import sys

import numpy as np
import pytest

import cupy_standin as cp
from tinynet import backend

pytestmark = [pytest.mark.gpu]
HERE = pathlib.Path(__file__).name


def line_of(marker: str) -> int:
    """The line of this file that holds ``marker`` (a comment at the end of the line that synchronises)."""
    lines = pathlib.Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}"))


def test_a_cupy_array_never_becomes_a_numpy_array_implicitly():
    a = cp.ones(3, dtype=cp.float32)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array([a])
    np.testing.assert_array_equal(a.get(), np.ones(3, np.float32))  # the explicit way


def test_numpy_functions_without_a_cupy_twin_refuse_cupy_arrays():
    a = cp.arange(4, dtype=cp.float32)
    with pytest.raises(TypeError):
        np.insert(a, 0, 1.0)  # CuPy 14 has no cupy.insert
    assert isinstance(np.concatenate([a, a]), cp.ndarray)  # one with a twin runs on the device


def test_ufuncs_and_operators_refuse_numpy_arrays_and_lists():
    a = cp.ones(3, dtype=cp.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.add(a, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.add(a, [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.maximum(a, [0.0, 0.0, 0.0])
    assert isinstance(a * 2.0, cp.ndarray) and (a * 2.0).dtype == np.float32  # a Python scalar is fine


def test_assigning_a_numpy_array_into_a_slice_raises():
    """CuPy sends a basic-slice assignment of a non-CuPy value to ``fill``, which refuses NumPy arrays."""
    a = cp.zeros((2, 3), dtype=cp.float32)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        a[0, 1:] = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        a[...] = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        a.fill(np.ones(3, np.float32))
    a[0, 1:] = cp.asarray(np.ones(2, np.float32))  # the explicit transfer first
    a[1] = 2.0
    a[1, 0] = np.float32(3.0)  # a NumPy scalar (or 0-d array) is a scalar
    assert a.get().tolist() == [[0, 1, 1], [3, 2, 2]]
    a[cp.asarray(np.array([0]))] = np.full((1, 3), 5.0, np.float32)  # array indices: CuPy copies it over, silently
    assert a.get().tolist() == [[5, 5, 5], [3, 2, 2]]


def test_reductions_and_integer_indexing_return_0d_arrays():
    a = cp.arange(6, dtype=cp.float32).reshape(2, 3)
    for value in (a.sum(), cp.sum(a), a.max(), cp.mean(a), a[1, 2], a.argmax()):
        assert isinstance(value, cp.ndarray) and value.ndim == 0, type(value)
    assert isinstance(a.sum(axis=0), cp.ndarray) and a.sum(axis=0).shape == (3,)


def test_a_keyword_numpy_accepts_and_cupy_does_not_is_rejected():
    a = cp.ones((2, 3), dtype=cp.float32)
    np.ones(3).sum(initial=0.0)  # NumPy takes these keywords...
    np.sum(np.ones(3), where=np.ones(3, bool))
    with pytest.raises(TypeError, match="in CuPy 14"):  # ...CuPy 14's signatures do not
        a.sum(initial=0.0)
    with pytest.raises(TypeError, match="in CuPy 14"):
        cp.sum(a, where=cp.ones((2, 3), dtype=bool))
    with pytest.raises(AttributeError, match="not in CuPy 14.2"):
        cp.insert  # a NumPy name CuPy does not export  # noqa: B018


def test_the_sync_counter_counts_each_read_back_with_its_file_and_line(monkeypatch):
    a = cp.arange(4, dtype=cp.float32)
    cp.stats.reset()
    float(a[1])  # sync: float
    int(a[2])  # sync: int
    a[3].item()  # sync: item
    a.get()  # sync: get
    bool(a[1] > 0)  # sync: bool
    kinds = [kind for kind, _ in cp.stats.syncs]
    assert kinds == ["float", "int", "item", "get", "bool"], cp.stats.syncs
    for (kind, where), marker in zip(cp.stats.syncs, [f"sync: {k}" for k in kinds]):
        assert where.endswith(f"{HERE}:{line_of(marker)}"), (kind, where)
    cp.stats.reset()
    monkeypatch.setattr(backend, "_cupy", cp)
    backend.to_numpy(a)  # inside tinynet: the site named is tinynet's own line
    (kind, where), = cp.stats.syncs
    assert kind == "get" and where.startswith("tinynet/backend.py:"), cp.stats.syncs


def test_a_nccl_collective_is_queued_and_runs_at_the_next_synchronisation():
    """As on a GPU, the call returns at once; the host meets the wait at its next sync (or the next op)."""
    import threading

    pytest.importorskip("mpi4py")
    nccl, stream = cp.cuda.nccl, cp.cuda.get_current_stream()
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    a = cp.arange(4, dtype=cp.float32)
    comm.allReduce(a.data.ptr, a.data.ptr, a.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
    event = stream.record(cp.cuda.Event(disable_timing=True))
    assert len(cp.cuda._queued) == 1  # queued, not run
    seen = []
    watcher = threading.Thread(target=lambda: seen.append(event.done))  # as tinynet's watchdog asks
    watcher.start()
    watcher.join()
    assert seen == [False] and len(cp.cuda._queued) == 1  # another thread's query waits for nothing
    cp.stats.reset()
    assert event.done  # the main thread's query meets the GPU: the queue runs (a synchronisation)
    assert cp.cuda._queued == [] and [kind for kind, _ in cp.stats.syncs] == ["Event.done"]
    comm.bcast(a.data.ptr, a.size, nccl.NCCL_FLOAT32, 0, stream.ptr)
    b = a * 2  # any later operation runs after it, as on the stream
    assert cp.cuda._queued == [] and b.get().tolist() == [0, 2, 4, 6]


def test_the_stand_in_says_what_it_cannot_see():
    doc = sys.modules["cupy_standin"].__doc__
    for blind_spot in ("compile errors", "CUDA numerics", "streams", "memory pool", "speed"):
        assert blind_spot in doc
