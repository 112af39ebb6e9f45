"""Input checks shared by the layers, so every user error says where, what was expected and what came."""
from __future__ import annotations

import numpy as np

__all__ = ["check_input", "check_float", "check_grad"]


def check_float(layer, x, what: str = "input") -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{layer._describe()}: {what} must be a NumPy or CuPy array, got {type(x).__name__}")
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(
            f"{layer._describe()}: {what} must be a floating-point array (float32 or float64), "
            f"got dtype {dtype}; convert images with x.astype(np.float32)"
        )


def check_input(layer, x, expected: str, ndim, channels=None, channel_axis: int = 1) -> None:
    """Check rank, channel count and dtype of ``x``.

    ``expected`` is the shape spelled for humans, e.g. ``"(N, 64, H, W)"``;
    ``ndim`` is an int or a tuple of allowed ranks.
    """
    check_float(layer, x)
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in ranks or (channels is not None and x.shape[channel_axis] != channels):
        raise ValueError(f"{layer._describe()}: expected input of shape {expected}, received {tuple(x.shape)}")
    for p in layer._parameters.values():
        layer._check_device(x, p.data)
        if p.data.dtype != x.dtype:
            raise ValueError(
                f"{layer._describe()}: input dtype {x.dtype} does not match the layer's {p.data.dtype}; "
                f"cast the input or call model.to(dtype=...)"
            )
        break


def check_grad(layer, dout, shape, dtype) -> None:
    """Check that the upstream gradient ``dout`` has the shape and dtype of the forward's output.

    Catches ``model.backward(loss)`` (the loss, where ``loss_fn.backward()``
    belongs) before NumPy fails somewhere deeper, or broadcasts it silently.
    """
    got_shape, got_dtype = tuple(getattr(dout, "shape", ())), getattr(dout, "dtype", type(dout).__name__)
    if got_shape != tuple(shape) or got_dtype != dtype:
        raise ValueError(
            f"{layer._describe()}: backward expected dL/d(output) of shape {tuple(shape)} and dtype {dtype}, like "
            f"the forward's output, received {got_shape} {got_dtype}; pass loss_fn.backward(), not the loss"
        )
