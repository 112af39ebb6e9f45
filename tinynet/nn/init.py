"""Weight initialisation, matching PyTorch's defaults.

PyTorch initialises ``Conv2d`` and ``Linear`` weights with
``kaiming_uniform_(w, a=sqrt(5))``.  With leaky-ReLU slope ``a`` the gain is
``sqrt(2 / (1 + a^2)) = sqrt(1/3)``, the standard deviation ``gain / sqrt(fan_in)``
and the uniform bound ``sqrt(3) * std``, which simplifies to

    W ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),    b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))

where ``fan_in = C_in * KH * KW`` (``in_features`` for Linear).  torchvision's
ResNet replaces the conv weights with ``kaiming_normal_(mode="fan_out",
nonlinearity="relu")``: ``W ~ N(0, 2 / fan_out)``, ``fan_out = C_out*KH*KW``
(:func:`kaiming_normal_fan_out`; applied to a whole model by
:func:`tinynet.models.resnet.kaiming_init_`).

All draws happen on the host with a :class:`numpy.random.Generator`, in float64,
then cast, so a given seed gives the same weights on every device and dtype.
"""
from __future__ import annotations

import math

import numpy as np

from ..random import get_rng

__all__ = ["fan_in_and_fan_out", "uniform_fan_in", "kaiming_normal_fan_out"]


def fan_in_and_fan_out(shape) -> tuple:
    """``(fan_in, fan_out)`` of a weight of ``shape`` ``(out, in, *kernel)``."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def uniform_fan_in(shape, fan_in: int, rng=None, dtype=np.float32):
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's default for conv/linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return get_rng(rng).uniform(-bound, bound, size=shape).astype(dtype)


def kaiming_normal_fan_out(shape, rng=None, dtype=np.float32):
    """``N(0, 2 / fan_out)``: He initialisation for a conv followed by ReLU (torchvision ResNet)."""
    _, fan_out = fan_in_and_fan_out(shape)
    return (get_rng(rng).standard_normal(size=shape) * math.sqrt(2.0 / fan_out)).astype(dtype)
