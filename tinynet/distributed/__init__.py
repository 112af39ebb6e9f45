"""Data-parallel training over MPI (CPU processes) and NCCL (GPUs), with one API for both.

Every rank (process) started by ``mpiexec -n N python script.py --distributed``
holds a full copy of the model and trains it on its own 1/N of every batch::

    comm = distributed.init()                          # rank, size, from the MPI environment
    net = distributed.convert_sync_batchnorm(net)      # optional: BatchNorm over the global batch
    distributed.broadcast_state(net, comm)             # every rank starts from rank 0's weights
    optimizer = distributed.DistributedOptimizer(optim.SGD(net.parameters(), ...), comm)
    loader = distributed.DistributedLoader.wrap(loader, comm)   # this rank's share of each batch
    distributed.check_same_job(comm, {"its classes": classes, "--lr": lr})   # every rank started for the same job
    fit(net, optimizer, ..., distributed=distributed.FitHooks(comm))

After each backward, :class:`DistributedOptimizer` averages the gradients over
the ranks (one allreduce per bucket of parameters) before the update, so every
rank takes the same step and the copies stay equal: the step of a single
process on the whole batch (exactly so without BatchNorm, or with
:class:`SyncBatchNorm`).  See docs/distributed.md for the design, the
measurements and the scaling projection.

``mpi4py`` is imported only by :func:`init`: tinynet imports without it.
"""
from __future__ import annotations

import os
import sys

from .. import backend
from .communicator import (DEFAULT_TIMEOUT, Communicator, DistributedError, LocalCommunicator, MPICommunicator)
from .data_parallel import DistributedOptimizer, FitHooks, broadcast_state, check_replicas_equal
from .job import check_same_job
from .sampler import DistributedLoader, shard_order
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["init", "world", "Communicator", "LocalCommunicator", "MPICommunicator", "DistributedError",
           "DistributedOptimizer", "FitHooks", "broadcast_state", "check_replicas_equal", "DistributedLoader",
           "shard_order", "SyncBatchNorm", "convert_sync_batchnorm", "install_abort_on_error", "add_arguments",
           "DEFAULT_TIMEOUT", "check_same_job"]

_world: Communicator = LocalCommunicator()


def world() -> Communicator:
    """The communicator :func:`init` made, or a world of one process before (or without) it."""
    return _world


def init(device: str = "cpu", timeout: float | None = None, limit_threads: bool = True) -> Communicator:
    """Join the ranks started by ``mpiexec``; returns the communicator (also :func:`world` from then on).

    Parameters
    ----------
    device : "cpu" (MPI on NumPy arrays) or "cuda" (NCCL on CuPy arrays, one
        GPU per rank: GPU ``local_rank`` of the machine).
    timeout : seconds a collective may wait for the other ranks before the
        job is aborted; default ``TINYNET_DISTRIBUTED_TIMEOUT`` or 600.
    limit_threads : on the CPU, give each rank ``cores / ranks on this machine``
        BLAS threads (unless ``OMP_NUM_THREADS`` is set), and as many tinynet threads
        when several ranks share the machine, so that N ranks do not run N times as many
        threads as there are cores.

    Started without ``mpiexec``, MPI makes a world of one process.  Raises
    :class:`DistributedError` when mpi4py or the MPI library is missing.
    """
    global _world
    if isinstance(_world, MPICommunicator):
        return _world
    if timeout is None:
        timeout = float(os.environ.get("TINYNET_DISTRIBUTED_TIMEOUT", DEFAULT_TIMEOUT))
    device = backend.normalize_device(device)  # "cuda:0" and "gpu" are the GPU too
    comm = MPICommunicator(timeout=timeout, nccl=(device == "cuda"))
    install_abort_on_error(comm)
    if limit_threads and device != "cuda" and "OMP_NUM_THREADS" not in os.environ:
        from threadpoolctl import threadpool_limits

        per_rank = max(1, (os.cpu_count() or 1) // comm.local_size)
        threadpool_limits(per_rank)
        if comm.local_size > 1:  # tinynet's own pool, which runs the fast path's products too
            backend.set_num_threads(per_rank)
    _world = comm
    return comm


def install_abort_on_error(comm: Communicator) -> None:
    """An exception that nobody catches, on any rank, stops every rank: one line, then ``MPI_Abort``.

    Python's default would print the traceback and wait in ``MPI_Finalize``
    for ranks that in turn wait for this one in a collective.  The line names
    the rank and the error; set ``TINYNET_TRACEBACK=1`` to print the traceback
    too.
    """
    previous = sys.excepthook

    def hook(kind, error, traceback):
        if os.environ.get("TINYNET_TRACEBACK") == "1":
            previous(kind, error, traceback)
        comm.abort(f"{comm.name}: {kind.__name__}: {error}; stopping every rank", status=1)

    sys.excepthook = hook


def add_arguments(parser) -> None:
    """Add ``--distributed`` and ``--sync-batchnorm`` to a script's command line."""
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training over the processes started by `mpiexec -n N` (needs mpi4py; "
                             "NCCL on CuPy arrays with --device cuda); --batch-size stays the global batch, "
                             "each rank takes 1/N of it; rank 0 alone logs and writes files")
    parser.add_argument("--sync-batchnorm", action="store_true",
                        help="with --distributed: BatchNorm statistics over the global batch (SyncBatchNorm), "
                             "so that N ranks train exactly as one process would")


def setup(args, usage_error=ValueError) -> Communicator | None:
    """``init(args.device)`` when ``args.distributed``, with errors a user can cause as ``usage_error``.

    Returns None without ``--distributed``.  Checks that the global batch
    divides among the ranks.
    """
    if not getattr(args, "distributed", False):
        if getattr(args, "sync_batchnorm", False):
            raise usage_error("--sync-batchnorm needs --distributed")
        return None
    try:
        comm = init(args.device)
    except DistributedError as error:
        raise usage_error(str(error)) from None
    if args.batch_size % comm.size:
        raise usage_error(f"--batch-size {args.batch_size} (the global batch) does not divide among the "
                          f"{comm.size} ranks; pass a multiple of {comm.size}")
    if getattr(args, "on_nan", "stop") == "skip" and comm.size > 1:
        raise usage_error("--on-nan skip is not supported with --distributed (a batch skipped on one rank would "
                          "leave the others waiting); use --on-nan stop")
    return comm


def prepare(net, optimizer, comm, sync_batchnorm: bool = False):
    """Sync BatchNorm (optional), rank 0's state broadcast, and the gradient-averaging optimizer.

    Returns ``(net, optimizer)``; ``optimizer`` must be built on ``net``'s
    parameters (they are kept by the conversion).
    """
    if sync_batchnorm:
        net = convert_sync_batchnorm(net, comm)
    broadcast_state(net, comm)
    return net, DistributedOptimizer(optimizer, comm, model=net)
