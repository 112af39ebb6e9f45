"""Winograd minimal filtering F(m x m, 3 x 3): stride-1 3x3 convolution with fewer multiplications.

Notation as in :mod:`tinynet.nn.conv` (N, C, C_out, H, W, PH, PW, OH, OW),
and for the tiles (derivation in docs/derivations.md, section 10)::

    m          output tile size (2 for F(2x2,3x3), 4 for F(4x4,3x3))
    alpha      input tile size, m + 2; neighbouring input tiles overlap by 2
    TH, TW     tiles per column and row:  TH = ceil(OH / m), TW = ceil(OW / m)
    P          tiles of the whole batch:  P = TH * TW * N, ordered (TH, TW, N)
    B^T, G, A^T   the (alpha, alpha), (alpha, 3), (m, alpha) transform matrices
    g          one 3x3 filter w[o, c];   d  one alpha x alpha input tile

One output tile of one filter over one input channel is
``Y = A^T [(G g G^T) * (B^T d B)] A`` (``*`` element-wise), exact in exact
arithmetic.  Summed over the input channels the element-wise product becomes,
for each of the alpha^2 tile positions (a, b), one matrix product::

    U[(a,b)] (C_out, C) = (G g G^T)[a, b]         for every (o, c)    weights
    V[(a,b)] (C, P)     = (B^T d B)[a, b]         for every (c, tile) input
    M[(a,b)] (C_out, P) = U[(a,b)] @ V[(a,b)]     alpha^2 GEMMs, one batched matmul
    Y tile              = A^T M A                 for every (o, tile)

so a 3x3 output position costs alpha^2/m^2 multiplications per (o, c) pair
(4 for F(2,3), 2.25 for F(4,3)) instead of 9.  V is laid out
``(alpha, alpha, C, TH, TW, N)``: the tile axes (TH, TW, N) follow the CHWN
order of the activations (:mod:`tinynet.nn.fast.layout`), so the output transform
writes straight into a ``(C_out, OH, OW, N)`` buffer, returned as an NCHW view
like every convolution's.

The backward is the exact adjoint (transpose) of each linear step of the
forward, not a second Winograd convolution (with ``dY`` the upstream gradient,
zero-padded to whole tiles)::

    dM   = A dY A^T                    per (o, tile)
    dU   = dM @ V^T                    batched, summed over the P tiles
    dW   = G^T dU G                    per (o, c)
    dV   = U^T @ dM                    batched
    dx   = B dV B^T                    per tile, added (+=) where the tile was read

The forward keeps V (alpha^2/m^2 times the input: 4x for F(2,3), 2.25x for
F(4,3)) for the backward, instead of im2col's 9x.

The transforms B^T d B and A^T M A are applied one axis at a time as sums and
differences of strided slices (the matrices are sparse, their entries 0, +-1
and small integers), written into preallocated arrays with ``out=``, one block
of channels at a time so that the intermediates stay in cache
(:data:`BLOCK_BYTES`).  :func:`winograd_conv2d_loops` is the plain per-tile
version of the same algorithm, the tests' check of the fast one.

Which algorithm a layer uses is chosen by measurement in
:func:`tinynet.nn.fast.conv.choose_algorithm`; :func:`tinynet.nn.fast.conv.algorithm`
forces one.  F(2,3) keeps float32 errors within 2.5x of PyTorch's; F(4,3) is 20-40x worse, so
it is never chosen by default.  Timings and error measurements: docs/performance.md.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ... import backend
from .layout import channel_matrix, from_chwn, to_chwn
from .gemm import matmul, owns_threads
from .threads import for_channel_blocks
from .workspace import scratch

__all__ = ["WinogradCache", "Transform", "transform", "winograd_weights", "input_transform",
           "winograd_forward", "winograd_backward", "v_shape", "winograd_conv2d_loops"]


class Transform(NamedTuple):
    """The matrices of F(m x m, 3 x 3) (Lavin & Gray 2016), float64."""

    m: int
    alpha: int
    BT: np.ndarray   #: (alpha, alpha) input transform B^T
    G: np.ndarray    #: (alpha, 3) filter transform
    AT: np.ndarray   #: (m, alpha) output transform A^T


def _f2():
    # Interpolation points 0, 1, -1 and infinity (derivation in docs/derivations.md, section 10).
    BT = [[1, 0, -1, 0],
          [0, 1, 1, 0],
          [0, -1, 1, 0],
          [0, 1, 0, -1]]
    G = [[1, 0, 0],
         [1 / 2, 1 / 2, 1 / 2],
         [1 / 2, -1 / 2, 1 / 2],
         [0, 0, 1]]
    AT = [[1, 1, 1, 0],
          [0, 1, -1, -1]]
    return Transform(2, 4, np.array(BT, float), np.array(G, float), np.array(AT, float))


def _f4():
    # Interpolation points 0, 1, -1, 2, -2 and infinity.
    BT = [[4, 0, -5, 0, 1, 0],
          [0, -4, -4, 1, 1, 0],
          [0, 4, -4, -1, 1, 0],
          [0, -2, -1, 2, 1, 0],
          [0, 2, -1, -2, 1, 0],
          [0, 4, 0, -5, 0, 1]]
    G = [[1 / 4, 0, 0],
         [-1 / 6, -1 / 6, -1 / 6],
         [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6],
         [0, 0, 1]]
    AT = [[1, 1, 1, 1, 1, 0],
          [0, 1, -1, 2, -2, 0],
          [0, 1, 1, 4, 4, 0],
          [0, 1, -1, 8, -8, 1]]
    return Transform(4, 6, np.array(BT, float), np.array(G, float), np.array(AT, float))


_TRANSFORMS = {2: _f2(), 4: _f4()}


def transform(m: int) -> Transform:
    """The matrices of F(m x m, 3 x 3), m = 2 or 4."""
    return _TRANSFORMS[m]


class WinogradCache(NamedTuple):
    """What :func:`winograd_backward` needs from :func:`winograd_forward`."""

    V: object          #: (alpha^2, C, P) transformed input tiles (the col_buffer, when one was given)
    U: object          #: (alpha^2, C_out, C) transformed weights
    x_shape: tuple     #: (N, C, H, W)
    weight: object     #: (C_out, C, 3, 3), the weight the forward used
    padding: tuple     #: (PH, PW)
    has_bias: bool
    m: int             #: output tile size


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------
def _tiles(h, w, padding, m):
    """``(OH, OW, TH, TW)`` of a stride-1 3x3 convolution of an H x W input."""
    oh, ow = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    return oh, ow, -(-oh // m), -(-ow // m)


def v_shape(x_shape, padding, m):
    """Shape ``(alpha^2, C, P)`` of the transformed input V of ``x_shape`` (N, C, H, W)."""
    n, c, h, w = x_shape
    _, _, th, tw = _tiles(h, w, padding, m)
    return ((m + 2) ** 2, c, th * tw * n)


def _every(a, axis, start, count, step):
    """``count`` entries of ``a`` along ``axis`` from ``start`` every ``step`` (a view)."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, start + step * (count - 1) + 1, step)
    return a[tuple(index)]


