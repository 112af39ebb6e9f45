"""Evaluation-time fusion of Conv2d -> BatchNorm2d (-> + shortcut) (-> ReLU), in place.

In evaluation mode BatchNorm2d is a per-channel affine map with constants
(see :mod:`tinynet.nn.norm`)::

    scale = gamma / sqrt(running_var + eps)
    shift = beta - running_mean * scale
    bn(y) = scale * y + shift

Unfused, a ResNet block's ``relu(bn(conv(x)) + shortcut)`` makes four arrays
after the convolution: BatchNorm's output, ReLU's mask (kept for a backward
that never comes under ``no_grad``), the sum, its mask.  :func:`conv_bn_eval`
applies ``scale`` and ``shift`` in place on the convolution's fresh output,
then adds the shortcut and takes the ReLU in place: no new array, two passes
fewer per block, and the same operations in the same order as the layers one
by one, so the numbers are equal bit for bit.

What was measured and dropped: folding the BatchNorm into the convolution's
weights, ``W'[o] = W[o] * scale[o]`` and ``b'[o] = shift[o] + b[o] * scale[o]``
(so ``bn(conv(x; W, b)) = conv(x; W', b')``), recomputed at every forward
since optimizers and ``load_state_dict`` change the weights in place, with
no cache to invalidate.  It saves the ``* scale`` pass over the output but
costs a pass over the weights, and ResNet18's weights (11.2 M values) are as
large as all its convolution outputs at batch 64 and far larger at batch 1-8.
ResNet18, 64x64 input, eval forward under ``no_grad``, CPU time of one thread
(BLAS on one thread; ``benchmarks/eval_fusion.py --one-thread``), medians of 9
alternated rounds::

    batch   layers one by one   in place (this module)   folded weights
      1         10.76 ms              10.70 ms              12.60 ms
      8         41.03 ms              40.41 ms              42.97 ms
     64        302.8  ms             296.4  ms             302.0  ms

so the in-place epilogue gains about 2 % at batch 64 and nothing measurable
at batch 1-8; folding loses 0-17 %.  Wall clock on the two cores, BLAS on two
threads, medians of 9 (``benchmarks/eval_fusion.py``, a quiet moment): batch 64
194.4 -> 189.0 ms, batch 8 33.9 -> 32.9 ms, batch 1 11.26 -> 10.75 ms.  (Folding only the layers whose weights
are smaller than their output, the stem and layer1-2 at batch 64, measured as
the in-place version: 296.7 ms.)  The forward's time is the convolutions'.

Used only where no backward can follow: ``not module.training and not
is_grad_enabled()`` (:func:`can_fuse`), by :class:`tinynet.nn.BasicBlock` and
the ResNet stem.  With gradients enabled, or in training mode, the layers run
one by one as always (the backward needs each layer's cache, and training
BatchNorm uses batch statistics).

**ReLU and max pooling commute**, in training too (:func:`pool_before_relu`).
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

from .. import backend
from .activation import ReLU
from .conv import Conv2d
from .layout import channel_matrix, from_channel_matrix
from .module import is_grad_enabled
from .norm import BatchNorm2d

__all__ = ["can_fuse", "batch_norm_scale_shift", "conv_bn_eval", "conv_bn_eval_plain", "pool_before_relu"]


def pool_before_relu(layers) -> list:
    """``layers`` in the order to run them: every ``ReLU`` directly followed by a ``MaxPool2d`` swapped with it.

    Exact types only (a subclass may compute something else); see the module docstring for why
    the two orders give the same outputs and gradients.  The backward runs the returned list
    reversed.
    """
    from .pool import MaxPool2d

    order = list(layers)
    i = 0
    while i + 1 < len(order):
        if type(order[i]) is ReLU and type(order[i + 1]) is MaxPool2d:
            order[i], order[i + 1] = order[i + 1], order[i]
            i += 2
        else:
            i += 1
    return order


def can_fuse(owner, conv, bn, relu=None) -> bool:
    """Whether ``owner``'s ``conv -> bn (-> relu)`` may run as :func:`conv_bn_eval`.

    Only in evaluation mode without gradients, and only for the exact layer types whose
    eval forward the fusion reproduces (a subclass may do something else).
    """
    return (not owner.training and not is_grad_enabled()
            and type(conv) is Conv2d and type(bn) is BatchNorm2d and not bn.training
            and bn.track_running_stats and bn.num_features == conv.out_channels
            and (relu is None or type(relu) is ReLU))


def batch_norm_scale_shift(bn, dtype):
    """BatchNorm's eval map as ``(scale, shift)``, each ``(C,)`` in ``dtype``: ``bn(y) = scale * y + shift``.

    Computed as :func:`tinynet.nn.norm.batch_norm_forward_eval` does, operation for
    operation, so that :func:`conv_bn_eval` gives its numbers bit for bit.
    """
    xp = backend.get_array_module(bn.running_var)
    if bn.affine:
        gamma, beta = bn.weight.data, bn.bias.data
    else:
        gamma, beta = bn._gamma.astype(dtype, copy=False), bn._beta.astype(dtype, copy=False)  # as _affine_params
    inv_std = 1.0 / xp.sqrt(bn.running_var + bn.eps)
    scale = (gamma * inv_std).astype(dtype, copy=False)
    shift = (beta - bn.running_mean * gamma * inv_std).astype(dtype, copy=False)
    return scale, shift


def conv_bn_eval(conv, bn, x, relu: bool = False, residual=None):
    """``relu(bn(conv(x)) + residual)`` for evaluation without gradients, in one array.

    Parameters
    ----------
    conv : Conv2d;  bn : BatchNorm2d in eval mode (check with :func:`can_fuse`)
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
    y2 = channel_matrix(out)  # (C_out, M): a view of the convolution's fresh (C_out, OH, OW, N) array
    y2 *= scale[:, None]  # bn(y) = scale * y + shift, in place
    y2 += shift[:, None]
    # y2 is the array written above (a view of ``out``'s memory, or a copy if that layout had none),
    # so the result is built from it, not from ``out``.
    y = from_channel_matrix(y2, out.shape)
    if residual is not None:
        y += residual  # NCHW views of both: no copy whatever the shortcut's layout
    if relu:
        xp.maximum(y, 0, out=y)
    return y


def conv_bn_eval_plain(conv, bn, x, relu: bool = False, residual=None):
    """The layers one by one: what :func:`conv_bn_eval` computes (the tests' oracle)."""
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    if relu:
        y = backend.get_array_module(y).maximum(y, 0)
    return y
