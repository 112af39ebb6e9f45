"""The fused CUDA kernels' bodies, compiled as C++ on the CPU and checked against the NumPy code.

CI has no GPU, yet the index arithmetic of ``tinynet.kernels`` (im2col, col2im
as a gather, max-pool routing, BatchNorm, Adam) is exactly the kind of code
that is wrong in subtle ways.  Each kernel body is plain C, run by CuPy once
per output element ``i``; here the same body runs inside a C++ loop over
``i`` (compiled with g++, loaded with ctypes) on small arrays of every
geometry the layers use, and must reproduce the NumPy implementation.  The
GPU tests (tests/gpu) then check the real thing on a GPU.
"""
import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from tinynet import kernels
from tinynet.nn.fast import conv, pool  # the fast path: its NumPy functions are the twins' references
from tinynet.nn.layout import from_chwn, to_chwn
from fastpath import fast_path_on  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("fast_path_on")  # tests of the fast path itself (tinynet.nn.fast)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the kernel bodies")

CTYPES = {"T": None, "S": ctypes.c_uint8, "bool": ctypes.c_bool, "int32": ctypes.c_int, "int64": ctypes.c_longlong}


def parse(params):
    """``"raw T x, int32 H"`` -> [(raw, type, name), ...]."""
    out = []
    for item in params.split(","):
        words = item.split()
        raw = words[0] == "raw"
        out.append((raw, words[-2], words[-1]))
    return out


def compile_kernel(name, tmp_path, scalars=(), real="double"):
    """A ctypes function ``run(total, *params)`` looping the kernel body over i in [0, total)."""
    in_params, out_params, body, _ = kernels.SOURCES[name]
    args, prologue, argtypes = ["ptrdiff_t total"], [], [ctypes.c_ssize_t]
    real_ctype = ctypes.c_double if real == "double" else ctypes.c_float
    for is_out, params in ((False, in_params), (True, out_params)):
        for raw, typ, pname in parse(params):
            ctype = {"T": "T", "S": "S", "bool": "bool", "int32": "int", "int64": "long long"}[typ]
            const = "" if is_out else "const "
            if raw:
                args.append(f"{const}{ctype}* {pname}")
                argtypes.append(ctypes.c_void_p)
            elif typ in ("int32", "int64") or pname in scalars:
                args.append(f"{ctype} {pname}")
                argtypes.append(real_ctype if typ == "T" else CTYPES[typ])
            else:
                args.append(f"{const}{ctype}* {pname}_ptr")
                prologue.append(f"{const}{ctype}& {pname} = {pname}_ptr[i];")
                argtypes.append(ctypes.c_void_p)
    source = (f"#include <cmath>\n#include <cstddef>\n#define CUDART_INF_F INFINITY\nusing std::isnan;\n"
              f"typedef {real} T; typedef unsigned char S;\n"
              f"extern \"C\" void run({', '.join(args)}) {{\n"
              f"  for (ptrdiff_t i = 0; i < total; ++i) {{\n    {' '.join(prologue)}\n{body}\n  }}\n}}\n")
    src = tmp_path / f"{name}.cpp"
    lib = tmp_path / f"{name}.so"
    src.write_text(source)
    subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    fn = ctypes.CDLL(str(lib)).run
    fn.argtypes = argtypes
    fn.restype = None
    return fn


def ptr(a):
    assert a.flags.c_contiguous
    return a.ctypes.data


GEOMETRIES = [  # (C, H, W, N, kernel, stride, padding)
    (3, 9, 7, 2, (3, 3), (1, 1), (1, 1)),
    (2, 8, 8, 3, (3, 3), (2, 2), (1, 1)),
    (2, 11, 9, 2, (7, 7), (2, 2), (3, 3)),
    (4, 7, 5, 2, (1, 1), (2, 2), (0, 0)),
    (2, 6, 5, 2, (3, 2), (2, 1), (1, 0)),
    (2, 8, 8, 2, (4, 4), (4, 4), (0, 0)),
]


