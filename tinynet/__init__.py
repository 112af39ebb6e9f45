"""tinynet: a neural-network library written from scratch in NumPy, with CuPy as its GPU backend.

No autograd: every layer has a hand-written forward and an analytic backward,
checked against finite differences (:mod:`tinynet.gradcheck`).

Layers (bottom to top): :mod:`tinynet.backend` (NumPy or CuPy), :mod:`tinynet.nn`
(layers, losses), :mod:`tinynet.optim`, then models, data and training.

Importing tinynet changes nothing in the host process: the allocator tuning
that speeds up training on glibc, :func:`tinynet.backend.keep_freed_host_memory`,
is an explicit call that a training script (or ``fit``) makes.

Every layer has two paths: the plain NCHW functions at the top of its family
module (the math, as in docs/derivations.md) and the fast path of
:mod:`tinynet.nn.fast`, used by default.  ``TINYNET_FAST=0`` in the
environment, or :func:`fast_path` (``tinynet.fast_path(False)``, or ``with
tinynet.fast_path(False):``), runs everything on the plain path.
docs/reading-guide.md says in which order to read the library.
"""
from . import backend, gradcheck, nn, optim
from .nn.fast import fast_path
from .nn.module import enable_grad, is_grad_enabled, no_grad
from .random import manual_seed

__version__ = "0.1.0"

__all__ = ["backend", "nn", "optim", "gradcheck", "manual_seed", "no_grad", "enable_grad", "is_grad_enabled",
           "fast_path", "__version__"]
