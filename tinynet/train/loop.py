"""The training and evaluation loops.

One training step is the chain rule written out by the caller of the layers::

    logits = model(x)                     forward, every layer keeps its cache
    loss = loss_fn(logits, y)             scalar
    model.backward(loss_fn.backward())    dL/dlogits, then every layer's backward in reverse
    optimizer.step()                      W <- W - lr * (update from W.grad)

:func:`fit` runs epochs of such steps with a progress bar, evaluates on the
validation set after each epoch, keeps the history, tracks the best epoch,
writes a checkpoint after every epoch (atomically: a crash never leaves a
half-written file), resumes from one, and stops cleanly on Ctrl-C after
saving where it was.  On the GPU nothing in a step waits for the device: the
loss and the correct count are summed on the device and read back once per
``log_every`` batches.

Non-finite losses: with ``on_nan="stop"`` (default) the run stops with
:class:`NonFiniteLossError`, naming the epoch and the batch; the last
checkpoint on disk is the one from the end of the previous epoch, written
before anything went wrong.  A NaN gradient behind a finite loss is caught
when the checkpoint is about to be written: the parameters are checked
first, and :class:`NonFiniteParametersError` stops the run instead of
overwriting the last good checkpoint.  With ``on_nan="skip"`` the step of a
batch whose loss is not finite is skipped (no parameter changes) and counted;
this needs the loss on the host every batch, which costs a device
synchronisation per batch on the GPU.
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import time

import numpy as np

from .. import backend
from ..nn.module import no_grad
from ..signals import deferred_signals
from .checkpoint import load_checkpoint, save_checkpoint
from .history import EpochStats, History  # noqa: F401  (History is part of this module's API)

__all__ = ["fit", "evaluate", "predict", "EpochStats", "History", "NonFiniteLossError", "NonFiniteParametersError",
           "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, epoch: int, batch: int, value: float, checkpoint=None):
        self.epoch, self.batch, self.value, self.checkpoint = epoch, batch, value, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"loss became {value} in epoch {epoch + 1}, batch {batch + 1}; training stopped "
                         f"({where}). Lower the learning rate, or pass on_nan='skip' to skip such batches.")


class NonFiniteParametersError(NonFiniteLossError):
    """A parameter or buffer became NaN or infinite behind finite losses (a gradient was not finite).

    Raised before a checkpoint would be written, so that the file keeps the
    last finite state.
    """

    def __init__(self, epoch: int, key: str, checkpoint=None):
        self.epoch, self.batch, self.value, self.checkpoint, self.key = epoch, None, float("nan"), checkpoint, key
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        RuntimeError.__init__(self, f"the model's {key} is not finite in epoch {epoch + 1}, although every loss "
                                    f"was finite (a gradient was NaN or infinite); training stopped without saving "
                                    f"({where}). Lower the learning rate.")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`, after the state was saved."""

    def __init__(self, checkpoint, epoch: int, batch: int):
        self.checkpoint, self.epoch, self.batch = checkpoint, epoch, batch
        where = f"saved to {checkpoint}" if checkpoint else "nothing saved (no checkpoint path)"
        when = f"after epoch {epoch}" if batch == 0 and epoch > 0 else f"in epoch {epoch + 1} after {batch} batches"
        super().__init__(f"interrupted {when}; {where}")


def _as_device(x, device):
    # Parsed, not compared as a string: "cuda:0" must move the batch too, and "cuda:1" must be refused.
    return backend.to_device(x, device) if backend.normalize_device(device) == "cuda" else x


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, dynamic_ncols=True, leave=False)