# ---------------------------------------------------------------------------
# out = sum_j mat[i, j] * src[j] for every row i, as sums of whole arrays
# ---------------------------------------------------------------------------
def _terms(row):
    """Nonzero ``(j, coef)`` of a matrix row, the +-1 entries first (they need no multiplication)."""
    nz = [(j, float(c)) for j, c in enumerate(row) if c != 0]
    return sorted(nz, key=lambda t: abs(t[1]) != 1)


def _combine(xp, terms, src, out, tmp, accumulate=False):
    """``out = sum coef * src[j]`` over ``terms`` ((j, coef) pairs), with ``out=`` and scratch ``tmp``.

    ``accumulate``: ``out += ...`` instead (the overlapping rows and columns of neighbouring tiles).
    """
    (j0, c0), rest = terms[0], terms[1:]
    if accumulate:
        rest = terms
    elif rest and abs(c0) == 1 and abs(rest[0][1]) == 1:   # the first two terms in one add/subtract
        (j1, c1), rest = rest[0], rest[1:]
        if c0 == c1:
            xp.add(src[j0], src[j1], out=out)
            if c0 < 0:
                xp.negative(out, out=out)
        elif c0 > 0:
            xp.subtract(src[j0], src[j1], out=out)
        else:
            xp.subtract(src[j1], src[j0], out=out)
    elif c0 == 1:
        out[...] = src[j0]
    else:
        xp.multiply(src[j0], c0, out=out)
    for j, c in rest:
        if c == 1:
            xp.add(out, src[j], out=out)
        elif c == -1:
            xp.subtract(out, src[j], out=out)
        else:
            xp.multiply(src[j], c, out=tmp)
            xp.add(out, tmp, out=out)
    return out


