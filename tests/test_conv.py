import numpy as np
import pytest

from tinynet import nn
from tinynet.gradcheck import gradcheck
from tinynet.nn import conv, reference

from conftest import torch_or_skip
from fastpath import path  # noqa: F401  (a fixture: the test runs on the fast and the plain path)

# (C, C_out, kernel, stride, padding, H, W): strides 1/2, paddings 0/1/3, kernels 1/3/7,
# non-square inputs and kernels, in != out channels.
CASES = [
    (3, 4, 3, 1, 1, 7, 6),
    (3, 5, 3, 2, 1, 9, 7),
    (2, 3, 3, 2, 0, 8, 8),
    (4, 2, 1, 1, 0, 5, 6),
    (4, 3, 1, 2, 0, 7, 5),
    (3, 2, 7, 2, 3, 11, 9),
    (2, 3, (3, 1), (2, 1), (1, 0), 6, 5),
    (1, 2, (2, 3), (1, 2), (0, 1), 5, 7),
]


def make(case, rng, dtype=np.float64, n=2):
    c, co, k, s, p, h, w = case
    layer = nn.Conv2d(c, co, k, stride=s, padding=p, rng=rng, dtype=dtype)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    return layer, x


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(path, case, rng):
    layer, x = make(case, rng)
    gradcheck(layer, x, seed=1).assert_ok()


@pytest.mark.parametrize("case", CASES)
def test_matches_loop_reference(path, case, rng):
    layer, x = make(case, rng)
    out = layer(x)
    w, b = layer.weight.data, layer.bias.data
    expected = reference.conv2d(x, w, b, layer.stride, layer.padding)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    rdx, rdw, rdb = reference.conv2d_grads(x, w, dout, layer.stride, layer.padding)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, rdw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, rdb, rtol=1e-10, atol=1e-12)


def test_no_bias_and_float32(rng):
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False, rng=rng)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    out = layer(x)
    assert out.dtype == np.float32 and layer.bias is None
    dx = layer.backward(np.ones_like(out))
    assert dx.dtype == np.float32 and layer.weight.grad.dtype == np.float32
    assert [n for n, _ in layer.named_parameters()] == ["weight"]


def test_im2col_col2im_are_adjoint(rng):
    # <im2col(x), c> == <x, col2im(c)> for every x and c: col2im is im2col's transpose.
    x = rng.standard_normal((2, 3, 7, 5))
    args = ((3, 3), (2, 1), (1, 2))
    col = conv.im2col(x, *args)
    c = rng.standard_normal(col.shape)
    lhs = np.sum(col * c)
    rhs = np.sum(x * conv.col2im(c, x.shape, *args))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_backward_leaves_dout_untouched(rng):
    layer, x = make(CASES[1], rng)
    out = layer(x)
    dout = rng.standard_normal(out.shape)
    before = dout.copy()
    layer.backward(dout)
    np.testing.assert_array_equal(dout, before)


def test_input_grad_flag_skips_dx(rng):
    layer, x = make(CASES[0], rng)
    layer.set_input_grad(False)
    out = layer(x)
    assert layer.backward(np.ones_like(out)) is None
    assert layer.weight.grad is not None


def test_gradients_accumulate_until_zero_grad(rng):
    layer, x = make(CASES[0], rng)
    g = rng.standard_normal(layer(x).shape)
    layer.backward(g)
    first = layer.weight.grad.copy()
    layer(x)
    layer.backward(g)
    np.testing.assert_allclose(layer.weight.grad, 2 * first)
    layer.zero_grad()
    assert layer.weight.grad is None