def evaluate(model, loader, loss_fn=None, device: str = "cpu", progress: bool = False, desc: str = "eval") -> dict:
    """Loss, accuracy, predictions and labels of ``model`` over ``loader`` (evaluation mode, no caches).

    Returns a dict with ``loss`` (mean per image, or None without ``loss_fn``),
    ``accuracy``, ``top5_accuracy`` (the label among the five largest logits;
    None with 5 classes or fewer, where it is always 1), ``predictions`` and
    ``labels`` (NumPy int64 arrays).
    """
    was_training = model.training
    model.eval()
    xp_loss, preds, top5, labels = 0.0, [], [], []
    count = 0
    bar = _progress(len(loader), desc, progress)
    try:
        with no_grad():
            for x, y in loader:
                logits = model(_as_device(x, device))
                if loss_fn is not None:
                    xp_loss = xp_loss + loss_fn(logits, y) * len(y)
                preds.append(logits.argmax(axis=1))
                if logits.shape[1] > 5:  # the five largest, in no particular order
                    xp = backend.get_array_module(logits)
                    top5.append(xp.argpartition(logits, -5, axis=1)[:, -5:])
                labels.append(np.asarray(y))
                count += len(y)
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    predictions = np.concatenate([backend.to_numpy(p) for p in preds]).astype(np.int64)
    labels = np.concatenate(labels).astype(np.int64)
    top5_accuracy = None
    if top5:
        top5 = np.concatenate([backend.to_numpy(t) for t in top5])
        top5_accuracy = float(np.mean((top5 == labels[:, None]).any(axis=1)))
    return {
        "loss": float(xp_loss) / count if loss_fn is not None else None,
        "accuracy": float(np.mean(predictions == labels)),
        "top5_accuracy": top5_accuracy,
        "predictions": predictions,
        "labels": labels,
    }


