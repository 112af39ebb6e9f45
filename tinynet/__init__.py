"""tinynet: a neural-network library written from scratch in NumPy, with CuPy as its GPU backend.

No autograd: every layer has a hand-written forward and an analytic backward,
checked against finite differences (:mod:`tinynet.gradcheck`).

Layers (bottom to top): :mod:`tinynet.backend` (NumPy or CuPy), :mod:`tinynet.nn`
(layers, losses), :mod:`tinynet.optim`, then models, data and training.

Importing tinynet changes nothing in the host process: the allocator tuning
that speeds up training on glibc, :func:`tinynet.backend.keep_freed_host_memory`,
is an explicit call that a training script (or ``fit``) makes.
"""
from . import backend, gradcheck, nn, optim
from .nn.module import enable_grad, is_grad_enabled, no_grad
from .random import manual_seed

__version__ = "0.1.0"

__all__ = ["backend", "nn", "optim", "gradcheck", "manual_seed", "no_grad", "enable_grad", "is_grad_enabled",
           "__version__"]
