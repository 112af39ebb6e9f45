"""backend.parallel_for: the thread split of the memory-bound passes."""
import threading

import numpy as np
import pytest

from tinynet import backend
from fastpath import fast_path_on  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("fast_path_on")  # tests of the fast path itself (tinynet.nn.fast)


@pytest.fixture
def threads():
    yield backend.set_num_threads
    backend.set_num_threads(None)


@pytest.mark.parametrize("n_threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_pieces_tile_the_range_exactly_once(threads, n_threads, n):
    threads(n_threads)
    seen = np.zeros(n, int)
    lock = threading.Lock()
    pieces = []

    def body(a, b):
        with lock:
            pieces.append((a, b))
            seen[a:b] += 1

    backend.parallel_for(n, body, elements=1 << 30)
    assert (seen == 1).all()
    assert len(pieces) == min(n_threads, n)


def test_small_passes_and_nested_calls_run_on_the_calling_thread(threads):
    threads(2)
    callers = []
    backend.parallel_for(8, lambda a, b: callers.append((threading.get_ident(), a, b)), elements=10)
    assert callers == [(threading.get_ident(), 0, 8)]

    inner = []

    def outer(a, b):
        backend.parallel_for(4, lambda c, d: inner.append((threading.get_ident(), c, d)), elements=1 << 30)

    backend.parallel_for(2, outer, elements=1 << 30)
    assert sorted((c, d) for _, c, d in inner) == [(0, 4), (0, 4)]  # each piece ran its inner loop whole


def test_an_exception_in_any_piece_is_raised_after_all_pieces_ended(threads):
    threads(2)
    done = []

    def body(a, b):
        if a > 0:
            raise ValueError("piece failed")
        done.append((a, b))

    with pytest.raises(ValueError, match="piece failed"):
        backend.parallel_for(10, body, elements=1 << 30)
    assert done == [(0, 5)]


def test_a_split_pass_computes_what_one_pass_computes(threads):
    threads(2)
    x = np.random.default_rng(0).standard_normal((16, 9, 9, 8)).astype(np.float32)
    out = np.empty_like(x)
    backend.parallel_for(16, lambda a, b: np.maximum(x[a:b], 0, out=out[a:b]), elements=1 << 30)
    np.testing.assert_array_equal(out, np.maximum(x, 0))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_refuses_what_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match="positive int"):
        backend.set_num_threads(bad)


def test_a_forked_child_makes_its_own_threads_instead_of_hanging(threads):
    import multiprocessing
    import os

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    threads(2)
    backend.parallel_for(4, lambda a, b: None, elements=1 << 30)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: the inherited pool has no threads; a hang here is caught by the parent
        try:
            out = np.zeros(8)
            backend.parallel_for(8, lambda a, b: out.__setitem__(slice(a, b), 1.0), elements=1 << 30)
            os._exit(0 if out.sum() == 8 else 1)
        except BaseException:
            os._exit(2)
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("parallel_for in a forked child hung")
