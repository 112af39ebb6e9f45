"""Data parallelism: the same model on every rank, gradients averaged after each backward.

With N ranks, rank r computes the gradient ``g_r`` of its own loss ``L_r``
(the mean over its B = G / N images).  The loss of the global batch of G
images is ``L = (1/N) sum_r L_r``, so its gradient is the average::

    dL/dW = (1/N) sum_r g_r

:class:`DistributedOptimizer` replaces every rank's gradients by that average
(an allreduce, then a division by N) before the wrapped optimizer's update:
every rank then applies the same update to the same weights, and the copies
stay equal step after step without ever exchanging the weights themselves.
:func:`broadcast_state` makes them equal at the start.

Buckets.  One allreduce per tensor would pay the collective's latency
(microseconds on one machine, tens of them over a network) 62 times per
ResNet18 step; one allreduce of everything would need a second copy of all
gradients at once.  The parameters are instead packed into flat buffers of at
most ``bucket_bytes`` (25 MiB by default, PyTorch's ``bucket_cap_mb``), in the
reverse of their registration order (the order in which backward produces
them), one allreduce per buffer: ResNet18's 46.8 MB of float32 gradients
travel in two buffers.  Each buffer ends with one flag per parameter (1 where
this rank has a gradient): a parameter that no rank's backward reached keeps
``grad = None`` (the optimizer skips it, as on one process), one that some
ranks reached gets the average with zeros for the others.

Overlap of the allreduces with the backward pass is not implemented: measured
on 2 cores (docs/distributed.md), an allreduce of ResNet18's gradients takes
about 3 % of a step, and MPI makes progress on a non-blocking collective only
inside MPI calls, or on a progress thread that slowed the computation by as
much as it would hide.
"""
from __future__ import annotations

import time

import numpy as np

from .. import backend

