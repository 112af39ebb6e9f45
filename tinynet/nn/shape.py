"""Flatten: a reshape, whose gradient is the reverse reshape."""
from __future__ import annotations

from .module import Module
from .validation import check_grad

__all__ = ["Flatten"]


class Flatten(Module):
    """``Flatten(start_dim=1, end_dim=-1)``: (N, C, H, W) -> (N, C*H*W) in NCHW order, as PyTorch."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def forward(self, x):
        nd = x.ndim
        start = self.start_dim % nd
        end = self.end_dim % nd
        if start > end:
            raise ValueError(
                f"{self._describe()}: start_dim {self.start_dim} comes after end_dim {self.end_dim} "
                f"for input of shape {tuple(x.shape)}"
            )
        size = 1
        for s in x.shape[start:end + 1]:
            size *= s
        out_shape = x.shape[:start] + (size,) + x.shape[end + 1:]
        self._save_for_backward(x.shape, out_shape, x.dtype)
        return x.reshape(out_shape)

    def backward(self, dout):
        shape, out_shape, dtype = self._saved_for_backward()
        check_grad(self, dout, out_shape, dtype)
        return dout.reshape(shape)
