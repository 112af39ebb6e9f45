"""Layers, losses and containers, each with a hand-written forward and backward.

One module per family: :mod:`~tinynet.nn.conv`, :mod:`~tinynet.nn.linear`,
:mod:`~tinynet.nn.pool`, :mod:`~tinynet.nn.norm`, :mod:`~tinynet.nn.activation`,
:mod:`~tinynet.nn.dropout`, :mod:`~tinynet.nn.shape`, :mod:`~tinynet.nn.residual`,
:mod:`~tinynet.nn.loss`, :mod:`~tinynet.nn.functional`,
:mod:`~tinynet.nn.regularization`.  Each family module states its math and
shapes at the top and exposes pure ``*_forward`` / ``*_backward`` functions
beside the layer class that wraps them.
"""
from .activation import ReLU, Softmax
from .conv import Conv2d
from .dropout import Dropout
from .functional import log_softmax, logsumexp, sigmoid, softmax, softmax_jacobian
from .linear import Linear
from .loss import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, NLLLoss
from .module import (Identity, LoadResult, Module, Parameter, Sequential, StateDictError, enable_grad,
                     is_grad_enabled, no_grad)
from .norm import BatchNorm1d, BatchNorm2d, LayerNorm
from .pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .regularization import L2Penalty
from .residual import BasicBlock
from .shape import Flatten

__all__ = [
    "Module", "Parameter", "Sequential", "Identity", "LoadResult", "StateDictError",
    "no_grad", "enable_grad", "is_grad_enabled",
    "Conv2d", "Linear", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm1d", "BatchNorm2d", "LayerNorm",
    "ReLU", "Softmax", "Dropout", "Flatten", "BasicBlock",
    "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss", "L2Penalty",
    "log_softmax", "logsumexp", "softmax", "sigmoid", "softmax_jacobian",
]
