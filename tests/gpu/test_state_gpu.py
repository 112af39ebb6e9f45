"""State and layout on a real GPU: what issue 11 and 14 fixed, where only a GPU can show it.

Skipped without CuPy and a GPU.  The CPU tests cover the same code paths with
stand-ins (tests/test_module.py, test_loss.py, test_kernels_source.py); these
run the real CuPy calls.
"""
import os

import numpy as np
import pytest

from tinynet import backend, nn, optim
from tinynet.nn.layout import add

pytestmark = [pytest.mark.gpu]  # on a real GPU, else on the CuPy stand-in (tests/gpu/conftest.py)


def to_gpu(a):
    return backend.to_device(a, "cuda")


def chwn_view(x):
    """A CuPy array of logical shape (N, C, H, W) stored (C, H, W, N), made on the device."""
    n, c, h, w = x.shape
    buf = to_gpu(np.ascontiguousarray(x.transpose(1, 2, 3, 0)))
    return buf.transpose(3, 0, 1, 2)


def test_load_state_dict_gpu_to_gpu_copies():
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to("cuda")
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to("cuda")
    b.load_state_dict(a.state_dict())
    for (key, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert va.data.ptr != vb.data.ptr, key


def test_relu_backward_and_residual_sum_keep_the_chwn_layout(rng):
    x = chwn_view(rng.standard_normal((4, 3, 5, 5)).astype(np.float32))
    relu = nn.ReLU()
    y = relu(x)
    dx = relu.backward(chwn_view(rng.standard_normal((4, 3, 5, 5)).astype(np.float32)))
    for a in (y, dx, add(dx, x)):
        assert a.strides == x.strides


def test_out_of_range_labels_on_the_device_are_refused():
    z = to_gpu(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"in \[0, 3\] for 4 classes"):
        nn.CrossEntropyLoss()(z, to_gpu(np.array([0, 1, 4])))


@pytest.mark.parametrize("fused", ["1", "0"])
def test_max_pool_with_nan_matches_numpy(fused, rng, monkeypatch):
    monkeypatch.setenv("TINYNET_FUSED_KERNELS", fused)
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = x[1, 2, 5, 0] = np.nan
    cpu, gpu = nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    out = cpu(x)
    g = rng.standard_normal(out.shape).astype(np.float32)
    np.testing.assert_array_equal(backend.to_numpy(gpu(to_gpu(x))), out)
    np.testing.assert_array_equal(backend.to_numpy(gpu.backward(to_gpu(g))), cpu.backward(g))
    assert os.environ["TINYNET_FUSED_KERNELS"] == fused


def test_relu_backward_keeps_nan_gradients(rng):
    relu = nn.ReLU()
    relu(to_gpu(np.array([-1.0, 2.0, -3.0], np.float32)))
    dx = backend.to_numpy(relu.backward(to_gpu(np.array([np.nan, 1.0, np.inf], np.float32))))
    assert np.isnan(dx[0]) and dx[1] == 1.0 and np.isnan(dx[2])


@pytest.mark.parametrize("make", [lambda ps: optim.Adam(ps, lr=0.1), lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9)])
def test_optimizer_state_made_on_the_host_follows_the_model_to_the_gpu(make):
    layer = nn.Linear(3, 2)
    opt = make(layer.parameters())
    layer.weight.grad, layer.bias.grad = np.ones((2, 3), np.float32), np.ones(2, np.float32)
    opt.step()
    layer.to("cuda")
    layer.weight.grad, layer.bias.grad = to_gpu(np.ones((2, 3), np.float32)), to_gpu(np.ones(2, np.float32))
    opt.step()
    for p in layer.parameters():
        for value in opt.state[id(p)].values():
            if getattr(value, "ndim", 0):
                assert backend.is_cupy_array(value)


def test_batch_norm_without_affine_on_the_gpu(rng):
    layer = nn.BatchNorm2d(3, affine=False).to("cuda")
    assert backend.is_cupy_array(layer._gamma)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    cpu = nn.BatchNorm2d(3, affine=False)
    np.testing.assert_allclose(backend.to_numpy(layer(to_gpu(x))), cpu(x), rtol=1e-5, atol=1e-6)
