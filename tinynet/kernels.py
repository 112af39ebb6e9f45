"""Fused CUDA kernels for the GPU backend (CuPy), each the twin of a NumPy-style function.

Every layer's code is written once against an array module and runs on CuPy
as it is.  On the GPU, though, a chain of small element-wise operations is
slow for two reasons: every operation is a kernel launch (a few microseconds
of host time each), and every operation reads and writes whole arrays in
GPU memory.  The kernels here fuse the chains that dominate a training step
into one pass each:

==========================  ==========================================  ==========================
kernel                      replaces                                    used by
==========================  ==========================================  ==========================
``im2col``                  KH*KW strided copies and border zeroing     conv forward
``col2im``                  KH*KW strided additions; a *gather*: each   conv backward
                            pixel sums its own contributions, in a
                            fixed order (deterministic, no atomics)
``max_pool_forward``        KH*KW compare/select passes                 max pooling
``max_pool_backward``       KH*KW routing passes (a gather again)       max pooling
``relu_backward``           compare + multiply                          ReLU
``batch_norm_normalize``    4 passes (centre, scale, gamma, beta)       BatchNorm forward
``batch_norm_backward_dx``  4 passes                                    BatchNorm backward
``adam_update``             13 passes per parameter                     Adam, AdamW
==========================  ==========================================  ==========================

Each kernel computes exactly the formula of the NumPy code it replaces (see
that code's docstring); ``tests/gpu`` compares every kernel with the NumPy
result.  Set ``TINYNET_FUSED_KERNELS=0`` to run the plain CuPy code instead
(to compare, or to rule a kernel out when hunting a bug).

Layout conventions are the layers': activations are channels-first and
batch-last, (C, H, W, N), contiguous (see :mod:`tinynet.nn.layout`).  Inside
an element-wise kernel ``i`` is the index of the output element and names
``i``, ``n`` and ``_*`` are reserved by CuPy, so batch indices are called
``b``.  All kernels are compiled on first use and cached by CuPy.
"""
from __future__ import annotations

import functools
import os

from . import backend

__all__ = ["enabled", "im2col", "col2im", "max_pool_forward", "max_pool_backward", "relu_backward",
           "batch_norm_normalize", "batch_norm_backward_dx", "adam_update"]


def enabled(x) -> bool:
    """Whether to use a fused kernel for array ``x``: a CuPy array, and not switched off."""
    return backend.is_cupy_array(x) and os.environ.get("TINYNET_FUSED_KERNELS", "1") != "0"


def _cupy():
    import cupy

    return cupy


_GEOMETRY = ("int32 H, int32 W, int32 N, int32 KH, int32 KW, int32 OH, int32 OW, int32 SH, int32 SW, "
             "int32 PH, int32 PW")

# The gather kernels (col2im, max-pool backward) run once per input pixel: element i is pixel (c, y, z, b)
# of a (C, H, W, N) array, and it visits every (kernel cell, output position) that read it, i.e. every
# (ki, kj, oy, ox) with oy*SH + ki - PH == y and ox*SW + kj - PW == z, in a fixed order.
_PIXEL_INDEX = """
        ptrdiff_t t = i;
        const int b = t % N; t /= N;
        const int z = t % W; t /= W;
        const int y = t % H;
        const ptrdiff_t c = t / H;
"""
_FOR_EACH_READER = """
        for (int ki = 0; ki < KH; ++ki) {{
            const int ry = y + PH - ki;
            if (ry < 0 || ry % SH) continue;
            const int oy = ry / SH;
            if (oy >= OH) continue;
            for (int kj = 0; kj < KW; ++kj) {{
                const int rz = z + PW - kj;
                if (rz < 0 || rz % SW) continue;
                const int ox = rz / SW;
                if (ox >= OW) continue;{body}
            }}
        }}
"""

