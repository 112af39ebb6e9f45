"""Winograd F(2x2,3x3) and F(4x4,3x3) (tinynet.nn.winograd) against im2col and the loop reference."""
import threading

import numpy as np
import pytest

from tinynet import backend, nn
from tinynet.gradcheck import gradcheck
from tinynet.nn import reference, winograd
from tinynet.nn.fast import conv  # the fast convolution: its algorithms, their choice and caches

from conftest import torch_or_skip
from fastpath import fast_path_on  # noqa: F401  (a fixture)
from fastpath import chwn_copy, float32_conv_errors

pytestmark = pytest.mark.usefixtures("fast_path_on")  # tests of the fast path itself (tinynet.nn.fast)

MS = [2, 4]
ALGOS = {2: "winograd_f2", 4: "winograd_f4"}

# (N, C, C_out, H, W, padding, bias): H, W not multiples of m, H != W, paddings 0/1/2, tiny images
CASES = [
    (2, 3, 4, 7, 5, 1, True),
    (1, 2, 3, 6, 9, 0, False),
    (3, 5, 2, 5, 5, 2, True),
    (2, 1, 1, 3, 3, 0, True),
    (1, 4, 4, 8, 8, 1, False),
    (3, 2, 5, 1, 2, 1, True),
    (1, 3, 2, 11, 4, 2, False),
    (2, 2, 2, 1, 1, 2, True),   # a 1x1 image padded by 2: most tiles read only padding
    (1, 2, 2, 2, 3, 3, True),   # padding 3: whole tile rows and columns in the padding
]