def test_bad_input_names_layer_and_shapes(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"Conv2d '0'.*\(N, 3, H, W\).*\(2, 5, 8, 8\)"):
        model(np.zeros((2, 5, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), received \(3, 8, 8\)"):
        model(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        model(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="dtype float64 does not match"):
        model(np.zeros((2, 3, 8, 8), np.float64))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        model(np.zeros((2, 3, 2, 2), np.float32))
    with pytest.raises(RuntimeError, match="backward\\(\\) called before forward"):
        nn.Conv2d(3, 4, 3).backward(np.zeros((1, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="kernel_size"):
        nn.Conv2d(3, 4, 0)


def test_default_init_matches_pytorch_bounds(rng):
    layer = nn.Conv2d(16, 32, 3, rng=rng)
    bound = 1 / np.sqrt(16 * 9)
    assert np.abs(layer.weight.data).max() <= bound
    assert np.abs(layer.weight.data).max() > 0.9 * bound
    assert np.abs(layer.bias.data).max() <= bound


def test_seed_makes_weights_reproducible():
    a = nn.Conv2d(3, 8, 3, rng=np.random.default_rng(7)).weight.data
    b = nn.Conv2d(3, 8, 3, rng=np.random.default_rng(7)).weight.data
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_pytorch_parity(path, case, rng):
    torch = torch_or_skip()
    layer, x = make(case, rng, dtype=np.float32, n=3)
    ref = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.data))
        ref.bias.copy_(torch.from_numpy(layer.bias.data))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    out = layer(x)
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    g = rng.standard_normal(out.shape).astype(np.float32)
    yt.backward(torch.from_numpy(g))
    dx = layer.backward(g)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad, ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_one_by_one_conv_input_gradient_is_not_overwritten_by_a_later_backward(rng):
    """A 1x1 stride-1 conv's dx once was a view of the shared dcol scratch buffer."""
    first = nn.Conv2d(4, 3, 1, rng=rng, dtype=np.float64)
    other = nn.Conv2d(4, 3, 1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 4, 5, 5))
    g = rng.standard_normal((2, 3, 5, 5))
    first(x)
    dx = first.backward(g)
    kept = dx.copy()
    other(rng.standard_normal((2, 4, 5, 5)))
    other.backward(rng.standard_normal((2, 3, 5, 5)))
    np.testing.assert_array_equal(dx, kept)


def test_one_by_one_shortcut_backward_run_first_keeps_its_gradient(rng):
    """A user's block that runs the 1x1 shortcut's backward before the main branch's."""
    shortcut = nn.Conv2d(3, 4, 1, bias=False, rng=rng, dtype=np.float64)
    main = nn.Conv2d(3, 4, 3, padding=1, bias=False, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 3, 6, 6))
    g = rng.standard_normal((2, 4, 6, 6))
    for _ in range(2):  # the second step reuses what the first allocated
        shortcut(x), main(x)
        dx_shortcut = shortcut.backward(g)
        main.backward(g)
    expected = reference.conv2d_grads(x, shortcut.weight.data, g, (1, 1), (0, 0))[0]
    np.testing.assert_allclose(dx_shortcut, expected, rtol=1e-12)


@pytest.mark.parametrize("k, s, p", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_a_conv_called_twice_gets_the_gradient_of_both_calls(k, s, p, rng):
    """Weight sharing: y = conv(x1) + conv(x2), checked against float64 finite differences."""
    from tinynet.gradcheck import numerical_gradient

    conv_ = nn.Conv2d(2, 3, k, stride=s, padding=p, rng=rng, dtype=np.float64)
    x1, x2 = rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((2, 2, 6, 6))
    y = conv_(x1) + conv_(x2)
    g = rng.standard_normal(y.shape)
    conv_.zero_grad()
    dx2 = conv_.backward(g)  # calls are undone in reverse order: the second first
    dx1 = conv_.backward(g)

    def objective():
        with nn.no_grad():
            return float(np.sum(g * (conv_(x1) + conv_(x2))))

    w = conv_.weight.data
    idx = np.arange(w.size)
    np.testing.assert_allclose(conv_.weight.grad.reshape(-1), numerical_gradient(objective, w, idx), rtol=1e-6,
                               atol=1e-8)
    for x, dx in ((x1, dx1), (x2, dx2)):
        np.testing.assert_allclose(dx.reshape(-1), numerical_gradient(objective, x, np.arange(x.size)),
                                   rtol=1e-6, atol=1e-8)


def test_non_integer_geometry_is_refused():
    for kwargs in ({"kernel_size": 2.7}, {"kernel_size": (3, 1.5)}, {"kernel_size": 3, "stride": 1.5},
                   {"kernel_size": 3, "padding": 0.5}, {"kernel_size": True}):
        with pytest.raises((TypeError, ValueError), match="must be an int"):
            nn.Conv2d(3, 4, **kwargs)
    with pytest.raises((TypeError, ValueError), match="must be an int"):
        nn.Conv2d(3.5, 4, 3)
    assert nn.Conv2d(3, 4, np.int64(3)).kernel_size == (3, 3)


# (C, C_out, kernel, stride, padding, H, W, groups): grouped, depthwise, depthwise with a multiplier,
# and a grouped 1x1 (col is x itself).
GROUPED = [
    (4, 6, 3, 1, 1, 6, 5, 2),
    (3, 3, 3, 2, 1, 7, 7, 3),
    (2, 4, (3, 2), (1, 2), (1, 0), 6, 7, 2),
    (6, 4, 1, 1, 0, 4, 5, 2),
]


def make_grouped(case, rng, dtype=np.float64):
    c, co, k, s, p, h, w, g = case
    return (nn.Conv2d(c, co, k, stride=s, padding=p, groups=g, rng=rng, dtype=dtype),
            rng.standard_normal((2, c, h, w)).astype(dtype))


@pytest.mark.parametrize("case", GROUPED)
def test_grouped_gradcheck(path, case, rng):
    layer, x = make_grouped(case, rng)
    assert layer.weight.shape[1] == case[0] // case[7]
    gradcheck(layer, x, seed=1).assert_ok()


@pytest.mark.parametrize("case", GROUPED)
def test_grouped_matches_loop_reference(path, case, rng):
    layer, x = make_grouped(case, rng)
    g = case[7]
    out = layer(x)
    np.testing.assert_allclose(out, reference.conv2d(x, layer.weight.data, layer.bias.data, layer.stride,
                                                     layer.padding, groups=g), rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    rdx, rdw, rdb = reference.conv2d_grads(x, layer.weight.data, dout, layer.stride, layer.padding, groups=g)
    np.testing.assert_allclose(dx, rdx, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, rdw, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, rdb, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("case", GROUPED)
def test_grouped_pytorch_parity_float64(path, case, rng):
    torch = torch_or_skip()
    layer, x = make_grouped(case, rng)
    c, co, k, s, p, h, w, g = case
    ref = torch.nn.Conv2d(c, co, k, stride=s, padding=p, groups=g).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.data))
        ref.bias.copy_(torch.from_numpy(layer.bias.data))
    t = torch.tensor(x, requires_grad=True)
    out = ref(t)
    dout = rng.standard_normal(tuple(out.shape))
    out.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(layer(x), out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dout), t.grad.numpy(), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy(), rtol=1e-11, atol=1e-12)
    assert layer.state_dict()["weight"].shape == tuple(ref.weight.shape)


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match=r"Conv2d: groups=2 must divide both in_channels=3 and out_channels=4"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(TypeError, match="groups must be an int"):
        nn.Conv2d(4, 4, 3, groups=2.0)
