"""kn2row (tinynet.nn.fast.kn2row): one product per kernel offset, over only the pixels it reads.

Against the loop reference on every geometry (kernels 1-7, strides 1-3, paddings 0-4, maps where
most taps read padding and maps where none do), by finite differences, bit for bit on any number
of threads and in both grad modes, and its float32 error beside im2col's and PyTorch's.
"""
import numpy as np
import pytest

from tinynet import backend, nn
from tinynet.gradcheck import gradcheck
from tinynet.nn import reference
from tinynet.nn.fast import conv, gemm, kn2row

from conftest import torch_or_skip
from fastpath import fast_path_on  # noqa: F401  (a fixture)
from fastpath import chwn_copy, float32_conv_errors

pytestmark = pytest.mark.usefixtures("fast_path_on")

# (N, C, C_out, H, W, kernel, stride, padding, bias)
GEOMETRIES = [
    (3, 5, 7, 2, 2, (3, 3), (1, 1), (1, 1), True),      # ResNet18's last stage at 64 px: 16 of 36 live
    (2, 4, 6, 1, 1, (3, 3), (1, 1), (1, 1), False),     # at 32 px: only the centre tap
    (2, 3, 5, 4, 5, (3, 3), (2, 2), (1, 1), True),      # strided, odd width
    (1, 2, 3, 6, 4, (5, 5), (2, 2), (2, 2), True),
    (4, 3, 2, 3, 3, (7, 7), (1, 1), (3, 3), False),     # a 7x7 kernel larger than the map
    (2, 3, 4, 5, 5, (3, 3), (1, 1), (0, 0), True),      # no padding: every tap live
    (2, 3, 4, 9, 7, (3, 2), (2, 1), (1, 2), True),      # rectangular kernel, mixed strides
    (2, 2, 3, 2, 7, (1, 3), (1, 3), (0, 4), True),      # padding larger than the kernel: dead taps
    (1, 3, 2, 5, 4, (1, 1), (2, 2), (1, 0), False),     # 1x1, strided and padded
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_forward_and_backward_match_the_loop_reference(geometry, rng):
    n, c, co, h, w, k, s, p, bias = geometry
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((co, c) + k)
    b = rng.standard_normal(co) if bias else None
    out, cache = kn2row.kn2row_forward(x, wt, b, s, p)
    assert isinstance(cache, kn2row.Kn2rowCache)
    np.testing.assert_allclose(out, reference.conv2d(x, wt, b, s, p), rtol=1e-10, atol=1e-10)
    dout = rng.standard_normal(out.shape)
    rdx, rdw, rdb = reference.conv2d_grads(x, wt, dout, s, p)
    for din in (dout, chwn_copy(dout), dout[:, :, ::-1][:, :, ::-1]):   # NCHW, CHWN, negative strides
        dx, dw, db = kn2row.kn2row_backward(din, cache)
        np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dw, rdw, rtol=1e-10, atol=1e-10)
        if bias:
            np.testing.assert_allclose(db, rdb, rtol=1e-10, atol=1e-10)
        else:
            assert db is None
    assert kn2row.kn2row_backward(dout, cache, need_dx=False)[0] is None


@pytest.mark.parametrize("geometry", GEOMETRIES[:4] + GEOMETRIES[6:8])
def test_gradcheck_with_kn2row_forced(geometry, rng):
    n, c, co, h, w, k, s, p, bias = geometry
    layer = nn.Conv2d(c, co, k, stride=s, padding=p, bias=bias, rng=rng, dtype=np.float64)
    x = rng.standard_normal((n, c, h, w))
    with conv.algorithm("kn2row"):
        assert conv.choose_algorithm(x, layer.weight.shape, s, p) == "kn2row"
        gradcheck(layer, x, seed=5).assert_ok()


def test_taps_that_read_only_padding_get_a_zero_weight_gradient(rng):
    # On a 1x1 map with padding 1, only the centre tap reads a pixel: dW of the other 8 is exactly 0.
    x = rng.standard_normal((3, 4, 1, 1))
    wt = rng.standard_normal((5, 4, 3, 3))
    taps, _, columns = kn2row.live_taps(x.shape, (3, 3), (1, 1), (1, 1))
    assert [(t.i, t.j) for t in taps] == [(1, 1)] and columns == 3
    out, cache = kn2row.kn2row_forward(x, wt, None, (1, 1), (1, 1))
    np.testing.assert_allclose(out[:, :, 0, 0], x[:, :, 0, 0] @ wt[:, :, 1, 1].T, rtol=1e-12)
    dw = kn2row.kn2row_backward(rng.standard_normal(out.shape), cache)[1]
    dead = np.ones((3, 3), bool)
    dead[1, 1] = False
    assert np.all(dw[:, :, dead] == 0) and np.all(dw[:, :, 1, 1] != 0)


