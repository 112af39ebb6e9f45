"""Batches for training: shuffled per epoch, augmented, normalised, prepared ahead in background threads.

An epoch's items are the dataset indices the loader was given (or, with
``augment_copy``, those indices twice: each image plain and as an augmented
copy).  Each epoch, in order:

1. the items are shuffled by a generator seeded from ``(seed, epoch)``;
2. batch b takes the next ``batch_size`` items, gathers their uint8 images,
   applies the per-image ``transform`` (to the augmented items) and the
   ``batch_transform``, with a generator seeded from ``(seed, epoch, b)``;
3. the batch is normalised to float32 ``(B, 3, H, W)``.

Every random number depends only on ``(seed, epoch, batch)``, never on which
thread prepared the batch or when, so an epoch is reproduced exactly by
asking for it again (``set_epoch``), for instance when resuming a run.

Steps 2 and 3 run in a pool of ``workers`` threads that keeps ``prefetch``
batches in preparation while the caller trains on the current one.  PIL and
NumPy release the GIL for their heavy work, so the preparation overlaps the
training step.  An exception raised while preparing a batch is raised again
in the caller's thread, with its original traceback.  Breaking out of the
loop (or dropping the iterator) stops the threads: the iterator cancels the
batches not started and waits for the ones in progress.
"""
from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .transforms import Normalize, to_float_chw

__all__ = ["DataLoader"]