def _scratch_like(name, shape, like):
    """This thread's scratch buffer ``name`` (:func:`tinynet.nn.fast.workspace.scratch`): used only inside one call."""
    return scratch(name, shape, like.dtype, like=like)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
def winograd_weights(w, m):
    """``U = G g G^T`` for every filter, as ``(alpha^2, C_out, C)``.

    With ``kron(G, G)`` (alpha^2, 9), ``U[(a,b), (o,c)] = sum_(k,l) G[a,k] G[b,l] w[o,c,k,l]``
    is one matrix product ``kron(G, G) @ w2d.T``.
    """
    xp = backend.get_array_module(w)
    t = transform(m)
    c_out, c = w.shape[:2]
    gg = xp.asarray(np.kron(t.G, t.G), dtype=w.dtype)
    return matmul(gg, w.reshape(c_out * c, 9).T).reshape(t.alpha ** 2, c_out, c)


#: Bytes of one channel block's intermediates (padded rows, half-transformed tiles).  The
#: transforms are memory-bound: a block whose intermediates stay in cache between the passes of a
#: transform is read from memory once.  4 MB was the fastest block size measured
#: (docs/performance.md, "Winograd").
BLOCK_BYTES = 4 << 20


def _for_blocks(fn, c, bytes_per_channel, like):
    """``fn(cs)`` for every slice ``cs`` of the channel axis holding about :data:`BLOCK_BYTES` of intermediates.

    The blocks are :func:`tinynet.nn.fast.threads.for_channel_blocks`'s, shared between the host
    threads when the products run on those threads too (:func:`~tinynet.nn.fast.gemm.owns_threads`);
    with BLAS's own threads spinning beside them, a second host thread was measured slower, so
    then all run on the calling thread (docs/performance.md).  On the GPU, one block.
    """
    for_channel_blocks(c, bytes_per_channel // like.itemsize, lambda a, b: fn(slice(a, b)), like,
                       block_elements=BLOCK_BYTES // like.itemsize, threads=owns_threads())


def _pad_block(xc, padding, hp, wp):
    """Channels ``xc`` (cb, H, W, N) zero-padded to ``(cb, Hp, Wp, N)``: a scratch buffer."""
    cb, h, w, n = xc.shape
    ph, pw = padding
    xpad = _scratch_like("winograd.xpad", (cb, hp, wp, n), xc)
    xpad[:, :ph] = 0
    xpad[:, ph + h:] = 0
    xpad[:, ph:ph + h, :pw] = 0
    xpad[:, ph:ph + h, pw + w:] = 0
    xpad[:, ph:ph + h, pw:pw + w] = xc
    return xpad


def _input_transform_block(xc, padding, t, th, tw, v):
    """``v`` (alpha, alpha, cb, TH, TW, N) <- ``B^T d B`` for every tile of the channels ``xc`` (cb, H, W, N)."""
    xp = backend.get_array_module(xc)
    m, al = t.m, t.alpha
    cb, n = xc.shape[0], xc.shape[3]
    hp = m * th + 2
    xpad = _pad_block(xc, padding, hp, m * tw + 2)              # (cb, Hp, Wp, N)
    # Columns first: along W a tile slice is a run of only N values, so the strided pass is
    # made over the smaller array (alpha x (cb, Hp, TW, N), not alpha^2 x (cb, TH, TW, N)).
    cols = [_every(xpad, 2, b, tw, m) for b in range(al)]      # each (cb, Hp, TW, N)
    t1 = _scratch_like("winograd.t1", (al, cb, hp, tw, n), xc)
    tmp = _scratch_like("winograd.tmp", (cb * hp * tw * n,), xc)
    tmp_c, tmp_v = tmp.reshape(cb, hp, tw, n), tmp[:cb * th * tw * n].reshape(cb, th, tw, n)
    for b in range(al):
        _combine(xp, _terms(t.BT[b]), cols, t1[b], tmp_c)      # T1[b'] = sum_b B^T[b', b] xpad[:, :, m*tw + b]
    for b in range(al):
        rows = [_every(t1[b], 1, a, th, m) for a in range(al)]  # each (cb, TH, TW, N)
        for a in range(al):
            _combine(xp, _terms(t.BT[a]), rows, v[a, b], tmp_v)  # V[a', b'] = sum_a B^T[a', a] T1[b'][m*th + a]


def input_transform(x, padding, m, out=None):
    """``V = B^T d B`` for every input tile ``d``, as ``(alpha^2, C, P)`` (``out`` if given).

    Tile (th, tw) of channel c is ``xpad[c, m*th : m*th + alpha, m*tw : m*tw + alpha]``.
    B^T is applied along the columns (``T1[b'] = sum_b B^T[b', b] xpad[:, :, m*tw + b]``, all tw
    at once through a strided slice), then along the rows, one block of channels at a time.
    """
    xp = backend.get_array_module(x)
    t = transform(m)
    al = t.alpha
    n, c, h, w = x.shape
    _, _, th, tw = _tiles(h, w, padding, m)
    if out is None:
        out = xp.empty((al * al, c, th * tw * n), dtype=x.dtype)
    v = out.reshape(al, al, c, th, tw, n)
    xc = to_chwn(x)                                             # (C, H, W, N), any strides
    hp, wp = m * th + 2, m * tw + 2
    per_channel = x.itemsize * n * (hp * wp + (al + 1) * hp * tw)
    _for_blocks(lambda cs: _input_transform_block(xc[cs], padding, t, th, tw, v[:, :, cs]), c, per_channel, x)
    return out


def _output_transform_block(mm, t, out, b):
    """``out`` (cb, OH, OW, N) <- ``A^T M A`` (+ b) for every tile; ``mm`` is (alpha, alpha, cb, TH, TW, N).

    Output row ``m*th + i`` is row i of tile th, so entry (i, j) of every tile is the strided
    slice ``out[:, i::m, j::m]``; the last tile row or column is cut where OH or OW is not a
    multiple of m.
    """
    xp = backend.get_array_module(mm)
    m, al = t.m, t.alpha
    cb, th, tw, n = mm.shape[2:]
    oh, ow = out.shape[1:3]
    t2 = _scratch_like("winograd.t2", (m, al, cb, th, tw, n), mm)
    tmp = _scratch_like("winograd.tmp_out", (al, cb, th, tw, n), mm)
    for i in range(m):
        _combine(xp, _terms(t.AT[i]), mm, t2[i], tmp)          # T2[i] = sum_a A^T[i,a] M[a]
    for i in range(m):
        ni = len(range(i, oh, m))                               # tiles with a row i inside the output
        for j in range(m):
            nj = len(range(j, ow, m))
            dst = out[:, i::m, j::m]                            # (cb, ni, nj, N)
            src = [t2[i, bb, :, :ni, :nj] for bb in range(al)]
            _combine(xp, _terms(t.AT[j]), src, dst, tmp[0, :, :ni, :nj])
    if b is not None:
        out += b[:, None, None, None]


def winograd_forward(x, w, b, padding=(1, 1), m=2, v_buffer=None):
    """Stride-1 3x3 convolution by F(m x m, 3 x 3); same result as :func:`tinynet.nn.fast.conv.conv2d_forward`.

    Parameters
    ----------
    x : (N, C, H, W)
    w : (C_out, C, 3, 3)
    b : (C_out,) or None
    padding : (PH, PW), any non-negative
    m : 2 or 4, the output tile size
    v_buffer : optional (alpha^2, C, P) array to hold V; the cache then refers to it, so its
        owner must not refill it before the backward of this call has run

    Returns
    -------
    out : (N, C_out, OH, OW), an NCHW view of a new (C_out, OH, OW, N) array
    cache : :class:`WinogradCache`
    """
    xp = backend.get_array_module(x)
    t = transform(m)
    al = t.alpha
    n, c, h, wd = x.shape
    c_out = w.shape[0]
    oh, ow, th, tw = _tiles(h, wd, padding, m)
    u = winograd_weights(w, m)                                   # (alpha^2, C_out, C)
    v = input_transform(x, padding, m, out=v_buffer)             # (alpha^2, C, P)
    mm = _scratch_like("winograd.m", (al * al, c_out, th * tw * n), x)
    matmul(u, v, out=mm)                                         # alpha^2 GEMMs (C_out, C) @ (C, P)
    mm = mm.reshape(al, al, c_out, th, tw, n)
    out = xp.empty((c_out, oh, ow, n), dtype=x.dtype)
    per_channel = x.itemsize * n * th * tw * (m + 1) * al
    _for_blocks(lambda cs: _output_transform_block(mm[:, :, cs], t, out[cs], None if b is None else b[cs]),
                c_out, per_channel, x)
    return from_chwn(out), WinogradCache(v, u, tuple(x.shape), w, tuple(padding), b is not None, m)


# ---------------------------------------------------------------------------
# Backward: the adjoint of every step above, in reverse order
# ---------------------------------------------------------------------------
def _output_adjoint_block(dy, t, dm):
    """``dm`` (alpha, alpha, cb, TH, TW, N) <- ``A dY A^T`` for every tile of ``dy`` (cb, OH, OW, N).

    Tiles reaching past the output read zeros.
    """
    xp = backend.get_array_module(dy)
    m, al = t.m, t.alpha
    cb, th, tw, n = dm.shape[2:]
    oh, ow = dy.shape[1:3]
    if oh != m * th or ow != m * tw:
        dyp = _scratch_like("winograd.dypad", (cb, m * th, m * tw, n), dy)
        dyp[:, oh:] = 0
        dyp[:, :oh, ow:] = 0
        dyp[:, :oh, :ow] = dy
        dy = dyp
    A = t.AT.T                                                   # (alpha, m)
    t3 = _scratch_like("winograd.t3", (m, al, cb, th, tw, n), dy)
    tmp = _scratch_like("winograd.tmp_out", (al, cb, th, tw, n), dy)
    for i in range(m):
        cols = [dy[:, i::m, j::m] for j in range(m)]            # entry (i, j) of every tile
        for bb in range(al):
            _combine(xp, _terms(A[bb]), cols, t3[i, bb], tmp[0])  # T3[i, b] = sum_j A[b, j] dY[i, j]
    for a in range(al):
        _combine(xp, _terms(A[a]), t3, dm[a], tmp)               # dM[a] = sum_i A[a, i] T3[i]


def _input_adjoint_block(dv, t, padding, dx):
    """``dx`` (cb, H, W, N) <- ``B dV B^T`` of every tile, added where the tile was read.

    ``dv`` is (alpha, alpha, cb, TH, TW, N).  The transposes of :func:`_input_transform_block`'s
    two passes in reverse order: first along the rows (``dT1[b'][:, m*th + a] = sum_a' B[a, a']
    dV[a', b']``), then along the columns, straight into dx, cropped of the padding.
    Neighbouring tiles overlap by 2 rows (columns), and a pixel read by two tiles receives both
    gradients: the first m rows (columns) of every tile cover the padded input once and are
    written with ``=``, the last 2 are then added with ``+=``.
    """
    xp = backend.get_array_module(dv)
    m, al = t.m, t.alpha
    cb, h, w, n = dx.shape
    ph, pw = padding
    th, tw = dv.shape[3:5]
    hp = m * th + 2
    B = t.BT.T                                                   # (alpha, alpha)
    tmp = _scratch_like("winograd.tmp", (cb * hp * tw * n,), dv)
    tmp_v = tmp[:cb * th * tw * n].reshape(cb, th, tw, n)
    dt1 = _scratch_like("winograd.t1", (al, cb, hp, tw, n), dv)
    for bb in range(al):
        dt1[bb][:, m * th:] = 0                                  # the last 2 rows, only added to
        src = dv[:, bb]                                          # (alpha, cb, TH, TW, N)
        for a in range(al):                                      # row a of every tile
            _combine(xp, _terms(B[a]), src, _every(dt1[bb], 1, a, th, m), tmp_v, accumulate=a >= m)
    # Columns straight into dx: padded column m*tw + b is column m*tw + b - PW of dx.
    dt1 = dt1[:, :, ph:ph + h]                                   # rows read from the padding: dropped
    dx[:, :, max(0, m * tw - pw):] = 0                           # columns only the last 2 tile columns reach
    for bb in range(al):                                         # column bb of every tile
        lo, hi = max(0, -(-(pw - bb) // m)), min(tw - 1, (w - 1 + pw - bb) // m)
        if lo > hi:
            continue                                             # column bb of every tile lies in the padding
        src = dt1[:, :, :, lo:hi + 1]
        dst = _every(dx, 2, m * lo + bb - pw, hi - lo + 1, m)
        _combine(xp, _terms(B[bb]), src, dst, tmp[:src[0].size].reshape(src[0].shape), accumulate=bb >= m)


def winograd_backward(dout, cache, need_dx=True):
    """Gradients of :func:`winograd_forward` (same contract as :func:`tinynet.nn.fast.conv.conv2d_backward`).

    Returns
    -------
    dx : (N, C, H, W), a new array (CHWN in memory), or None
    dw : (C_out, C, 3, 3)
    db : (C_out,) or None
    """
    xp = backend.get_array_module(dout)
    v, u, x_shape, w, padding, has_bias, m = cache
    t = transform(m)
    al = t.alpha
    n, c, h, wd = x_shape
    c_out = w.shape[0]
    _, _, th, tw = _tiles(h, wd, padding, m)
    dy = to_chwn(dout)                                           # (C_out, OH, OW, N) view
    db = channel_matrix(dout).sum(axis=1) if has_bias else None
    dm = _scratch_like("winograd.dm", (al, al, c_out, th, tw, n), dout)
    per_channel = dout.itemsize * n * th * tw * (m + 1) * al
    _for_blocks(lambda cs: _output_adjoint_block(dy[cs], t, dm[:, :, cs]), c_out, per_channel, dout)
    dm = dm.reshape(al * al, c_out, th * tw * n)
    du = matmul(dm, v.transpose(0, 2, 1))                        # (alpha^2, C_out, C): sum over tiles
    gg = xp.asarray(np.kron(t.G, t.G), dtype=du.dtype)
    dw = matmul(du.reshape(al * al, c_out * c).T, gg).reshape(w.shape)  # G^T dU G for every (o, c)
    dx = None
    if need_dx:
        dv = _scratch_like("winograd.dv", (al * al, c, th * tw * n), dm)
        matmul(u.transpose(0, 2, 1), dm, out=dv)                 # dV = U^T @ dM
        dv = dv.reshape(al, al, c, th, tw, n)
        dxc = xp.empty((c, h, wd, n), dtype=dout.dtype)
        hp = m * th + 2
        per_channel = dout.itemsize * n * (al + 1) * hp * tw
        _for_blocks(lambda cs: _input_adjoint_block(dv[:, :, cs], t, padding, dxc[cs]), c, per_channel, dout)
        dx = from_chwn(dxc)
    return dx, dw, db


# ---------------------------------------------------------------------------
# The plain version: one tile, one filter, one channel at a time
# ---------------------------------------------------------------------------
def winograd_conv2d_loops(x, w, b, padding, m):
    """F(m x m, 3 x 3) tile by tile: ``Y = sum_c A^T [(G g G^T) * (B^T d B)] A``.  Slow; NumPy, float64.

    Returns the (N, C_out, OH, OW) output; the reading aid and test oracle of :func:`winograd_forward`.
    """
    t = transform(m)
    x = np.asarray(x, np.float64)
    n, c, h, wd = x.shape
    c_out = w.shape[0]
    oh, ow, th, tw = _tiles(h, wd, padding, m)
    ph, pw = padding
    xpad = np.zeros((n, c, m * th + 2, m * tw + 2))
    xpad[:, :, ph:ph + h, pw:pw + wd] = x
    out = np.zeros((n, c_out, m * th, m * tw))
    for ni in range(n):
        for o in range(c_out):
            for i in range(th):
                for j in range(tw):
                    acc = np.zeros((t.alpha, t.alpha))
                    for ci in range(c):
                        d = xpad[ni, ci, m * i:m * i + t.alpha, m * j:m * j + t.alpha]
                        acc += (t.G @ w[o, ci] @ t.G.T) * (t.BT @ d @ t.BT.T)
                    out[ni, o, m * i:m * i + m, m * j:m * j + m] = t.AT @ acc @ t.AT.T
    out = out[:, :, :oh, :ow]
    return out + (0 if b is None else np.asarray(b)[None, :, None, None])