def geometry_args(c, h, w, n, k, s, p):
    oh, ow = conv.conv_output_size(h, k[0], s[0], p[0]), conv.conv_output_size(w, k[1], s[1], p[1])
    return oh, ow, (h, w, n, k[0], k[1], oh, ow, s[0], s[1], p[0], p[1])


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_im2col_and_col2im_kernels_match_numpy(geom, tmp_path, rng):
    c, h, w, n, k, s, p = geom
    oh, ow, g = geometry_args(*geom)
    x = rng.standard_normal((n, c, h, w))
    xc = np.ascontiguousarray(to_chwn(x))
    col = np.empty((c, k[0], k[1], oh, ow, n))
    compile_kernel("im2col", tmp_path)(col.size, ptr(xc), *g, ptr(col))
    np.testing.assert_array_equal(col.reshape(c * k[0] * k[1], -1), conv.im2col(x, k, s, p))

    dcol = rng.standard_normal(col.shape)
    dx = np.empty((c, h, w, n))
    compile_kernel("col2im", tmp_path)(dx.size, ptr(dcol), *g, ptr(dx))
    expected = conv.col2im(dcol.reshape(c * k[0] * k[1], -1), x.shape, k, s, p)
    np.testing.assert_allclose(from_chwn(dx), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geom", [g for g in GEOMETRIES if g[6][0] <= g[4][0] // 2 and g[6][1] <= g[4][1] // 2])
def test_max_pool_kernels_match_numpy(geom, tmp_path, rng):
    c, h, w, n, k, s, p = geom
    oh, ow, g = geometry_args(*geom)
    x = np.round(rng.standard_normal((n, c, h, w)), 1)  # rounded: ties happen and must go to the first cell
    x.reshape(-1)[rng.choice(x.size, 3, replace=False)] = np.nan  # NaN wins its window, as in PyTorch
    x[0, 0, 0, 0] = np.nan  # read by the first window of every geometry here
    ref_out, (ref_argmax, *_) = pool.max_pool2d_forward(x, k, s, p)
    xc = np.ascontiguousarray(to_chwn(x))
    out = np.empty((c, oh, ow, n))
    argmax = np.empty((c, oh, ow, n), np.uint8)
    compile_kernel("max_pool_forward", tmp_path)(out.size, ptr(xc), *g, ptr(out), ptr(argmax))
    assert np.isnan(ref_out).any()
    np.testing.assert_array_equal(from_chwn(out), ref_out)  # NaN where the NumPy code has NaN
    np.testing.assert_array_equal(argmax, ref_argmax)

    dout = rng.standard_normal((n, c, oh, ow))
    doutc = np.ascontiguousarray(to_chwn(dout))
    dx = np.empty((c, h, w, n))
    compile_kernel("max_pool_backward", tmp_path)(dx.size, ptr(doutc), ptr(argmax), *g, ptr(dx))
    expected = pool.max_pool2d_backward(dout, (ref_argmax, x.shape, k, s, p))
    np.testing.assert_allclose(from_chwn(dx), expected, rtol=1e-12, atol=1e-12)


def test_relu_and_batch_norm_kernels_match_numpy(tmp_path, rng):
    from tinynet.nn.fast import activation, norm

    _, mask = activation.relu_forward(rng.standard_normal(50))
    dy = rng.standard_normal(50)
    dy[[0, 1, 2, 3]] = np.nan, np.inf, np.nan, -np.inf  # a NaN or inf gradient stays visible, masked or not
    mask[[0, 1]] = False
    dx = np.empty(50)
    compile_kernel("relu_backward", tmp_path)(50, ptr(dy), ptr(mask), ptr(dx))
    with np.errstate(invalid="ignore"):  # inf * 0 = nan, on purpose
        np.testing.assert_array_equal(dx, activation.relu_backward(dy, mask))
    assert np.isnan(dx[:2]).all()  # dy NaN or inf where y = 0: NaN, as NumPy's dy * 0

    x2 = rng.standard_normal((3, 20)) * 2 + 1
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    y2, mean, var, (xhat_ref, _, inv_std) = norm.batch_norm_forward_train(x2, gamma, beta, 1e-5)
    xhat, y_out = np.empty_like(x2), np.empty_like(x2)
    compile_kernel("batch_norm_normalize", tmp_path)(x2.size, ptr(x2), ptr(mean), ptr(inv_std), ptr(gamma),
                                                     ptr(beta), 20, ptr(xhat), ptr(y_out))
    np.testing.assert_allclose(xhat, xhat_ref, rtol=1e-12)
    np.testing.assert_allclose(y_out, y2, rtol=1e-12)

    dy2 = rng.standard_normal(x2.shape)
    dx_ref, dgamma, dbeta = norm.batch_norm_backward_train(dy2, (xhat_ref, gamma, inv_std))
    k, dbeta_m, dgamma_m = gamma * inv_std, dbeta / 20, dgamma / 20  # named: ptr() must not outlive them
    dx2 = np.empty_like(x2)
    compile_kernel("batch_norm_backward_dx", tmp_path)(x2.size, ptr(dy2), ptr(xhat_ref), ptr(k), ptr(dbeta_m),
                                                       ptr(dgamma_m), 20, ptr(dx2))
    np.testing.assert_allclose(dx2, dx_ref, rtol=1e-10, atol=1e-12)


def test_adam_kernel_matches_the_optimizer(tmp_path, rng):
    from tinynet import nn, optim

    w0 = rng.standard_normal(30)
    grads = [rng.standard_normal(30) for _ in range(3)]
    p = nn.Parameter(w0.copy())
    opt = optim.Adam([p], lr=0.01)
    fn = compile_kernel("adam_update", tmp_path, scalars=("b1", "b2", "step_size", "sqrt_bc2", "eps"))
    q, m, v = w0.copy(), np.zeros(30), np.zeros(30)
    for t, g in enumerate(grads, start=1):
        p.grad = g.copy()
        opt.step()
        fn(30, ptr(g), 0.9, 0.999, 0.01 / (1 - 0.9 ** t), np.sqrt(1 - 0.999 ** t), 1e-8, ptr(q), ptr(m), ptr(v))
    np.testing.assert_allclose(q, p.data, rtol=1e-12)


def test_no_kernel_includes_a_toolkit_header():
    """CuPy prepends its own cupy/math_constants.h (CUDART_INF_F and friends) to every ElementwiseKernel;
    the CUDA toolkit's <math_constants.h> may not be on CuPy's include path where only a driver is installed."""
    for name, (_, _, _, preamble) in kernels.SOURCES.items():
        assert "#include" not in preamble, name


def test_every_kernel_is_covered():
    tested = set(re.findall(r'compile_kernel\("(\w+)"', open(__file__).read()))
    assert tested == set(kernels.SOURCES)