__all__ = ["DistributedOptimizer", "broadcast_state", "check_replicas_equal", "FitHooks", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20


class _Bucket:
    """Parameters of one dtype and device, and the flat buffer their gradients travel in.

    ``buffer`` (owned by the bucket, overwritten at every step) holds
    ``numel`` gradient values, then one has-a-gradient flag per parameter.
    """

    def __init__(self, params):
        self.params = params
        self.offsets = np.cumsum([0] + [p.size for p in params]).tolist()
        self.numel = self.offsets[-1]
        xp = backend.get_array_module(params[0].data)
        self.buffer = xp.empty(self.numel + len(params), dtype=params[0].dtype)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


def _make_buckets(params, bucket_bytes: int) -> list:
    """Group ``params`` (in order) into buckets of one dtype and device, each at most ``bucket_bytes``
    (a larger parameter gets a bucket of its own)."""
    open_buckets, done = {}, []
    for p in params:
        key = (np.dtype(p.dtype).str, backend.device_of(p.data))
        group = open_buckets.setdefault(key, [])
        if group and (sum(q.data.nbytes for q in group) + p.data.nbytes) > bucket_bytes:
            done.append(_Bucket(group))
            group = open_buckets[key] = []
        group.append(p)
    done.extend(_Bucket(group) for group in open_buckets.values() if group)
    return done


class DistributedOptimizer:
    """Wraps an optimizer: ``step()`` first averages every gradient over the ranks, then updates.

    Everything else (``zero_grad``, ``param_groups``, ``state``, ``state_dict``,
    ``load_state_dict``) is the wrapped optimizer's, so schedulers and
    checkpoints see no difference.  Every rank must call ``step()`` the same
    number of times.

    Parameters
    ----------
    optimizer : a tinynet optimizer.
    comm : a communicator (:func:`tinynet.distributed.init`).
    bucket_bytes : the most bytes of gradients one allreduce carries.
    model : optional; its buffers (BatchNorm's running statistics) become rank
        0's after every step, as with PyTorch DDP's ``broadcast_buffers``.
        With plain BatchNorm each rank's statistics come from its own images
        and would drift apart (SyncBatchNorm's are equal already), so that the
        ranks would validate slightly different models.

    Attributes
    ----------
    comm_seconds : time spent in the allreduces so far (for measurements; on
        the GPU, the time to enqueue them).
    """

    def __init__(self, optimizer, comm, bucket_bytes: int = DEFAULT_BUCKET_BYTES, model=None):
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("DistributedOptimizer: the optimizer is already wrapped")
        if bucket_bytes < 1:
            raise ValueError(f"DistributedOptimizer: bucket_bytes must be positive, got {bucket_bytes}")
        self.optimizer, self.comm, self.bucket_bytes = optimizer, comm, int(bucket_bytes)
        self.comm_seconds, self.allreduces = 0.0, 0
        self._buckets = None
        self.model = model

    def __getattr__(self, name):  # only reached for names this class does not define
        return getattr(self.__dict__["optimizer"], name)

    def buckets(self) -> list:
        """The buckets, built on first use (after ``.to(device)``) from the optimizer's parameters, reversed."""
        if self._buckets is None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            self._buckets = _make_buckets(params[::-1], self.bucket_bytes)
        return self._buckets

    def synchronize(self) -> None:
        """Replace every rank's gradients by their average over the ranks (one allreduce per bucket)."""
        if self.comm.size == 1:
            return
        scale = 1.0 / self.comm.size
        for bucket in self.buckets():
            buf, n = bucket.buffer, bucket.numel
            for i, p in enumerate(bucket.params):
                lo, hi = bucket.offsets[i], bucket.offsets[i + 1]
                if p.grad is None:
                    buf[lo:hi] = 0
                    buf[n + i] = 0
                else:
                    buf[lo:hi].reshape(p.shape)[...] = p.grad
                    buf[n + i] = 1
            started = time.perf_counter()
            self.comm.allreduce_(buf)
            self.comm_seconds += time.perf_counter() - started
            self.allreduces += 1
            reached = backend.to_numpy(buf[n:]) > 0  # one small read-back per bucket
            for i, p in enumerate(bucket.params):
                lo, hi = bucket.offsets[i], bucket.offsets[i + 1]
                # A fresh array: the bucket's buffer is overwritten at the next step.
                p.grad = buf[lo:hi].reshape(p.shape) * scale if reached[i] else None

    def step(self) -> None:
        self.synchronize()
        self.optimizer.step()
        if self.model is not None and self.comm.size > 1:
            _broadcast_arrays(list(self.model.named_buffers()), self.comm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def __repr__(self):
        return f"DistributedOptimizer({self.optimizer!r}, {self.comm!r})"


def _state_arrays(model):
    """The model's parameters and buffers as ``(key, array)``, arrays owned by the model."""
    return list(model.state_dict().items())


def _packed(arrays):
    """Group ``(key, array)`` by dtype and device: ``[(flat buffer, [(key, array, lo, hi)])]``, values copied in."""
    groups = {}
    for key, a in arrays:
        groups.setdefault((np.dtype(a.dtype).str, backend.device_of(a)), []).append((key, a))
    out = []
    for members in groups.values():
        xp = backend.get_array_module(members[0][1])
        sizes = np.cumsum([0] + [int(a.size) for _, a in members]).tolist()
        buf = xp.empty(sizes[-1], dtype=members[0][1].dtype)
        placed = []
        for (key, a), lo, hi in zip(members, sizes[:-1], sizes[1:]):
            buf[lo:hi] = a.reshape(-1)
            placed.append((key, a, lo, hi))
        out.append((buf, placed))
    return out


def broadcast_state(model, comm, root: int = 0) -> None:
    """Copy rank ``root``'s parameters and buffers into every rank's ``model`` (one broadcast per dtype).

    Seeding every rank alike builds equal weights too; the broadcast makes it
    certain (a rank that drew one random number more would otherwise train a
    different model, silently).
    """
    if comm.size > 1:
        _broadcast_arrays(_state_arrays(model), comm, root)


def _broadcast_arrays(arrays, comm, root: int = 0) -> None:
    """Rank ``root``'s values into every rank's ``(key, array)`` arrays, in place (one broadcast per dtype)."""
    for buf, placed in _packed(arrays):
        comm.broadcast_(buf, root)
        for key, a, lo, hi in placed:
            a[...] = buf[lo:hi].reshape(a.shape)


def check_replicas_equal(model, comm) -> float:
    """The largest absolute difference between any rank's parameters and buffers and rank 0's (0.0: equal)."""
    worst = 0.0
    for buf, _ in _packed(_state_arrays(model)):
        mine = buf.copy()
        comm.broadcast_(buf, 0)
        xp = backend.get_array_module(buf)
        diff = float(xp.abs(mine.astype(np.float64) - buf.astype(np.float64)).max()) if buf.size else 0.0
        worst = max(worst, diff)
    return float(comm.allgather(np.array([worst])).max())


class FitHooks:
    """What :func:`tinynet.train.fit` asks of a data-parallel run (its ``distributed`` argument).

    * ``is_main``: rank 0 writes the checkpoints;
    * ``reduce_epoch(totals, val)``: the epoch's training sums and the
      validation results of every rank's shard, summed over the ranks;
    * ``agree(value)``: rank 0's value of a decision taken from a clock (the
      time budget), so that every rank stops after the same epoch.
    """

    def __init__(self, comm):
        self.comm = comm

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

    def agree(self, value):
        return self.comm.agree(value)

    def reduce_epoch(self, totals, val):
        """``(totals summed over ranks, val over every rank's shard)``.

        ``totals``: numbers (sums and counts; ints stay ints).  ``val``: the
        dict of :func:`tinynet.train.evaluate` on this rank's shard, or None
        (on every rank alike); the result has the global ``loss``,
        ``accuracy`` and ``top5_accuracy`` (no predictions: those stay on
        their ranks).
        """
        numbers = [float(t) for t in totals]
        if val is not None:
            count = len(val["labels"])
            correct = int((val["predictions"] == val["labels"]).sum())
            loss_sum = val["loss"] * count if val["loss"] is not None else 0.0
            top5 = round(val["top5_accuracy"] * count) if val["top5_accuracy"] is not None else 0
            numbers += [loss_sum, correct, top5, count]
        sums = self.comm.sum_numbers(numbers)
        reduced = tuple(type(t)(s) if isinstance(t, (int, np.integer)) else s for t, s in zip(totals, sums))
        if val is None:
            return reduced, None
        loss_sum, correct, top5, count = sums[len(totals):]
        return reduced, {"loss": loss_sum / count if val["loss"] is not None else None,
                         "accuracy": correct / count,
                         "top5_accuracy": top5 / count if val["top5_accuracy"] is not None else None}
