"""Batch normalisation with statistics over the global batch: every rank's images of the step together.

With data parallelism each rank sees B = G / N images; plain BatchNorm then
normalises with the statistics of those B, and the N ranks together train a
different network than one process on the G images would.  SyncBatchNorm
computes the statistics of all G, as one process does, with one collective in
the forward pass and one in the backward pass (derived in docs/distributed.md).

Notation (per channel): rank r holds ``M_r`` values, ``M = sum_r M_r``.

Forward: every rank sends ``(mean_r, M2_r = sum (x - mean_r)^2, M_r)``
(an allgather), and each combines them alike (Chan et al.'s parallel
variance, which avoids the cancellation of ``E[x^2] - mean^2``)::

    mean = (1/M) sum_r M_r mean_r
    var  = (1/M) sum_r (M2_r + M_r (mean_r - mean)^2)            (biased)
    xhat = (x - mean) / sqrt(var + eps),   y = gamma xhat + beta

Backward, with ``dy`` this rank's upstream gradient: the two sums of the
BatchNorm gradient are summed over the ranks (an allreduce of 2C values)::

    S1 = sum_ranks sum_m dy_m,   S2 = sum_ranks sum_m dy_m xhat_m
    dx = gamma / sqrt(var + eps) * (dy - S1 / M - xhat * S2 / M)

while ``dgamma`` and ``dbeta`` keep this rank's own sums: the
:class:`~tinynet.distributed.DistributedOptimizer` averages them over the
ranks with every other gradient.  In a world of one process this is
BatchNorm exactly.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from ..nn.fast.norm import batch_norm_input_grad
from ..nn.layout import channel_matrix, from_channel_matrix
from ..nn.norm import BatchNorm2d, _BatchNorm
from ..nn.validation import check_grad, check_input

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _SyncCache(NamedTuple):
    """What the backward of one training forward needs."""

    xhat: object  # (C, M_r) normalised input of this rank
    scale: object  # (C,) gamma / sqrt(var + eps)
    count: int  # M, values per channel over all ranks
    shape: tuple
    dtype: object


class SyncBatchNorm(BatchNorm2d):
    """BatchNorm over (N, C), (N, C, L) or (N, C, H, W) with statistics over every rank's batch.

    Parameters are those of :class:`tinynet.nn.BatchNorm2d`, plus ``comm``:
    the communicator (default :func:`tinynet.distributed.world` at each
    forward).  Evaluation uses the running statistics, which are equal on
    every rank (each updates them with the same global statistics), and
    needs no communication.
    """

    _ranks = (2, 3, 4)
    _expected = "(N, {c}), (N, {c}, L) or (N, {c}, H, W)"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype="float32", comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)
        object.__setattr__(self, "comm", comm)

    def _communicator(self):
        if self.comm is not None:
            return self.comm
        from . import world

        return world()

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        check_input(self, x, self._expected.format(c=self.num_features), self._ranks, self.num_features)
        xp = backend.get_array_module(x)
        x2 = channel_matrix(x)  # (C, M_r)
        c, m_local = x2.shape
        gamma, beta = self._affine_params(x)
        local_mean = x2.mean(axis=1)
        centred = x2 - local_mean[:, None]
        local_m2 = xp.einsum("cm,cm->c", centred, centred)
        count = xp.full(1, m_local, dtype=x2.dtype)
        gathered = self._communicator().allgather(xp.concatenate([local_mean, local_m2, count]))  # (N, 2C + 1)
        means, m2s, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c]
        # M, the values per channel over all ranks, is a sum of host numbers: summed over MPI on the host,
        # not read back from the device (``float(counts.sum())`` made every layer wait for the GPU).
        m = int(round(self._communicator().sum_numbers([m_local])[0]))
        if m <= 1:
            raise ValueError(f"{self._describe()}: training needs more than one value per channel over all ranks "
                             f"to compute a variance, got input of shape {tuple(x.shape)} on this rank")
        mean = (counts[:, None] * means).sum(axis=0) / m
        var = (m2s.sum(axis=0) + (counts[:, None] * (means - mean) ** 2).sum(axis=0)) / m
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat = (x2 - mean[:, None]) * inv_std[:, None]
        y2 = xhat * gamma[:, None]
        y2 += beta[:, None]
        if self.track_running_stats:
            self._update_running_stats(mean, var, m)
        self._save_for_backward("sync", _SyncCache(xhat, gamma * inv_std, m, x.shape, x.dtype))
        return from_channel_matrix(y2, x.shape)

    def backward(self, dout):
        saved = self._saved_for_backward()
        if saved[0] != "sync":  # a forward in evaluation mode: BatchNorm's own backward
            self._save_for_backward(*saved)
            return super().backward(dout)
        cache = saved[1]
        check_grad(self, dout, cache.shape, cache.dtype)
        xp = backend.get_array_module(dout)
        dy2 = channel_matrix(dout)
        c = dy2.shape[0]
        dbeta = dy2.sum(axis=1)
        dgamma = xp.einsum("cm,cm->c", dy2, cache.xhat)
        sums = self._communicator().allreduce_(xp.concatenate([dbeta, dgamma]))  # S1 and S2 over all ranks
        s1, s2 = sums[:c], sums[c:]
        # BatchNorm's input gradient (written once, in tinynet.nn.fast.norm), with the global sums and count
        dx2 = batch_norm_input_grad(dy2, cache.xhat, cache.scale, s1, s2, xp.empty_like(dy2), count=cache.count)
        if self.affine:  # this rank's own sums; the optimizer averages them over the ranks
            self.weight.accumulate_grad(dgamma)
            self.bias.accumulate_grad(dbeta)
        return from_channel_matrix(dx2, dout.shape)


def convert_sync_batchnorm(module, comm=None):
    """Replace every BatchNorm layer in ``module`` by a :class:`SyncBatchNorm`, as PyTorch's namesake does.

    The new layers take over the old ones' settings, their Parameter objects
    (so an optimizer already built on ``module.parameters()`` keeps working)
    and their running statistics, and the training/evaluation mode.  Returns
    the converted module (a new object only when ``module`` itself is a
    BatchNorm layer); the state dict keeps its keys.
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        if module.track_running_stats:
            dtype = module.running_mean.dtype
        else:
            dtype = module.weight.dtype if module.affine else module._gamma.dtype
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, dtype=dtype, comm=comm)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        else:  # the constant gamma = 1, beta = 0, on the device the module is on (a new layer's are on the host)
            new._gamma, new._beta = module._gamma, module._beta
        if module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, name, getattr(module, name))
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        converted = convert_sync_batchnorm(child, comm)
        if converted is not child:
            setattr(module, name, converted)
    return module
