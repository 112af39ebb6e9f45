"""Evaluation-time epilogues: BatchNorm (+ shortcut) (+ ReLU) in place on a convolution's output.

In evaluation mode BatchNorm2d is a per-channel affine map with constants
(:func:`tinynet.nn.norm.batch_norm_eval_scale_shift`)::

    scale = gamma / sqrt(running_var + eps)
    shift = beta - running_mean * scale
    bn(y) = scale * y + shift

Layer by layer, a ResNet block's ``relu(bn(conv(x)) + shortcut)`` makes four arrays
after the convolution: BatchNorm's output, ReLU's mask, the sum, its mask.
:func:`conv_bn_eval` applies ``scale`` and ``shift`` in place on the convolution's
fresh output, then adds the shortcut and takes the ReLU in place: no new array, two
passes fewer per block, and the same operations in the same order as the layers one
by one, so the numbers are equal bit for bit.  It runs channel block by channel block
(:func:`~tinynet.nn.fast.threads.for_channel_blocks`), so the four passes over a block read
it from the cache, and the blocks are shared by the host threads.  (These are *epilogues*, not fused
kernels: in tinynet "fused" names only the CUDA twins of :mod:`tinynet.kernels`.)
Folding BatchNorm into the weights was measured and dropped (docs/performance.md).

Used only where no backward can follow and on the fast path:
:func:`can_run_in_place`, by :class:`tinynet.nn.BasicBlock` and the ResNet stem.

**ReLU and max pooling commute**, in training too (:func:`reorder_relu_maxpool`).
ReLU is monotone, so the maximum of rectified values is the rectified
maximum::

    maxpool(relu(x)) = relu(maxpool(x))

and the gradients agree as well: where a window's maximum is positive, both
orders route ``dout`` to the same cell (positive values are unchanged by the
ReLU, so the same first maximum wins); where it is not, both give 0 (the
ReLU's mask is 0 on every cell of the window).  NaN wins the window and is
masked in both orders.  Running the pool first leaves the ReLU a map
``KH*KW`` (non-overlapping windows) or about ``SH*SW`` times smaller: the
CNN's first ``ReLU -> MaxPool2d(4)`` pair rectifies 1/16 of the values, the
ResNet stem's ``ReLU -> MaxPool2d(3, 2, 1)`` 1/4.  The layers keep their
keys and their order in the model; only the order in which they run changes
(tests/test_fusion.py checks outputs and every gradient bit for bit).
"""
from __future__ import annotations

from ... import backend
from ..activation import ReLU
from ..conv import Conv2d
from ..module import is_grad_enabled
from ..norm import BatchNorm2d, batch_norm_eval_scale_shift
from ..pool import MaxPool2d
from . import enabled
from .layout import from_chwn, to_chwn
from .threads import for_channel_blocks

__all__ = ["can_run_in_place", "batch_norm_scale_shift", "conv_bn_eval", "conv_bn_eval_plain",
           "reorder_relu_maxpool"]


def reorder_relu_maxpool(layers) -> list:
    """``layers`` in the order to run them: every ``ReLU`` directly followed by a ``MaxPool2d`` swapped with it.

    A reordering, exact (see the module docstring for why the two orders give the same outputs
    and gradients); :class:`~tinynet.nn.Sequential` (every one, ``simple_cnn`` included) and the ResNet
    stem use it on the fast path only.  Exact types only (a subclass may
    compute something else).  The backward runs the returned list reversed.
    """
    order = list(layers)
    i = 0
    while i + 1 < len(order):
        if type(order[i]) is ReLU and type(order[i + 1]) is MaxPool2d:
            order[i], order[i + 1] = order[i + 1], order[i]
            i += 2
        else:
            i += 1
    return order


def can_run_in_place(owner, conv, bn, relu=None) -> bool:
    """Whether ``owner``'s ``conv -> bn (-> relu)`` may run as :func:`conv_bn_eval`.

    Only on the fast path, in evaluation mode without gradients, and only for the exact layer
    types whose eval forward the epilogue reproduces (a subclass may do something else).
    """
    return (enabled() and not owner.training and not is_grad_enabled()
            and type(conv) is Conv2d and type(bn) is BatchNorm2d and not bn.training
            and bn.track_running_stats and bn.num_features == conv.out_channels
            and (relu is None or type(relu) is ReLU))


def batch_norm_scale_shift(bn, dtype):
    """BatchNorm's eval map as ``(scale, shift)``, each ``(C,)`` in ``dtype``: ``bn(y) = scale * y + shift``.

    :func:`tinynet.nn.norm.batch_norm_eval_scale_shift`, the formula the layer itself uses, so
    that :func:`conv_bn_eval` gives its numbers bit for bit.
    """
    if bn.affine:
        gamma, beta = bn.weight.data, bn.bias.data
    else:
        gamma, beta = bn._gamma.astype(dtype, copy=False), bn._beta.astype(dtype, copy=False)  # as _affine_params
    _, scale, shift = batch_norm_eval_scale_shift(gamma, beta, bn.running_mean, bn.running_var, bn.eps, dtype)
    return scale, shift


def conv_bn_eval(conv, bn, x, relu: bool = False, residual=None):
    """``relu(bn(conv(x)) + residual)`` for evaluation without gradients, in one array.

    Parameters
    ----------
    conv : Conv2d;  bn : BatchNorm2d in eval mode (check with :func:`can_run_in_place`)
    x : (N, C, H, W)
    relu : apply ReLU at the end
    residual : optional (N, C_out, OH, OW) added before the ReLU (a residual block's shortcut);
        only read

    Returns
    -------
    (N, C_out, OH, OW), a new array that nobody else holds (CHWN in memory, as a convolution's
    output), equal to :func:`conv_bn_eval_plain` bit for bit.
    """
    out = conv(x)  # the layer as it is: its checks, its algorithm; under no_grad it keeps nothing
    bn._check_device(out, bn.running_var)
    xp = backend.get_array_module(out)
    scale, shift = batch_norm_scale_shift(bn, out.dtype)
    y = to_chwn(out)  # (C_out, OH, OW, N): the convolution's fresh array, written in place
    if not y.flags.c_contiguous:  # (a convolution's output always is; a copy otherwise, then written)
        y = xp.ascontiguousarray(y)
    r = None if residual is None else to_chwn(residual)  # a view, whatever the shortcut's layout
    c = y.shape[0]
    scale, shift = scale.reshape(c, 1, 1, 1), shift.reshape(c, 1, 1, 1)

    def block(a, b):  # channels [a, b): every pass over a cache-sized block, on the host threads
        rows = y[a:b]
        rows *= scale[a:b]  # bn(y) = scale * y + shift, in place
        rows += shift[a:b]
        if r is not None:
            rows += r[a:b]
        if relu:
            xp.maximum(rows, 0, out=rows)

    for_channel_blocks(c, y[0].size, block, y)
    return from_chwn(y)


def conv_bn_eval_plain(conv, bn, x, relu: bool = False, residual=None):
    """The layers one by one: what :func:`conv_bn_eval` computes (the tests' oracle)."""
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    if relu:
        y = backend.get_array_module(y).maximum(y, 0)
    return y