def predict(model, loader, device: str = "cpu", features: bool = False):
    """Logits (or, with ``features=True``, ``model.features``) for every batch, concatenated on the host."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with no_grad():
            for x, _ in loader:
                x = _as_device(x, device)
                out.append(backend.to_numpy(model.features(x) if features else model(x)))
    finally:
        model.train(was_training)
    return np.concatenate(out)


#: Steps timed for fit's up-front estimate, after one warm-up step (the first allocates every buffer).
ESTIMATE_STEPS = 3


def _train_epoch(model, loader, loss_fn, optimizer, device, epoch, *, log_every, on_nan, progress, state,
                 checkpoint, estimate=None, threads=None):
    """One epoch from batch ``state["batch"]`` on; keeps its running sums in ``state`` (read on Ctrl-C).

    ``estimate``: called once as ``estimate(seconds_per_step, steps_done_in_this_epoch)`` after the warm-up
    step and :data:`ESTIMATE_STEPS` timed ones, if the epoch has that many.
    """
    timed_from = None
    model.train()
    start_batch = state["batch"]
    xp = np
    first_bad = None  # on the GPU: the first batch whose loss was not finite, tracked on the device
    bar = _progress(len(loader), f"epoch {epoch + 1}", progress)
    bar.update(start_batch)
    started = time.perf_counter()
    iterator = loader.iter_from(start_batch) if start_batch else iter(loader)
    try:
        for batch, (x, y) in enumerate(iterator, start=start_batch):
            xd, yd = _as_device(x, device), _as_device(y, device)
            xp = backend.get_array_module(xd)
            # A Ctrl-C inside the step leaves no trace: the forward's changes to the buffers (BatchNorm's
            # running statistics, num_batches_tracked) are undone, and the update runs whole or not at all.
            buffers = _buffers_before_step(model)
            try:
                optimizer.zero_grad()
                logits = model(xd)
                loss = loss_fn(logits, yd)
                if device == "cpu" or on_nan == "skip":
                    value = float(loss)  # free on the CPU; on the GPU a synchronisation, paid only for "skip"
                    if not math.isfinite(value):
                        if on_nan == "stop":
                            raise NonFiniteLossError(epoch, batch, value, checkpoint)
                        state["skipped"] += 1  # no backward, no step: the parameters stay as they were
                        model.release_saved()  # and the caches this forward kept are dropped
                        state["batch"] = batch + 1
                        bar.update(1)
                        continue
                else:
                    bad = xp.where(xp.isfinite(loss), len(loader), batch)
                    first_bad = bad if first_bad is None else xp.minimum(first_bad, bad)
                model.backward(loss_fn.backward())
                with deferred_signals():  # a signal now is acted on after the update and its bookkeeping
                    optimizer.step()
                    state["loss_sum"] = state["loss_sum"] + loss * len(y)  # stays on the device
                    state["correct"] = state["correct"] + (logits.argmax(axis=1) == yd).sum()
                    state["seen"] += len(y)
                    state["batch"] = batch + 1
            except KeyboardInterrupt:
                if state["batch"] == batch:  # stopped before the update: as if the step never began
                    _restore_buffers(buffers)
                    model.release_saved()
                raise
            bar.update(1)
            if threads is not None:
                threads.tick()  # a busy machine: fewer threads (tinynet.cores)
            if estimate is not None and batch - start_batch in (0, ESTIMATE_STEPS):
                backend.synchronize(xd)  # once at each end of the timed steps: the GPU's queue is drained
                if timed_from is None:
                    timed_from = time.perf_counter()
                else:
                    estimate((time.perf_counter() - timed_from) / ESTIMATE_STEPS, batch + 1)
                    estimate = None
            if (batch + 1) % log_every == 0 or batch + 1 == len(loader):
                if first_bad is not None and int(first_bad) < len(loader):  # one read-back per interval
                    raise NonFiniteLossError(epoch, int(first_bad), float("nan"), checkpoint)
                seen = max(state["seen"], 1)
                rate = (state["seen"] - state["seen_at_start"]) / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{float(state['loss_sum']) / seen:.4f}",
                                acc=f"{float(state['correct']) / seen:.3f}", img_s=f"{rate:.0f}")
    finally:
        bar.close()
        # Stop the loader's threads now: on an exception the traceback keeps this frame, and with it
        # the iterator, alive, and its threads would go on preparing batches nobody takes.
        if hasattr(iterator, "close"):
            iterator.close()


def _buffers_before_step(model) -> list:
    """``(module, name, copy)`` of every buffer of ``model``, taken before a training step's forward.

    The forward of a training step changes buffers in place (BatchNorm's
    ``running_mean``, ``running_var``, ``num_batches_tracked``); a step cut
    short by Ctrl-C restores them with :func:`_restore_buffers`, so that
    resuming trains that batch on exactly the statistics it saw first.  A
    model without buffers costs nothing; ResNet18's are 60 small arrays
    (9,620 numbers), copied once per step.
    """
    return [(module, name, value.copy()) for module in model.modules()
            for name, value in module._buffers.items() if value is not None]


def _restore_buffers(saved) -> None:
    for module, name, value in saved:
        current = module._buffers.get(name)
        if current is not None and current.shape == value.shape and current.dtype == value.dtype:
            current[...] = value  # in place: whoever holds the array sees the restored values
        else:
            setattr(module, name, value)


def fit(model, optimizer, loss_fn, train_loader, val_loader=None, epochs: int = 10, *, device: str = "cpu",
        scheduler=None, checkpoint_path=None, resume: bool = False, on_nan: str = "stop", log_every: int = 10,
        progress: bool = True, extra=None, log=print, time_budget: float | None = None,
        on_epoch_end=None, distributed=None, data_identity=None, threads=None) -> History:
    """Train ``model`` for ``epochs`` epochs; returns the :class:`History`.

    Parameters
    ----------
    model, optimizer, loss_fn : a tinynet model, optimizer and loss.
    train_loader, val_loader : iterables of ``(x, y)`` NumPy batches with ``len()``;
        the training loader must have ``set_epoch(e)`` (and ``iter_from(b)`` to
        resume inside an epoch) so that epoch ``e`` is reproduced exactly.
    epochs : total number of epochs (a resumed run continues up to it).
    device : "cpu" or "cuda"; batches are moved to it, the model must already be there.
    scheduler : stepped once per epoch.
    checkpoint_path : written after every epoch, and on Ctrl-C.
    resume : continue from ``checkpoint_path`` when it exists.
    on_nan : "stop" or "skip" (see the module docstring).
    log_every : batches between read-backs of the running loss (progress bar updates).
    extra : JSON-able dict stored in every checkpoint (model name, classes, seed...).
    log : where the one-line epoch summaries go (``print``, or None for silence).
    time_budget : seconds; after each epoch, stop (returning the history so far,
        the checkpoint written) when another epoch as long as the longest one
        so far would end past the budget, counted from this call's start.
    on_epoch_end : called as ``on_epoch_end(stats, model, history)`` after every
        epoch, just before its checkpoint is written (``stats`` is that epoch's
        :class:`EpochStats`, already in ``history``): to keep the best weights,
        log to a run tracker, ...  What it writes is on disk before the
        checkpoint that records the epoch, so a kill in between costs the epoch,
        never a file the checkpoint claims.  From the end of the validation to
        the end of the checkpoint, Ctrl-C and SIGTERM are deferred
        (:mod:`tinynet.signals`): the epoch is recorded, then
        :class:`TrainingInterrupted` stops the run.
    distributed : data-parallel hooks (:class:`tinynet.distributed.FitHooks`), or None:
        only rank 0 writes checkpoints (every rank resumes from them), the
        epoch's sums and validation results are reduced over the ranks, and
        the time budget is rank 0's clock.
    data_identity : ``{part: identity}`` of the data trained on
        (:func:`tinynet.data.identity.dataset_identity`), recorded in every
        checkpoint; resuming on data that differs is refused, saying what
        changed.  Whatever it is given, resuming refuses a checkpoint that
        stopped past the end of an epoch of ``train_loader``.
    threads : a :class:`tinynet.cores.ThreadGovernor`, or None: told after every
        step, so that ``threads="auto"`` gives cores back to other programs
        while they need them (and takes them again after).
    """
    if on_nan not in ("stop", "skip"):
        raise ValueError(f"fit: on_nan must be 'stop' or 'skip', got {on_nan!r}")
    if epochs < 1:
        raise ValueError(f"fit: epochs must be at least 1, got {epochs}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"fit: time_budget must be a positive number of seconds, got {time_budget}")
    device = backend.check_device(device)  # "cuda" without a GPU fails here, before any work
    if model.device != device:
        raise ValueError(f"fit(device={device!r}): the model is on {model.device}; call model.to({device!r}) first")
    if len(train_loader) == 0:
        raise ValueError("fit: the training loader yields no batches (no images, or drop_last with fewer images "
                         "than one batch)")
    own = {id(p) for p in model.parameters()}
    if not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("fit: the optimizer holds none of the model's parameters, so training would change "
                         "nothing; build it from this model, e.g. optim.Adam(model.parameters())")
    log = log or (lambda *a, **k: None)
    # Training allocates and frees the same large arrays every step: let glibc keep them (a setting of
    # this process's malloc, made here and by the example scripts, never by importing tinynet).
    backend.keep_freed_host_memory()
    checkpoint_path = pathlib.Path(checkpoint_path) if checkpoint_path else None
    history = History()
    start_epoch, start_batch = 0, 0
    saved_partial = None  # running sums of an epoch interrupted by Ctrl-C
    if resume and checkpoint_path and not checkpoint_path.exists():
        log(f"no checkpoint at {checkpoint_path} to resume from: starting at epoch 1")
    if resume and checkpoint_path and checkpoint_path.exists():
        meta = load_checkpoint(checkpoint_path, model, optimizer, scheduler, expect=extra, data=data_identity,
                               batches_per_epoch=len(train_loader))
        history = History.from_dict(meta.get("history"))
        start_epoch, start_batch = meta["epoch"], meta["batch"]
        saved_partial = meta["extra"].get("_partial_epoch") if start_batch else None
        in_all = f"{epochs} epoch{'s' if epochs != 1 else ''}"
        if start_epoch >= epochs:
            log(f"resumed from {checkpoint_path}: all {in_all} already trained; nothing left to train (a larger "
                f"--epochs trains more)")
        elif start_batch:  # "batch b of B" counts this epoch's batches; the run's epochs are said apart
            log(f"resumed from {checkpoint_path}: continuing at epoch {start_epoch + 1}, batch {start_batch + 1} of "
                f"{len(train_loader)} ({in_all} in all)")
        else:
            log(f"resumed from {checkpoint_path}: continuing at epoch {start_epoch + 1} of {epochs}")
    extra = dict(extra or {})
    last_good = checkpoint_path if (checkpoint_path and checkpoint_path.exists()) else None
    fit_started, longest_epoch = time.perf_counter(), 0.0

    def estimate(step_seconds, done_in_epoch):
        steps_left = len(train_loader) - done_in_epoch + (epochs - epoch - 1) * len(train_loader)
        history.estimated_seconds = time.perf_counter() - fit_started + steps_left * step_seconds
        log(f"estimate: {step_seconds:.3g} s a training step ({ESTIMATE_STEPS} steps timed), so about "
            f"{_duration(history.estimated_seconds)} of training steps for this run's {epochs - start_epoch} "
            f"epoch{'s' if epochs - start_epoch != 1 else ''}, validation not counted")

    for epoch in range(start_epoch, epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        state = {"batch": start_batch, "loss_sum": 0.0, "correct": 0, "seen": 0, "skipped": 0}
        if saved_partial:  # the part of this epoch trained before an interruption
            state.update(saved_partial)
        state["seen_at_start"] = state["seen"]
        saved_partial = None
        started = time.perf_counter()
        try:
            _train_epoch(model, train_loader, loss_fn, optimizer, device, epoch, log_every=log_every,
                         on_nan=on_nan, progress=progress, state=state, checkpoint=last_good,
                         estimate=estimate if epoch == start_epoch else None, threads=threads)
            seconds = time.perf_counter() - started
            val = evaluate(model, val_loader, loss_fn, device) if val_loader is not None else None
        except KeyboardInterrupt:
            # Ctrl-C: save where we are (the model after state["batch"] batches of this epoch; during the
            # validation that is all of them, and resuming runs the validation again), then stop.
            if checkpoint_path is None or (distributed is not None and not distributed.is_main):
                raise TrainingInterrupted(None, epoch, state["batch"]) from None
            extra["_partial_epoch"] = {"loss_sum": float(state["loss_sum"]), "correct": int(state["correct"]),
                                       "seen": state["seen"], "skipped": state["skipped"]}
            with contextlib.suppress(KeyboardInterrupt), deferred_signals():  # a second Ctrl-C: stopping already
                _save_if_finite(checkpoint_path, model, optimizer, scheduler, epoch=epoch, batch=state["batch"],
                                history=history.to_dict(), extra=extra, last_good=last_good, data=data_identity)
            raise TrainingInterrupted(checkpoint_path, epoch, state["batch"]) from None
        # The epoch is recorded whole (its best weights, then its checkpoint): a Ctrl-C or SIGTERM from here on
        # is acted on once the checkpoint is written, and then stops the run as it would have mid-epoch.
        try:
            with deferred_signals():
                extra.pop("_partial_epoch", None)
                loss_sum, correct, seen, skipped = float(state["loss_sum"]), int(state["correct"]), state["seen"], \
                    state["skipped"]
                if distributed is not None:  # data-parallel: every rank trained and validated on its own shard
                    (loss_sum, correct, seen, skipped, state["seen_at_start"]), val = distributed.reduce_epoch(
                        (loss_sum, correct, seen, skipped, state["seen_at_start"]), val)
                start_batch = 0
                stats = EpochStats(
                    epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), train_acc=correct / max(seen, 1),
                    val_loss=val["loss"] if val else None, val_acc=val["accuracy"] if val else None,
                    seconds=seconds, images_per_second=(seen - state["seen_at_start"]) / max(seconds, 1e-9),
                    lr=float(optimizer.param_groups[0]["lr"]), skipped_batches=skipped,
                    val_top5=val["top5_accuracy"] if val else None)
                history.epochs.append(stats)
                if scheduler is not None:
                    scheduler.step()
                val_text = f"  val loss {stats.val_loss:.4f}  val acc {stats.val_acc:.4f}" if val else ""
                if stats.val_top5 is not None:
                    val_text += f"  top-5 {stats.val_top5:.4f}"
                skip_text = f"  skipped {skipped} non-finite batches" if skipped else ""
                log(f"epoch {epoch + 1:>3}/{epochs}  train loss {stats.train_loss:.4f}  train acc {stats.train_acc:.4f}"
                    f"{val_text}  {seconds:.1f}s  {stats.images_per_second:.0f} img/s{skip_text}")
                if on_epoch_end is not None:  # first: the best weights are on disk before a checkpoint records them
                    on_epoch_end(stats, model, history)
                if checkpoint_path is not None and (distributed is None or distributed.is_main):
                    _save_if_finite(checkpoint_path, model, optimizer, scheduler, epoch=epoch + 1,
                                    history=history.to_dict(), extra=extra, last_good=last_good,
                                    data=data_identity)
                    last_good = checkpoint_path
        except KeyboardInterrupt:
            writes = distributed is None or distributed.is_main
            raise TrainingInterrupted(checkpoint_path if writes else None, epoch + 1, 0) from None
        elapsed = time.perf_counter() - fit_started
        longest_epoch = max(longest_epoch, time.perf_counter() - started)  # training, validation, checkpoint
        if history.estimated_seconds is None and epoch == start_epoch and epoch + 1 < epochs:
            # too few batches to time steps within the epoch: the first whole epoch is the measure
            history.estimated_seconds = elapsed + (epochs - epoch - 1) * longest_epoch
            log(f"estimate: {longest_epoch:.1f} s an epoch, so about {_duration(history.estimated_seconds)} for "
                f"this run's {epochs - start_epoch} epochs")
        if distributed is not None and time_budget is not None:  # one decision for all ranks: rank 0's clock
            elapsed, longest_epoch = distributed.agree((elapsed, longest_epoch))
        if time_budget is not None and epoch + 1 < epochs and elapsed + longest_epoch > time_budget:
            log(f"time budget: stopping after epoch {epoch + 1} of {epochs}; another epoch (up to "
                f"{longest_epoch:.0f} s) would end past the budget of {time_budget:.0f} s ({elapsed:.0f} s used)")
            break
    return history


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads a duration: "42 s", "3.5 min", "2.1 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _save_if_finite(path, model, optimizer, scheduler, *, epoch, batch=0, history, extra, last_good, data=None):
    """:func:`save_checkpoint`, unless the model holds a NaN or an infinity: that must not replace ``last_good``.

    The loss check catches most divergences; this one catches a non-finite
    gradient behind a finite loss.  One read-back per array, once per epoch.
    """
    for key, value in model.state_dict().items():
        xp = backend.get_array_module(value)
        if np.issubdtype(value.dtype, np.floating) and not bool(xp.isfinite(value).all()):
            # batch 0: ``epoch`` epochs are complete, the last of them (0-based) is epoch - 1
            raise NonFiniteParametersError(epoch - 1 if batch == 0 else epoch, key, last_good)
    save_checkpoint(path, model, optimizer, scheduler, epoch=epoch, batch=batch, history=history, extra=extra,
                    data=data)