# name -> (input parameters, output parameters, loop body, preamble), in CuPy's ElementwiseKernel syntax.
# Kept as plain data so that tests/test_kernels_source.py can compile the same bodies as C++ on the CPU
# and check their index arithmetic against NumPy on machines without a GPU.
SOURCES = {
    "im2col": (
        f"raw T x, {_GEOMETRY}", "T col",
        """
        // Output element i is (c, ki, kj, oy, ox, b) of col (C, KH, KW, OH, OW, N).
        ptrdiff_t t = i;
        const int b = t % N; t /= N;
        const int ox = t % OW; t /= OW;
        const int oy = t % OH; t /= OH;
        const int kj = t % KW; t /= KW;
        const int ki = t % KH;
        const ptrdiff_t c = t / KH;
        const int y = oy * SH + ki - PH, z = ox * SW + kj - PW;   // the input pixel it reads
        col = (y >= 0 && y < H && z >= 0 && z < W) ? x[((c * H + y) * W + z) * N + b] : (T)0;
        """, ""),
    "col2im": (
        f"raw T dcol, {_GEOMETRY}", "T dx",
        _PIXEL_INDEX + """
        T acc = 0;
        """ + _FOR_EACH_READER.format(body="""
                acc += dcol[((((c * KH + ki) * KW + kj) * OH + oy) * OW + ox) * N + b];""") + """
        dx = acc;
        """, ""),
    "max_pool_forward": (
        f"raw T x, {_GEOMETRY}", "T out, S argmax",
        """
        // Output element i is (c, oy, ox, b) of (C, OH, OW, N).
        ptrdiff_t t = i;
        const int b = t % N; t /= N;
        const int ox = t % OW; t /= OW;
        const int oy = t % OH;
        const ptrdiff_t c = t / OH;
        T best = -CUDART_INF_F;
        int arg = 0;
        for (int ki = 0; ki < KH; ++ki) {
            const int y = oy * SH + ki - PH;
            if (y < 0 || y >= H) continue;              // padding reads -inf: never the maximum
            for (int kj = 0; kj < KW; ++kj) {
                const int z = ox * SW + kj - PW;
                if (z < 0 || z >= W) continue;
                const T v = x[((c * H + y) * W + z) * N + b];
                if (v > best) { best = v; arg = ki * KW + kj; }   // strict: the first maximum wins
            }
        }
        out = best;
        argmax = arg;
        """, "#include <math_constants.h>"),
    "max_pool_backward": (
        f"raw T dout, raw S argmax, {_GEOMETRY}", "T dx",
        _PIXEL_INDEX + """
        T acc = 0;   // the dout of every window whose maximum this pixel was
        """ + _FOR_EACH_READER.format(body="""
                const ptrdiff_t o = ((c * OH + oy) * OW + ox) * N + b;
                if (argmax[o] == ki * KW + kj) acc += dout[o];""") + """
        dx = acc;
        """, ""),
    "relu_backward": ("T dy, T y", "T dx", "dx = y > (T)0 ? dy : (T)0;", ""),
    "batch_norm_normalize": (
        "T x, raw T mean, raw T inv_std, raw T gamma, raw T beta, int64 m", "T xhat, T y",
        """
        const ptrdiff_t c = i / m;                      // row of the (C, M) channel matrix
        xhat = (x - mean[c]) * inv_std[c];
        y = xhat * gamma[c] + beta[c];
        """, ""),
    "batch_norm_backward_dx": (
        "T dy, T xhat, raw T k, raw T dbeta_m, raw T dgamma_m, int64 m", "T dx",
        """
        const ptrdiff_t c = i / m;
        dx = k[c] * (dy - dbeta_m[c] - xhat * dgamma_m[c]);
        """, ""),
    "adam_update": (
        "T g, T b1, T b2, T step_size, T sqrt_bc2, T eps", "T p, T m, T v",
        """
        m = b1 * m + (1 - b1) * g;
        v = b2 * v + (1 - b2) * g * g;
        p -= step_size * m / (sqrt(v) / sqrt_bc2 + eps);
        """, ""),
}


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    in_params, out_params, body, preamble = SOURCES[name]
    return _cupy().ElementwiseKernel(in_params, out_params, body, f"tinynet_{name}", preamble=preamble)