def _data(case, rng, dtype=np.float64):
    n, c, co, h, w, p, bias = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((co, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(co).astype(dtype) if bias else None
    oh, ow = h + 2 * p - 2, w + 2 * p - 2
    dout = rng.standard_normal((n, co, oh, ow)).astype(dtype)
    return x, wt, b, (p, p), dout


@pytest.mark.parametrize("m", MS)
def test_one_dimensional_transform_is_exact(m, rng):
    # y_i = sum_k g_k d_(i+k) = (A^T [(G g) * (B^T d)])_i for random g, d: the 1-D algorithm F(m, 3).
    t = winograd.transform(m)
    g, d = rng.standard_normal(3), rng.standard_normal(t.alpha)
    direct = np.array([g @ d[i:i + 3] for i in range(m)])
    np.testing.assert_allclose(t.AT @ ((t.G @ g) * (t.BT @ d)), direct, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_match_reference_and_im2col(case, m, rng):
    x, wt, b, pad, dout = _data(case, rng)
    out, cache = conv.conv2d_forward(x, wt, b, (1, 1), pad, algorithm=ALGOS[m])
    assert isinstance(cache, winograd.WinogradCache) and cache.m == m
    ref = reference.conv2d(x, wt, b, (1, 1), pad)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
    out_i, cache_i = conv.conv2d_forward(x, wt, b, (1, 1), pad, algorithm="im2col")
    assert isinstance(cache_i, conv.ConvCache)
    np.testing.assert_allclose(out, out_i, rtol=1e-10, atol=1e-10)
    assert conv.to_chwn(out).flags.c_contiguous  # CHWN in memory, like im2col's output

    dx, dw, db = conv.conv2d_backward(dout, cache)
    rdx, rdw, rdb = reference.conv2d_grads(x, wt, dout, (1, 1), pad)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, rdw, rtol=1e-10, atol=1e-10)
    if b is None:
        assert db is None
    else:
        np.testing.assert_allclose(db, rdb, rtol=1e-10, atol=1e-10)
    idx, idw, _ = conv.conv2d_backward(dout, cache_i)
    np.testing.assert_allclose(dx, idx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, idw, rtol=1e-10, atol=1e-10)

    dx_none, dw2, _ = conv.conv2d_backward(dout, cache, need_dx=False)
    assert dx_none is None
    np.testing.assert_allclose(dw2, dw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("padding", [(0, 2), (2, 1), (1, 0)])
def test_unequal_row_and_column_padding(padding, m, rng):
    x, wt, b = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    out, cache = winograd.winograd_forward(x, wt, b, padding, m)
    np.testing.assert_allclose(out, reference.conv2d(x, wt, b, (1, 1), padding), rtol=1e-10, atol=1e-10)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = winograd.winograd_backward(dout, cache)
    for got, want in zip((dx, dw, db), reference.conv2d_grads(x, wt, dout, (1, 1), padding)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", MS)
def test_plain_tile_loop_matches_reference(m, rng):
    x, wt, b, pad, _ = _data((2, 3, 2, 7, 6, 1, True), rng)
    np.testing.assert_allclose(winograd.winograd_conv2d_loops(x, wt, b, pad, m),
                               reference.conv2d(x, wt, b, (1, 1), pad), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", MS)
def test_layouts_and_strides_of_inputs(m, rng):
    # NCHW images (the first layer), CHWN activations and a non-contiguous upstream gradient.
    x, wt, b, pad, dout = _data((3, 4, 3, 9, 7, 1, True), rng)
    ref = reference.conv2d(x, wt, b, (1, 1), pad)
    rdx, rdw, _ = reference.conv2d_grads(x, wt, dout, (1, 1), pad)
    for xin, din in ((x, dout), (chwn_copy(x), chwn_copy(dout)), (x, dout[:, :, ::-1][:, :, ::-1])):
        out, cache = winograd.winograd_forward(xin, wt, b, pad, m)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
        dx, dw, _ = winograd.winograd_backward(din, cache)
        np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dw, rdw, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", [(2, 3, 4, 6, 5, 1, True), (1, 2, 3, 5, 7, 0, False), (2, 2, 2, 4, 4, 2, True)])
def test_gradcheck_with_winograd_forced(case, m, rng):
    n, c, co, h, w, p, bias = case
    layer = nn.Conv2d(c, co, 3, padding=p, bias=bias, rng=rng, dtype=np.float64)
    x = rng.standard_normal((n, c, h, w))
    with conv.algorithm(ALGOS[m]):
        assert conv.choose_algorithm(x, layer.weight.shape, (1, 1), (p, p)) == ALGOS[m]
        gradcheck(layer, x, seed=3).assert_ok()


@pytest.mark.parametrize("m", MS)
def test_layer_buffers_two_calls_before_backward(m, rng):
    # A layer called twice before its backwards owns two V buffers; each backward sees its own call's V,
    # and a buffer handed back is refilled by the next forward (not reallocated).
    layer = nn.Conv2d(3, 4, 3, padding=1, rng=rng, dtype=np.float64)
    w, b = layer.weight.data, layer.bias.data
    x1, x2 = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 6, 5))
    d1, d2 = rng.standard_normal((2, 4, 6, 5)), rng.standard_normal((2, 4, 6, 5))
    with conv.algorithm(ALGOS[m]):
        layer(x1)
        layer(x2)
        dx2 = layer.backward(d2)
        dx1 = layer.backward(d1)
        np.testing.assert_allclose(dx1, reference.conv2d_grads(x1, w, d1, (1, 1), (1, 1))[0], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dx2, reference.conv2d_grads(x2, w, d2, (1, 1), (1, 1))[0], rtol=1e-10, atol=1e-10)
        free = list(layer._free_cols)
        assert len(free) == 2 and free[0].shape == winograd.v_shape(x1.shape, (1, 1), m)
        out = layer(x1)
        assert any(np.shares_memory(layer._saved[-1][1][0].V, f) for f in free)
        np.testing.assert_allclose(out, reference.conv2d(x1, w, b, (1, 1), (1, 1)), rtol=1e-10, atol=1e-10)
        layer.release_saved()
    # Switching algorithm between calls: the other algorithm's buffer is dropped, results still right.
    with conv.algorithm("im2col"):
        out = layer(x2)
        assert isinstance(layer._saved[-1][1][0], conv.ConvCache)
        np.testing.assert_allclose(layer.backward(d2), reference.conv2d_grads(x2, w, d2, (1, 1), (1, 1))[0],
                                   rtol=1e-10, atol=1e-10)


def test_no_grad_forward_uses_scratch_and_matches(rng):
    layer = nn.Conv2d(4, 3, 3, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 4, 5, 6))
    with nn.no_grad(), conv.algorithm("winograd_f2"):
        out = layer(x)
    assert layer.pending_calls == 0
    np.testing.assert_allclose(out, reference.conv2d(x, layer.weight.data, layer.bias.data, (1, 1), (1, 1)),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------
def _choice(c, h, w_shape=None, stride=(1, 1), padding=(1, 1), groups=1, n=8):
    x = np.empty((n, c, h, h), np.float32)
    return conv.choose_algorithm(x, w_shape or (c, c // groups, 3, 3), stride, padding, groups)


def test_rule_picks_f2_where_it_was_measured_faster():
    for c, h, n in [(64, 16, 64), (128, 8, 64), (256, 4, 64),                  # ResNet18 at 64 px, batch 64
                    (64, 56, 16), (128, 28, 16), (256, 14, 16), (512, 7, 16),  # at 224 px, batch 16
                    (64, 56, 64), (512, 7, 64)]:
        assert _choice(c, h, n=n) == "winograd_f2", (c, h, n)


def test_rule_keeps_im2col_elsewhere():
    for c, h, n in [(64, 16, 16), (128, 8, 16), (256, 4, 16)]:                # ResNet18 at 64 px, batch 16
        assert _choice(c, h, n=n) == "im2col", (c, h, n)
    # 2x2 outputs are a single tile: never Winograd (kn2row where it pays, tests/test_kn2row.py)
    assert [_choice(512, 2, n=n) for n in (16, 64, 256)] == ["im2col", "kn2row", "kn2row"]
    for c, co, h in [(3, 32, 64), (32, 64, 16), (64, 128, 8)]:                 # the CNN at batch 64
        assert _choice(c, h, (co, c, 3, 3), n=64) == "im2col", (c, co, h)
    assert _choice(3, 64, (32, 3, 3, 3), n=1024) == "im2col"            # 3 channels, however big the batch
    assert _choice(64, 16, stride=(2, 2), n=64) == "im2col"             # strided
    assert _choice(64, 16, (64, 64, 1, 1), padding=(0, 0), n=64) == "im2col"  # 1x1
    assert _choice(64, 16, (64, 64, 5, 5), n=64) == "im2col"            # 5x5
    assert _choice(64, 16, groups=2, n=64) == "im2col"                  # grouped
    assert _choice(64, 16, groups=64, n=64) == "im2col"                 # depthwise


def test_rule_is_the_same_under_no_grad():
    # Issue 21: a layer's algorithm (and so its bits) must not depend on the grad mode.  The forward
    # alone gains less from Winograd (docs/performance.md), but it runs what a training forward runs.
    shapes = [(64, 16, 64), (64, 56, 16), (64, 16, 16), (512, 2, 64)] + [(c, h, 64) for c, h in
                                                                         [(64, 56), (128, 28), (256, 14), (512, 7)]]
    with_grad = [_choice(c, h, n=n) for c, h, n in shapes]
    with nn.no_grad():
        assert [_choice(c, h, n=n) for c, h, n in shapes] == with_grad
        assert _choice(64, 16, n=64) == "winograd_f2"
        for c, h in [(64, 56), (128, 28), (256, 14), (512, 7)]:
            assert _choice(c, h, n=64) == "winograd_f2", (c, h)
        with conv.algorithm("winograd_f2"):
            assert _choice(64, 16, n=64) == "winograd_f2"


def test_forcing_applies_only_where_winograd_is_defined():
    with conv.algorithm("winograd_f4"):
        assert _choice(3, 8, (4, 3, 3, 3)) == "winograd_f4"
        assert _choice(512, 2) == "winograd_f4"
        assert _choice(64, 16, stride=(2, 2)) == "im2col"
        assert _choice(64, 16, groups=4) == "im2col"
        assert _choice(64, 16, (64, 64, 1, 1)) == "im2col"
        with conv.algorithm("im2col"):                                  # nesting
            assert _choice(64, 16) == "im2col"
        assert _choice(64, 16) == "winograd_f4"
    assert _choice(64, 16, n=64) == "winograd_f2"
    with pytest.raises(ValueError, match="winograd_f3"):
        with conv.algorithm("winograd_f3"):
            pass


def test_forcing_is_per_thread():
    seen = []
    with conv.algorithm("im2col"):
        worker = threading.Thread(target=lambda: seen.append(_choice(64, 16, n=64)))
        worker.start()
        worker.join()
        assert _choice(64, 16) == "im2col"
    assert seen == ["winograd_f2"]


def test_gpu_arrays_keep_im2col(monkeypatch):
    monkeypatch.setattr(backend, "is_cupy_array", lambda a: True)
    assert _choice(64, 16, n=64) == "im2col"
    with conv.algorithm("winograd_f2"):  # forcing does not apply to GPU arrays (issue 22, defect 8)
        assert _choice(64, 16) == "im2col"


def test_strided_and_grouped_layers_run_im2col_even_when_forced(rng):
    for kwargs in ({"stride": 2}, {"groups": 2}):
        layer = nn.Conv2d(4, 4, 3, padding=1, rng=rng, dtype=np.float64, **kwargs)
        x = rng.standard_normal((2, 4, 7, 6))
        with conv.algorithm("winograd_f2"):
            out = layer(x)
        assert isinstance(layer._saved[-1][1][0], conv.ConvCache)
        expected = reference.conv2d(x, layer.weight.data, layer.bias.data, layer.stride, layer.padding,
                                    layer.groups)
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
        layer.release_saved()


# ---------------------------------------------------------------------------
# float32 accuracy on ResNet18's stride-1 3x3 layers
# ---------------------------------------------------------------------------
#: (C, H): ResNet18's stride-1 3x3 convolutions at 224 px input, and the 64 px last stage.
RESNET18_LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7), (512, 2)]


@pytest.mark.parametrize("c,h", RESNET18_LAYERS)
def test_float32_error_of_f2_is_within_a_small_factor_of_im2col(c, h):
    # Measured (out / dx / dW), e.g. 512@7: im2col 3.9e-7 / 3.4e-7 / 6.7e-7, F(2,3) 6.6e-7 / 7.6e-7 / 5.2e-7,
    # F(4,3) 1.2e-5 / 5.8e-6 / 3.8e-6: F(2,3) within 3x of im2col, F(4,3) 10-50x (so it is no default).
    errors = float32_conv_errors(c, h, conv.ALGORITHMS)
    for k in range(3):
        assert errors["winograd_f2"][k] <= 4 * max(errors["im2col"][k], 2e-7), errors
        assert errors["winograd_f4"][k] <= 100 * max(errors["im2col"][k], 2e-7), errors   # still float32-sized
    assert max(errors["winograd_f2"]) < 2e-6


@pytest.mark.parametrize("c,h", RESNET18_LAYERS)
def test_float32_error_of_f2_is_within_a_small_factor_of_torch(c, h):
    errors = float32_conv_errors(c, h, conv.ALGORITHMS, torch=torch_or_skip())
    torch_err = errors["torch"]
    # Measured, 512@7: torch 2.8e-7 / 2.7e-7 / 6.4e-7, F(2,3) 6.6e-7 / 7.6e-7 / 5.2e-7.
    for k in range(3):
        assert errors["winograd_f2"][k] <= 4 * torch_err[k], (errors, torch_err)
    # F(4,3) is clearly worse than PyTorch's float32 convolution: the reason it is not chosen by default.
    assert errors["winograd_f4"][0] > 4 * torch_err[0], (errors, torch_err)