def test_valid_fraction():
    assert kn2row.valid_fraction((8, 3, 2, 2), (3, 3), (1, 1), (1, 1)) == 16 / 36
    assert kn2row.valid_fraction((8, 3, 1, 1), (3, 3), (1, 1), (1, 1)) == 1 / 9
    assert kn2row.valid_fraction((8, 3, 5, 5), (3, 3), (1, 1), (0, 0)) == 1.0
    assert kn2row.valid_fraction((8, 3, 4, 4), (3, 3), (1, 1), (1, 1)) == 100 / 144
    assert kn2row.valid_fraction((8, 3, 2, 2), (3, 3), (2, 2), (1, 1)) == 4 / 9   # 2x2 -> 1x1, stride 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bits_do_not_depend_on_the_number_of_threads(dtype, monkeypatch, rng):
    # Pieces small enough that every tap's products are cut, so the threads share them.
    monkeypatch.setattr(kn2row, "PIECE_COLUMNS", 64)
    monkeypatch.setattr(kn2row, "PIECE_ROWS", 16)
    x = chwn_copy(rng.standard_normal((40, 48, 2, 3)).astype(dtype))
    wt = rng.standard_normal((40, 48, 3, 3)).astype(dtype)
    b = rng.standard_normal(40).astype(dtype)
    dout = chwn_copy(rng.standard_normal((40, 40, 2, 3)).astype(dtype))
    results = []
    try:
        for threads in (1, 2, 3):
            backend.set_num_threads(threads)
            out, cache = kn2row.kn2row_forward(x, wt, b, (1, 1), (1, 1))
            results.append((np.array(out),) + tuple(np.array(g) for g in kn2row.kn2row_backward(dout, cache)))
    finally:
        backend.set_num_threads(None)
    for other in results[1:]:
        for a, r in zip(other, results[0]):
            assert np.array_equal(a, r)


def test_without_control_of_blas_the_pieces_run_here(monkeypatch, rng):
    # Where tinynet cannot hold BLAS on one thread, the pieces run one after another on this thread.
    monkeypatch.setattr(gemm, "hold_blas_threads", lambda: False)
    monkeypatch.setattr(kn2row, "hold_blas_threads", lambda: False)
    ran_on_pool = []
    real = kn2row.parallel_for
    monkeypatch.setattr(kn2row, "parallel_for", lambda n, body, **k: ran_on_pool.append(n) or real(n, body, **k))
    x = rng.standard_normal((4, 6, 2, 2))
    wt = rng.standard_normal((5, 6, 3, 3))
    out, cache = kn2row.kn2row_forward(x, wt, None, (1, 1), (1, 1))
    np.testing.assert_allclose(out, reference.conv2d(x, wt, None, (1, 1), (1, 1)), rtol=1e-10, atol=1e-10)
    assert ran_on_pool == []  # no product was handed to the pool (the copies go through for_channel_blocks)