def _geometry(h, w, n, kernel, stride, padding, oh, ow):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return (h, w, n, kh, kw, oh, ow, sh, sw, ph, pw)


def im2col(xc, kernel, stride, padding, oh, ow, out):
    """``out`` (C, KH, KW, OH, OW, N) <- receptive fields of ``xc`` (C, H, W, N); see :func:`tinynet.nn.conv.im2col`."""
    cp = _cupy()
    xc = cp.ascontiguousarray(xc)
    c, h, w, n = xc.shape
    _kernel("im2col")(xc, *_geometry(h, w, n, kernel, stride, padding, oh, ow), out)
    return out


def col2im(dcol, x_chwn_shape, kernel, stride, padding, oh, ow):
    """dx (C, H, W, N) from ``dcol`` (C, KH, KW, OH, OW, N); see :func:`tinynet.nn.conv.col2im`."""
    cp = _cupy()
    c, h, w, n = x_chwn_shape
    dx = cp.empty(x_chwn_shape, dtype=dcol.dtype)
    _kernel("col2im")(cp.ascontiguousarray(dcol), *_geometry(h, w, n, kernel, stride, padding, oh, ow), dx)
    return dx


def max_pool_forward(xc, kernel, stride, padding, oh, ow, index_dtype):
    """``(out, argmax)``, both (C, OH, OW, N); see :func:`tinynet.nn.pool.max_pool2d_forward`."""
    cp = _cupy()
    xc = cp.ascontiguousarray(xc)
    c, h, w, n = xc.shape
    out = cp.empty((c, oh, ow, n), dtype=xc.dtype)
    argmax = cp.empty((c, oh, ow, n), dtype=index_dtype)
    _kernel("max_pool_forward")(xc, *_geometry(h, w, n, kernel, stride, padding, oh, ow), out, argmax)
    return out, argmax


def max_pool_backward(doutc, argmax, x_chwn_shape, kernel, stride, padding):
    """dx (C, H, W, N); see :func:`tinynet.nn.pool.max_pool2d_backward`."""
    cp = _cupy()
    c, h, w, n = x_chwn_shape
    oh, ow = argmax.shape[1:3]
    dx = cp.empty(x_chwn_shape, dtype=doutc.dtype)
    _kernel("max_pool_backward")(cp.ascontiguousarray(doutc), argmax,
                                 *_geometry(h, w, n, kernel, stride, padding, oh, ow), dx)
    return dx


def relu_backward(dy, y):
    """``dy * [y > 0]`` in one pass."""
    return _kernel("relu_backward")(dy, y)


def batch_norm_normalize(x2, mean, inv_std, gamma, beta):
    """``(xhat, y)`` of a (C, M) channel matrix in one pass; see :func:`tinynet.nn.norm.batch_norm_forward_train`."""
    return _kernel("batch_norm_normalize")(x2, mean, inv_std, gamma.astype(x2.dtype, copy=False),
                                           beta.astype(x2.dtype, copy=False), x2.shape[1])


def batch_norm_backward_dx(dy2, xhat, k, dbeta, dgamma):
    """``dx = k (dy - dbeta/M - xhat dgamma/M)`` in one pass; see :func:`tinynet.nn.norm.batch_norm_backward_train`."""
    m = dy2.shape[1]
    return _kernel("batch_norm_backward_dx")(dy2, xhat, k, dbeta / m, dgamma / m, m)


def adam_update(p, g, m, v, b1, b2, step_size, sqrt_bc2, eps) -> None:
    """Adam's moment updates and parameter step for one parameter, in place, in one pass."""
    dt = p.dtype.type
    _kernel("adam_update")(g, dt(b1), dt(b2), dt(step_size), dt(sqrt_bc2), dt(eps), p, m, v)
