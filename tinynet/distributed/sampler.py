"""Each rank's share of every epoch: the same shuffled order on every rank, cut into disjoint pieces.

Every rank draws the epoch's order from the same generator, seeded by
``(seed, epoch)`` (:class:`tinynet.data.DataLoader`'s own), so the ranks
agree on it without communicating.  ``G`` is the global batch (the loader's
``batch_size``, as on one process); with ``N`` ranks, global batch ``b`` is
``order[b*G : (b+1)*G]``, and rank ``r`` takes the ``r``-th of its ``N``
equal, contiguous pieces::

    order      = [ o0 o1 o2 o3 | o4 o5 o6 o7 | ... ]      G = 4, N = 2
    rank 0     = [ o0 o1       | o4 o5       | ... ]      per-rank batch G / N = 2
    rank 1     = [       o2 o3 |       o6 o7 | ... ]

So the N ranks' batch ``b`` together hold exactly the single process's batch
``b``, and every rank runs the same number of steps per epoch (a collective
per step needs that).

Training (``even=True``, the default for a shuffled loader): every rank's
batches have equal sizes, which makes the average of the ranks' mean
gradients the mean gradient of the global batch.  With ``drop_last`` the
epoch keeps ``floor(items / G)`` full global batches, as on one process.
Without it the order is *padded* to a multiple of N by repeating its first
items (as PyTorch's ``DistributedSampler``), and the last, short global batch
is split in N equal pieces: at most N - 1 images are seen twice in an epoch,
none is left out.

Evaluation (``even=False``, the default for an unshuffled loader): rank ``r``
takes the ``r``-th contiguous block of ``np.array_split(order, N)``, with no
padding and nothing dropped, so that the sums reduced over the ranks
(:class:`~tinynet.distributed.FitHooks`) count every validation image once.

Augmentation: a rank's batch ``b`` draws from the generator seeded by
``(seed, epoch, 1 + b, rank)``, independent across ranks (rank 0 of a world of
one draws exactly what the plain loader draws).  The crops and flips therefore
differ from the single process's, with the same distribution.
"""
from __future__ import annotations

import math

import numpy as np

from ..data.loader import DataLoader

__all__ = ["shard_order", "DistributedLoader"]


def shard_order(order, rank: int, size: int, batch_size: int, even: bool = True, drop_last: bool = False):
    """Rank ``rank``'s items of one epoch, from the epoch's ``order`` (the same on every rank).

    Parameters
    ----------
    order : (items,) int array, the epoch's order of items.
    rank, size : this rank and the number of ranks.
    batch_size : the global batch ``G``; with ``even``, a multiple of ``size``.
    even : training layout (equal per-rank batches, padding or dropping, see the
        module docstring) or evaluation layout (contiguous blocks, nothing repeated).
    drop_last : with ``even``, keep only full global batches.

    Returns
    -------
    (k,) int array: the items, in the order this rank serves them.
    """
    order = np.asarray(order)
    n = len(order)
    if not 0 <= rank < size:
        raise ValueError(f"shard_order: rank must lie in [0, {size}), got {rank}")
    if n < size:
        raise ValueError(f"shard_order: {n} items cannot be shared among {size} ranks (each needs at least one)")
    if not even:
        return np.array_split(order, size)[rank]
    if batch_size % size:
        raise ValueError(f"shard_order: the global batch {batch_size} does not divide among {size} ranks")
    if drop_last:
        order = order[:(n // batch_size) * batch_size]
    else:
        order = np.concatenate([order, order[:(-n) % size]])  # pad to a multiple of size
    per_rank = batch_size // size
    full = len(order) // batch_size
    head = order[:full * batch_size].reshape(full, size, per_rank)[:, rank, :].ravel()
    tail = order[full * batch_size:]
    k = len(tail) // size
    return np.concatenate([head, tail[rank * k:(rank + 1) * k]])


class DistributedLoader(DataLoader):
    """A :class:`~tinynet.data.DataLoader` that serves one rank's share of every epoch.

    Build it with :meth:`wrap` from the loader a single process would use: its
    ``batch_size`` is the global batch, and ``len()`` (batches per epoch) is
    the same as the single process's.  ``set_epoch``, ``iter_from`` (resuming
    inside an epoch) and ``epoch_order`` work as on the plain loader.
    """

    rank: int = 0
    size: int = 1
    even: bool = True
    global_batch_size: int = 1

    @classmethod
    def wrap(cls, loader: DataLoader, comm, even: bool | None = None) -> "DistributedLoader":
        """Rank ``comm.rank``'s share of ``loader``'s epochs (``loader`` itself is left unchanged).

        ``even`` defaults to ``loader.shuffle``: the training layout for a
        shuffled loader, the evaluation layout otherwise.
        """
        if not isinstance(loader, DataLoader):
            raise TypeError(f"DistributedLoader.wrap: expected a tinynet DataLoader, got {type(loader).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(loader.__dict__)
        new.rank, new.size = comm.rank, comm.size
        new.even = loader.shuffle if even is None else bool(even)
        new.global_batch_size = loader.batch_size
        if new.even and loader.batch_size % comm.size:
            raise ValueError(f"DistributedLoader: the global batch {loader.batch_size} does not divide among "
                             f"{comm.size} ranks")
        if loader.num_items < comm.size:
            raise ValueError(f"DistributedLoader: {loader.num_items} images cannot be shared among {comm.size} ranks")
        new.batch_size = loader.batch_size // comm.size if new.even else math.ceil(loader.batch_size / comm.size)
        new._items = len(new._shard(np.arange(loader.num_items)))
        return new

    def _shard(self, order):
        return shard_order(order, self.rank, self.size, self.global_batch_size, self.even, self.drop_last)

    def __len__(self) -> int:
        return math.ceil(self._items / self.batch_size)

    def _item_order(self, epoch: int) -> np.ndarray:
        return self._shard(super()._item_order(epoch))

    def _generator(self, epoch: int, stream: int) -> np.random.Generator:
        if stream == 0 or self.size == 1:  # stream 0 is the order: the same on every rank
            return super()._generator(epoch, stream)
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch, stream, self.rank)))