class DataLoader:
    """Iterate over ``(x, y)`` batches of a dataset: x float32 ``(B, 3, H, W)``, y int64 ``(B,)``, NumPy arrays.

    Parameters
    ----------
    dataset : any dataset of this package (``images(indices)``, ``labels``).
    indices : int array, the dataset indices to serve (e.g. the training
        part of :func:`~tinynet.data.split.stratified_split`); default all.
    batch_size : images per batch; the last batch may be smaller.
    shuffle : draw a new order every epoch (training); otherwise the order of
        ``indices`` (evaluation).
    seed : seeds the order and the augmentations, together with the epoch.
    transform : per-image augmentation, ``transform(PIL image, rng) -> PIL image``
        of the same size (see :mod:`tinynet.data.transforms`).  Applied to
        every image, or with ``augment_copy`` to the copies only.
    batch_transform : ``batch_transform(uint8 (B, H, W, 3), rng) -> uint8 (B, H, W, 3)``,
        applied to every batch after ``transform``, e.g.
        :func:`~tinynet.data.transforms.random_crop_flip_batch`.
    augment_copy : each epoch serves every image twice, plain and as a copy
        augmented by ``transform``, shuffled together (the assignment's
        "augmentation run": the plain set plus an augmented set, twice as
        many batches).  The copies are augmented afresh each epoch.
    drop_last : drop a last batch smaller than ``batch_size``.
    prefetch : batches prepared ahead of the one being used; 0 prepares each
        batch in the caller's thread when it is asked for (no threads, for debugging).
    workers : threads preparing batches.
    normalize : ``(mean, std)`` for :class:`~tinynet.data.transforms.Normalize`
        (numbers or per-channel triples), or None for ``x / 255`` only.

    Epochs: each ``iter(loader)`` (each ``for`` loop) serves the epoch
    ``loader.epoch`` and then advances it by one, so successive loops see new
    orders and new augmentations.  ``set_epoch(e)`` sets the epoch the next
    loop serves, to reproduce or resume.  ``len(loader)`` is the number of batches.
    """

    def __init__(self, dataset, indices=None, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
                 transform=None, batch_transform=None, augment_copy: bool = False, drop_last: bool = False,
                 prefetch: int = 2, workers: int = 1, normalize=(0.5, 0.5)):
        indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        if indices.ndim != 1 or len(indices) == 0 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"DataLoader: expected a non-empty 1-D integer array of indices, "
                             f"received {indices.dtype} {indices.shape}")
        if indices.min() < 0 or indices.max() >= len(dataset):
            raise ValueError(f"DataLoader: indices must lie in [0, {len(dataset)}) for a dataset of "
                             f"{len(dataset)} images, received {indices.min()} .. {indices.max()}")
        if batch_size < 1 or prefetch < 0 or workers < 1:
            raise ValueError(f"DataLoader: expected batch_size >= 1, prefetch >= 0 and workers >= 1, "
                             f"received {batch_size}, {prefetch} and {workers}")
        if augment_copy and transform is None:
            raise ValueError("DataLoader: augment_copy=True needs a transform to make the augmented copies")
        self.dataset = dataset
        self.indices = indices.astype(np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform
        self.batch_transform = batch_transform
        self.augment_copy = augment_copy
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.workers = workers
        self.normalize = to_float_chw if normalize is None else Normalize(*normalize)
        self.epoch = 0

    @property
    def num_items(self) -> int:
        """Images served per epoch: ``len(indices)``, doubled with ``augment_copy``."""
        return len(self.indices) * (2 if self.augment_copy else 1)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_items // self.batch_size
        return math.ceil(self.num_items / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter(loader)`` serve epoch ``epoch``."""
        self.epoch = epoch

    def _generator(self, epoch: int, stream: int) -> np.random.Generator:
        """Epoch ``epoch``'s generator number ``stream``: 0 shuffles, 1 + b augments batch b.

        Spawn keys make the streams statistically independent of each other
        and of every other epoch's.
        """
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch, stream)))

    def _item_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s items in serving order; item k < len(indices) is ``indices[k]`` plain,
        item ``len(indices) + k`` its augmented copy."""
        if self.shuffle:
            return self._generator(epoch, 0).permutation(self.num_items)
        return np.arange(self.num_items)

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(sources, augmented)`` for epoch ``epoch``, in serving order, before ``drop_last``.

        ``sources``: int64 dataset indices; ``augmented``: bool, True where the
        image is passed through ``transform``.
        """
        items = self._item_order(epoch)
        return self.indices[items % len(self.indices)], self._augmented(items)

    def _augmented(self, items: np.ndarray) -> np.ndarray:
        if self.transform is None:
            return np.zeros(len(items), dtype=bool)
        if self.augment_copy:
            return items >= len(self.indices)
        return np.ones(len(items), dtype=bool)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start_batch: int):
        """Serve epoch ``loader.epoch`` from batch ``start_batch`` on (to resume inside an epoch), then advance the epoch.

        Batch b is the same whether the epoch starts at 0 or at b: its images
        and random numbers depend only on (seed, epoch, b).
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"DataLoader.iter_from: start_batch must be in [0, {len(self)}], got {start_batch}")
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch, start_batch)

    def throughput(self, batches: int = 20, epoch: int = 0) -> float:
        """Images per second the loader prepares when nothing else runs, over the first ``batches`` of ``epoch``.

        It uses the loader's threads and prefetch as training does, but no
        network consumes the batches: compared with a training step's images
        per second it shows whether the data pipeline can keep the step fed.
        ``loader.epoch`` is left as it was.
        """
        batches = min(batches, len(self))
        if batches < 1:
            raise ValueError(f"DataLoader.throughput: batches must be at least 1, got {batches}")
        started, images = time.perf_counter(), 0
        iterator = self._batches(epoch)
        for _, (x, _) in zip(range(batches), iterator):
            images += len(x)
        iterator.close()  # stops the threads preparing batches past the last one measured
        return images / (time.perf_counter() - started)

    def _batches(self, epoch: int, start_batch: int = 0):
        items = self._item_order(epoch)
        jobs = ((items[b * self.batch_size:(b + 1) * self.batch_size], epoch, b) for b in range(start_batch, len(self)))
        if self.prefetch == 0:
            for job in jobs:
                yield self._make_batch(*job)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tinynet-loader")
        pending = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(self._make_batch, *job))
                if len(pending) > self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # Reached on exhaustion, on an exception, and on close(): the consumer broke
            # out of its loop or dropped the iterator.  Batches not started are cancelled.
            pool.shutdown(wait=True, cancel_futures=True)

    def _make_batch(self, items: np.ndarray, epoch: int, batch: int):
        """Batch ``batch`` of epoch ``epoch``: ``(x float32 (B, 3, H, W), y int64 (B,))`` for ``items``."""
        sources = self.indices[items % len(self.indices)]
        images = self.dataset.images(sources)
        rng = self._generator(epoch, 1 + batch)
        for j in np.flatnonzero(self._augmented(items)):
            augmented = np.asarray(self.transform(Image.fromarray(images[j]), rng))
            if augmented.shape != images[j].shape:
                raise ValueError(f"DataLoader: transform {self.transform!r} turned image {sources[j]} of shape "
                                 f"{images[j].shape} into shape {augmented.shape}, in batch {batch} of epoch "
                                 f"{epoch}; per-image transforms must keep the size and RGB mode")
            images[j] = augmented
        if self.batch_transform is not None:
            images = self.batch_transform(images, rng)
        return self.normalize(images), np.asarray(self.dataset.labels, dtype=np.int64)[sources]
