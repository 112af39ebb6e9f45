"""Module plumbing: registration, state dicts, modes, devices, error messages."""
import numpy as np
import pytest

import tinynet
from tinynet import backend, nn
from tinynet.models import resnet18


def small():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_parameters_and_named_parameters():
    net = small()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    assert len(list(net.parameters())) == 6


def test_state_dict_roundtrip_and_independence(rng):
    a, b = small(), small()
    for p in a.parameters():
        p.data = rng.standard_normal(p.shape).astype(np.float32)
    result = b.load_state_dict(a.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.mismatched_keys == []
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(va, vb)
    b.state_dict()["0.weight"][...] = 0  # loaded arrays are copies, not shared with the source
    assert np.abs(a.state_dict()["0.weight"]).sum() > 0


def test_load_state_dict_lists_every_problem():
    net = small()
    sd = dict(net.state_dict())
    del sd["1.running_var"]
    sd["extra.weight"] = np.zeros(3)
    sd["4.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(nn.StateDictError) as info:
        net.load_state_dict(sd)
    msg = str(info.value)
    assert "missing keys (1): 1.running_var" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "shape mismatch for 4.weight: expected (2, 144), received (3, 3)" in msg


def test_load_state_dict_non_strict_loads_what_fits(rng):
    net = small()
    sd = dict(net.state_dict())
    new_bias = rng.standard_normal(4).astype(np.float32)
    sd["0.bias"] = new_bias
    sd["4.weight"] = np.zeros((3, 3), np.float32)
    del sd["1.weight"]
    result = net.load_state_dict(sd, strict=False)
    np.testing.assert_array_equal(net[0].bias.data, new_bias)
    assert result.missing_keys == ["1.weight"]
    assert result.mismatched_keys == [("4.weight", (2, 144), (3, 3))]


def test_resnet18_state_dict_uses_torchvision_names():
    keys = list(resnet18(10).state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer1.0.conv1.weight" in keys and "layer2.0.downsample.0.weight" in keys
    assert "layer4.1.bn2.num_batches_tracked" in keys
    assert keys[-4:] == ["fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]
    # torchvision's resnet18 state dict has 122 keys (fc.weight, fc.bias among them); the MLP head adds two.
    assert len(keys) == 122 + 2


def test_train_eval_modes_propagate():
    net = small()
    net.eval()
    assert all(not m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_no_grad_keeps_no_cache(rng):
    net = small()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with tinynet.no_grad():
        y = net(x)
    with pytest.raises(RuntimeError, match="no_grad"):
        net.backward(np.ones_like(y))
    assert tinynet.is_grad_enabled()


def test_backward_twice_is_an_error(rng):
    layer = nn.Linear(3, 2)
    y = layer(rng.standard_normal((2, 3)).astype(np.float32))
    layer.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="twice for one forward"):
        layer.backward(np.ones_like(y))


def test_to_double_and_back(rng):
    net = small().double()
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert net[1].num_batches_tracked.dtype == np.int64
    net.float()
    assert all(p.dtype == np.float32 for p in net.parameters())


def test_cuda_without_gpu_says_what_is_missing():
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CuPy|no CUDA GPU"):
        small().to("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        small().to("tpu")


def test_repr_lists_layers():
    text = repr(small())
    assert "Conv2d(3, 4, kernel_size=(3, 3)" in text and "(4): Linear" in text


def test_assigning_a_non_module_over_a_module_is_refused():
    net = small()
    with pytest.raises(TypeError, match="expected a Parameter or Module"):
        setattr(net, "0", 5)


def test_a_linear_layer_called_twice_gets_the_gradient_of_both_calls(rng):
    from tinynet.gradcheck import numerical_gradient

    lin = nn.Linear(4, 3, dtype=np.float64)
    x1, x2 = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    y = lin(x1) + lin(x2)
    g = rng.standard_normal(y.shape)
    dx2 = lin.backward(g)
    dx1 = lin.backward(g)

    def objective():
        with tinynet.no_grad():
            return float(np.sum(g * (lin(x1) + lin(x2))))

    for array, analytic in ((lin.weight.data, lin.weight.grad), (lin.bias.data, lin.bias.grad), (x1, dx1),
                            (x2, dx2)):
        numeric = numerical_gradient(objective, array, np.arange(array.size))
        np.testing.assert_allclose(analytic.reshape(-1), numeric, rtol=1e-6, atol=1e-8)


def test_a_shared_layer_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=np.float64)
    relu = nn.ReLU()
    x1, x2 = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((2, 3, 5, 5))
    y = relu(conv(x1)) + relu(conv(x2))
    g = rng.standard_normal(y.shape)
    dx2 = conv.backward(relu.backward(g))
    dx1 = conv.backward(relu.backward(g))
    tconv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        tconv.weight.copy_(torch.from_numpy(conv.weight.data))
        tconv.bias.copy_(torch.from_numpy(conv.bias.data))
    t1, t2 = (torch.tensor(a, requires_grad=True) for a in (x1, x2))
    (torch.relu(tconv(t1)) + torch.relu(tconv(t2))).backward(torch.from_numpy(g))
    np.testing.assert_allclose(conv.weight.grad, tconv.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(dx1, t1.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(dx2, t2.grad.numpy(), rtol=1e-10)


def test_backward_more_often_than_forward_is_an_error(rng):
    lin = nn.Linear(3, 2)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    lin(x), lin(x)
    lin.backward(np.ones((2, 2), np.float32))
    lin.backward(np.ones((2, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"Linear: backward\(\) called before forward\(\), or more often"):
        lin.backward(np.ones((2, 2), np.float32))


def test_no_grad_stores_nothing_in_any_layer(rng):
    net = small()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with tinynet.no_grad():
        net(x)
        net(x)
    for m in net.modules():
        assert m.pending_calls == 0, m


def test_slicing_a_sequential_keeps_the_layers_names(rng):
    model = resnet18(3, width=8)
    part = model.layer1[0:1]
    assert model.layer1[0].conv1._describe() == "Conv2d 'layer1.0.conv1'"
    with pytest.raises(ValueError, match=r"Conv2d 'layer1\.0\.conv1': expected input"):
        part(np.zeros((1, 5, 8, 8), np.float32))


def test_load_state_dict_copies_on_the_device_path_too(monkeypatch):
    """The CuPy branch once used ``asarray``, which returns the source itself when dtype and device match.

    A NumPy subclass stands in for device arrays, so the branch runs on the CPU.
    """
    class DeviceArray(np.ndarray):
        pass

    class FakeCupy:
        ndarray = DeviceArray

        @staticmethod
        def asarray(a, dtype=None):
            out = np.asarray(a, dtype=dtype)
            return out if isinstance(out, DeviceArray) else out.view(DeviceArray)

        @staticmethod
        def array(a, dtype=None, copy=True):
            return np.array(a, dtype=dtype, copy=copy).view(DeviceArray)

    monkeypatch.setattr(backend, "_cupy", FakeCupy)
    monkeypatch.setattr(backend, "is_cupy_array", lambda x: isinstance(x, DeviceArray))
    a, b = small(), small()
    for m in (a, b):
        for p in m.parameters():
            p.data = p.data.view(DeviceArray)
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert not np.shares_memory(pa.data, pb.data)
