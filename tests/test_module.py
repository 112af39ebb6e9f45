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