# ---------------------------------------------------------------------------
# The layer: the rule, grad modes, buffers
# ---------------------------------------------------------------------------
def _choice(c, h, co=None, k=3, stride=1, padding=1, groups=1, n=64):
    x = np.empty((n, c, h, h), np.float32)
    return conv.choose_algorithm(x, (co or c, c // groups, k, k), (stride, stride), (padding, padding), groups)


def test_rule_takes_kn2row_where_padding_is_most_of_the_work():
    for c, h, n in [(512, 2, 64), (512, 2, 256),                    # ResNet18's last stage at 64 px
                    (256, 2, 64), (512, 1, 64),                     # its last two stages at 32 px
                    (512, 3, 64), (256, 3, 16)]:                    # 3x3 maps (96 px): 49 of 81 live
        assert _choice(c, h, n=n) == "kn2row", (c, h, n)
    assert _choice(256, 2, 512, stride=2, n=64) == "kn2row"        # 2x2 -> 1x1, stride 2: 4 of 9 live
    with nn.no_grad():                                              # the same rule without gradients
        assert _choice(512, 2, n=64) == "kn2row"


def test_rule_keeps_the_others_elsewhere():
    assert _choice(64, 2, n=64) == "im2col"                         # below KN2ROW_MIN_WORK
    assert _choice(512, 2, n=16) == "im2col"                        # 36 skipped per tap: below KN2ROW_MIN_SKIPPED
    assert _choice(256, 2, 512, stride=2, n=16) == "im2col"         # 20 per live tap
    assert _choice(512, 4, n=64) == "winograd_f2"                   # 4x4: 100 of 144 live
    assert _choice(256, 4, 512, stride=2, n=64) == "im2col"         # 4x4 -> 2x2: 25 of 36 live
    assert _choice(64, 4, k=7, stride=2, padding=3, n=256) == "im2col"  # 7x7: not measured faster
    assert _choice(512, 2, n=64, groups=2) == "im2col"              # grouped
    assert _choice(512, 8, k=1, padding=0, n=64) == "im2col"        # 1x1: nothing to skip
    with conv.algorithm("im2col"):
        assert _choice(512, 2, n=64) == "im2col"
    with conv.algorithm("kn2row"):
        assert _choice(64, 16, n=64) == "kn2row"                    # forced: any ungrouped convolution
        assert _choice(64, 16, n=64, groups=4) == "im2col"


def test_gpu_arrays_keep_im2col(monkeypatch):
    monkeypatch.setattr(backend, "is_cupy_array", lambda a: True)
    assert _choice(512, 2, n=64) == "im2col"
    with conv.algorithm("kn2row"):
        assert _choice(512, 2, n=64) == "im2col"


def test_a_layer_gives_the_same_bits_with_and_without_gradients(rng):
    layer = nn.Conv2d(512, 512, 3, padding=1, rng=rng)
    x = chwn_copy(rng.standard_normal((64, 512, 2, 2)).astype(np.float32))
    assert conv.choose_algorithm(x, layer.weight.shape, (1, 1), (1, 1)) == "kn2row"
    with_grad = np.array(layer(x))
    assert isinstance(layer._saved[-1][1][0], kn2row.Kn2rowCache)
    layer.release_saved()
    with nn.no_grad():
        assert np.array_equal(layer(x), with_grad)
    with conv.algorithm("im2col"):  # the other algorithm: float32 rounding apart, the same convolution
        np.testing.assert_allclose(np.array(layer(x)), with_grad, rtol=1e-4, atol=1e-4)
        layer.release_saved()


def test_layer_buffers_two_calls_before_backward(rng):
    layer = nn.Conv2d(3, 4, 3, padding=1, rng=rng, dtype=np.float64)
    w, b = layer.weight.data, layer.bias.data
    x1, x2 = rng.standard_normal((2, 3, 2, 3)), rng.standard_normal((2, 3, 2, 3))
    d1, d2 = rng.standard_normal((2, 4, 2, 3)), rng.standard_normal((2, 4, 2, 3))
    with conv.algorithm("kn2row"):
        layer(x1)
        layer(x2)
        layer.zero_grad()
        dx2 = layer.backward(d2)
        dx1 = layer.backward(d1)
        for dx, x, d in ((dx1, x1, d1), (dx2, x2, d2)):
            np.testing.assert_allclose(dx, reference.conv2d_grads(x, w, d, (1, 1), (1, 1))[0], rtol=1e-10, atol=1e-10)
        dw = reference.conv2d_grads(x1, w, d1, (1, 1), (1, 1))[1] + reference.conv2d_grads(x2, w, d2, (1, 1), (1, 1))[1]
        np.testing.assert_allclose(layer.weight.grad, dw, rtol=1e-10, atol=1e-10)
        free = list(layer._free_cols)
        assert len(free) == 2 and free[0].shape == (3, 2, 3, 2)  # the copy of x, CHWN
        out = layer(x1)                                   # a buffer handed back is refilled
        assert any(np.shares_memory(layer._saved[-1][1][0].x, f) for f in free)
        np.testing.assert_allclose(out, reference.conv2d(x1, w, b, (1, 1), (1, 1)), rtol=1e-10, atol=1e-10)
        layer.release_saved()


def test_the_kept_copy_does_not_follow_later_changes_to_the_input(rng):
    # The backward reads the forward's own copy of x, so an input modified in place after the forward
    # (an in-place ReLU of the caller, a reused batch buffer) does not change the gradients.
    layer = nn.Conv2d(3, 4, 3, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 3, 2, 2))
    expected = reference.conv2d_grads(x, layer.weight.data, np.ones((2, 4, 2, 2)), (1, 1), (1, 1))[1]
    with conv.algorithm("kn2row"):
        layer(x)
        x[...] = 0
        layer.backward(np.ones((2, 4, 2, 2)))
    np.testing.assert_allclose(layer.weight.grad, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# float32 error on ResNet18's small maps
# ---------------------------------------------------------------------------
SMALL_MAPS = [(512, 2, 1), (256, 2, 1), (512, 1, 1), (256, 2, 2)]   # (C, H, stride)


@pytest.mark.parametrize("c,h,s", SMALL_MAPS)
def test_float32_error_is_float32_sized_and_near_im2col(c, h, s):
    # Measured (out / dx / dW, seed 0): 512@2 im2col 3.7e-7 / 2.8e-7 / 1.4e-7, kn2row 3.9e-7 / 2.8e-7 / 1.4e-7;
    # 512@1 im2col 1.4e-7 / 5.9e-7 / 9.7e-8, kn2row 4.2e-7 / 5.9e-7 / 9.7e-8 (one K = 512 product per output).
    errors = float32_conv_errors(c, h, ("im2col", "kn2row"), stride=s)
    for k in range(3):
        assert errors["kn2row"][k] <= 4 * max(errors["im2col"][k], 1e-7), errors
    assert max(errors["kn2row"]) < 2e-6


@pytest.mark.parametrize("c,h,s", SMALL_MAPS)
def test_float32_error_is_within_a_small_factor_of_torch(c, h, s):
    errors = float32_conv_errors(c, h, ("im2col", "kn2row"), stride=s, torch=torch_or_skip())
    torch_err = errors["torch"]
    # Measured, 512@1: torch 1.7e-7 / 2.4e-7 / 9.7e-8, kn2row 4.2e-7 / 5.9e-7 / 9.7e-8 (dx: im2col's too).
    for k in range(3):
        assert errors["kn2row"][k] <= 4 * max(torch_err[k], errors["im2col"][k]), (errors, torch_err)
