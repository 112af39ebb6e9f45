"""The CuPy path on a real GPU: every layer, loss and optimizer equal to NumPy's within float32 tolerance.

Skipped without CuPy and a GPU (CI has none).  Run on a GPU machine with
``bash benchmarks/gpu_check.sh tests``, which runs this file twice: with the fused
kernels of :mod:`tinynet.kernels` and without them (``TINYNET_FUSED_KERNELS=0``,
the plain CuPy code), so both GPU paths are compared with NumPy.

Tolerance: relative 1e-4 of each tensor's largest value (float32 sums in a
different order on the GPU), see ``assert_close_to_scale``; 1e-10 in float64.
Beyond plain parity: max-pool windows of more than 256 cells (int16 winners),
float64, BatchNorm without affine and with cumulative averages, GPU-to-GPU
state dicts (copies), labels out of range on the device, NaN through max
pooling and ReLU's backward (as NumPy propagates it), and single layers fed
the CHWN views they receive inside a network.
"""
import numpy as np
import pytest

import tinynet
from tinynet import backend, nn, optim
from tinynet.models import resnet18, simple_cnn

from conftest import assert_close_to_scale
from fastpath import fast_path_on  # noqa: F401  (a fixture: CHWN views are the fast path's)

pytestmark = [pytest.mark.gpu]  # on a real GPU, else on the CuPy stand-in (tests/gpu/conftest.py)

RTOL = 1e-4


def to_gpu(a):
    return backend.to_device(a, "cuda")


def chwn_on_gpu(a):
    """``a`` (N, C, H, W) on the GPU as the layers pass activations: an NCHW view of a CHWN buffer."""
    from tinynet.nn.layout import from_chwn, to_chwn

    return from_chwn(to_gpu(np.ascontiguousarray(to_chwn(a)))) if a.ndim == 4 else to_gpu(a)


def both(make, x, rng, *, train=True, grads=True, move=to_gpu, rtol=RTOL):
    """Run a layer's forward and backward on NumPy and on CuPy from the same weights; compare everything.

    ``move`` puts the input and the upstream gradient on the GPU (plain, or :func:`chwn_on_gpu`);
    float64 inputs get float64 gradients, to be compared with a float64 ``rtol``.
    """
    cpu = make()
    cpu.train(train)
    gpu = make()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda").train(train)
    y_cpu = cpu(x)
    y_gpu = gpu(move(x))
    assert backend.is_cupy_array(y_gpu) and y_gpu.dtype == y_cpu.dtype
    assert_close_to_scale(backend.to_numpy(y_gpu), y_cpu, rtol, "forward")
    if grads:
        g = rng.standard_normal(y_cpu.shape).astype(y_cpu.dtype)
        dx_cpu = cpu.backward(g)
        dx_gpu = gpu.backward(move(g))
        assert_close_to_scale(backend.to_numpy(dx_gpu), dx_cpu, rtol, "dx")
        for (name, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
            assert_close_to_scale(backend.to_numpy(q.grad), p.grad, rtol, name)
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert_close_to_scale(backend.to_numpy(b), np.asarray(a), rtol, name)  # running statistics too
    return cpu, gpu


CONVS = [(3, 8, 3, 1, 1, 9, 7), (4, 6, 3, 2, 1, 10, 8), (3, 8, 7, 2, 3, 16, 16), (8, 4, 1, 1, 0, 5, 5),
         (8, 4, 1, 2, 0, 6, 6), (2, 3, (3, 1), (2, 1), (1, 0), 7, 6)]


@pytest.mark.parametrize("c,co,k,s,p,h,w", CONVS)
def test_conv2d(c, co, k, s, p, h, w, rng):
    x = rng.standard_normal((3, c, h, w)).astype(np.float32)
    both(lambda: nn.Conv2d(c, co, k, s, p, rng=np.random.default_rng(0)), x, rng)


def test_kn2row_called_on_cupy_arrays_matches_numpy(rng):
    # The rule never picks kn2row on the GPU (not measured there), but its functions take CuPy arrays.
    from tinynet.nn.fast import kn2row

    x = rng.standard_normal((4, 6, 2, 3)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    dout = rng.standard_normal((4, 5, 2, 3)).astype(np.float32)
    out, cache = kn2row.kn2row_forward(x, w, b, (1, 1), (1, 1))
    grads = kn2row.kn2row_backward(dout, cache)
    gout, gcache = kn2row.kn2row_forward(to_gpu(x), to_gpu(w), to_gpu(b), (1, 1), (1, 1))
    ggrads = kn2row.kn2row_backward(to_gpu(dout), gcache)
    for got, want in zip((gout,) + ggrads, (out,) + grads):
        assert backend.is_cupy_array(got)
        assert_close_to_scale(backend.to_numpy(got), want, RTOL)


@pytest.mark.parametrize("k,s,p,h", [(3, 2, 1, 16), (4, 4, 0, 16), (2, 2, 0, 9), (3, 1, 1, 7)])
def test_max_pool_including_the_resnet_stem(k, s, p, h, rng):
    x = np.round(rng.standard_normal((4, 3, h, h)), 1).astype(np.float32)  # ties: first maximum wins
    both(lambda: nn.MaxPool2d(k, s, p), x, rng)


def test_avg_and_adaptive_pool(rng):
    x = rng.standard_normal((4, 3, 9, 8)).astype(np.float32)
    both(lambda: nn.AvgPool2d(3, 2, 1), x, rng)
    both(lambda: nn.AdaptiveAvgPool2d(1), x, rng)
    both(lambda: nn.AdaptiveAvgPool2d((2, 3)), x, rng)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_2d_with_running_statistics(train, rng):
    x = (rng.standard_normal((6, 5, 7, 7)) * 3 + 2).astype(np.float32)
    cpu, gpu = both(lambda: nn.BatchNorm2d(5), x, rng, train=train)
    if train:
        assert int(gpu.num_batches_tracked) == 1


def test_batch_norm_1d(rng):
    both(lambda: nn.BatchNorm1d(4), rng.standard_normal((8, 4)).astype(np.float32), rng)


def test_linear_relu_softmax_flatten(rng):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    both(lambda: nn.Linear(6, 4, rng=np.random.default_rng(1)), x, rng)
    both(nn.ReLU, x, rng)
    both(lambda: nn.Softmax(1), x, rng)
    both(nn.Flatten, rng.standard_normal((2, 3, 4, 4)).astype(np.float32), rng)


@pytest.mark.parametrize("stride,in_planes,planes", [(1, 4, 4), (2, 4, 8)])
def test_basic_block(stride, in_planes, planes, rng):
    def make():
        ds = None
        if stride != 1 or in_planes != planes:
            ds = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False, rng=np.random.default_rng(2)),
                               nn.BatchNorm2d(planes))
        return nn.BasicBlock(in_planes, planes, stride, ds, rng=np.random.default_rng(3))

    both(make, rng.standard_normal((4, in_planes, 8, 8)).astype(np.float32), rng)


def test_dropout_on_gpu_is_inverted(rng):
    layer = nn.Dropout(0.3).to("cuda")
    x = to_gpu(np.ones((200, 300), np.float32))
    y = backend.to_numpy(layer(x))
    assert abs((y != 0).mean() - 0.7) < 0.01 and np.allclose(y[y != 0], 1 / 0.7)


@pytest.mark.parametrize("loss,pred,target", [
    (nn.CrossEntropyLoss, (6, 5), "class"),
    (nn.NLLLoss, (6, 5), "class"),
    (nn.BCEWithLogitsLoss, (6, 3), "prob"),
    (nn.BCELoss, (6, 3), "prob"),
])
def test_losses(loss, pred, target, rng):
    z = rng.standard_normal(pred).astype(np.float32)
    if loss is nn.BCELoss:
        z = 1 / (1 + np.exp(-z))
    if loss is nn.NLLLoss:
        z = z - np.log(np.exp(z).sum(1, keepdims=True))
    t = rng.integers(0, pred[1], pred[0]) if target == "class" else rng.uniform(0, 1, pred).astype(np.float32)
    cpu, gpu = loss(), loss()
    value = float(cpu(z, t))
    value_gpu = gpu(to_gpu(z), to_gpu(t))
    assert backend.is_cupy_array(value_gpu)  # no host synchronisation: the loss stays on the device
    assert float(value_gpu) == pytest.approx(value, rel=1e-5)
    assert_close_to_scale(backend.to_numpy(gpu.backward()), cpu.backward(), RTOL)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_optimizer_steps(kind, rng):
    w0 = rng.standard_normal((7, 5)).astype(np.float32)
    grads = [rng.standard_normal((7, 5)).astype(np.float32) for _ in range(4)]
    p, q = nn.Parameter(w0.copy()), nn.Parameter(to_gpu(w0))
    make = {"sgd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
            "adam": lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.01),
            "adamw": lambda ps: optim.AdamW(ps, lr=0.01)}[kind]
    opt_cpu, opt_gpu = make([p]), make([q])
    for g in grads:
        p.grad, q.grad = g.copy(), to_gpu(g)
        opt_cpu.step()
        opt_gpu.step()
    assert_close_to_scale(backend.to_numpy(q.data), p.data, 1e-5)


def test_model_to_cuda_and_back():
    model = resnet18(10)
    before = {k: np.array(v, copy=True) for k, v in model.state_dict().items()}
    model.to("cuda")
    assert model.device == "cuda" and all(backend.is_cupy_array(v) for v in model.state_dict().values())
    model.to("cpu")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_mixing_devices_names_the_layer(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).to("cuda")
    with pytest.raises(RuntimeError, match=r"Conv2d '0'.*cpu.*cuda"):
        model(rng.standard_normal((1, 3, 5, 5)).astype(np.float32))


def test_resnet18_train_step_matches_numpy(rng):
    tinynet.manual_seed(0)
    cpu = resnet18(5)
    gpu = resnet18(5)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    for model, xs in ((cpu, x), (gpu, to_gpu(x))):
        loss = nn.CrossEntropyLoss()
        loss(model(xs), y)
        model.backward(loss.backward())
    for (name, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert_close_to_scale(backend.to_numpy(q.grad), p.grad, 1e-3, name)


def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path):
    from tinynet.train import load_checkpoint, save_checkpoint

    model = simple_cnn(3, image_size=16).to("cuda")
    opt = optim.Adam(model.parameters())
    x = to_gpu(np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    loss = nn.CrossEntropyLoss()
    loss(model(x), np.array([0, 1, 2, 0]))
    model.backward(loss.backward())
    opt.step()
    save_checkpoint(tmp_path / "c.npz", model, opt, epoch=1)
    cpu = simple_cnn(3, image_size=16)
    cpu_opt = optim.Adam(cpu.parameters())
    load_checkpoint(tmp_path / "c.npz", cpu, cpu_opt)
    for (k, a), (_, b) in zip(model.state_dict().items(), cpu.state_dict().items()):
        np.testing.assert_array_equal(backend.to_numpy(a), b)


def test_short_fit_on_gpu_learns_like_the_cpu(tmp_path):
    """The CPU twin is tests/test_train.py::test_fit_learns_and_keeps_history: the same data,
    model, optimizer, loaders (seeded shuffle), 4 epochs and the same 0.9 threshold; here both
    devices must pass it, and their training losses agree."""
    from tinynet.data import ArrayDataset, DataLoader
    from tinynet.train import fit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (96, 16, 16, 3)).astype(np.uint8)
    labels = np.arange(96) % 2
    images[labels == 0, :8, :8] += 150
    images[labels == 1, 8:, 8:] += 150
    data = ArrayDataset(images, labels, ["a", "b"])
    results = {}
    for device in ("cpu", "cuda"):
        tinynet.manual_seed(0)
        model = simple_cnn(2, image_size=16).to(device)
        history = fit(model, optim.Adam(model.parameters(), lr=3e-3), nn.CrossEntropyLoss(),
                      DataLoader(data, np.arange(64), 16, shuffle=True, seed=0), DataLoader(data, np.arange(64, 96), 16),
                      epochs=4, device=device, progress=False, log=None, checkpoint_path=tmp_path / f"{device}.npz")
        results[device] = history.epochs[-1]
    assert results["cpu"].val_acc > 0.9 and results["cuda"].val_acc > 0.9
    assert results["cuda"].train_loss == pytest.approx(results["cpu"].train_loss, rel=1e-2, abs=1e-3)


# ---------------------------------------------------------------------------
# Cases the first GPU suite lacked
# ---------------------------------------------------------------------------
def test_max_pool_over_more_than_256_cells_uses_int16_winners(rng):
    # 17 x 17 = 289 cells: the winner's index no longer fits uint8 (tinynet.nn.pool picks int16),
    # so the fused kernel runs with S = int16.
    x = rng.standard_normal((2, 3, 23, 23)).astype(np.float32)
    both(lambda: nn.MaxPool2d(17, 3), x, rng)
    both(lambda: nn.MaxPool2d(17, 3, 8), x, rng)  # padding too: windows partly outside


def _double(module):
    return module.double()


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv2d(3, 5, 3, 2, 1, rng=np.random.default_rng(0)), (2, 3, 9, 8)),
    (lambda: nn.MaxPool2d(3, 2, 1), (2, 3, 9, 8)),
    (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    (lambda: nn.Linear(6, 4, rng=np.random.default_rng(0)), (5, 6)),
    (nn.ReLU, (2, 3, 4, 4)),
])
def test_float64_on_the_gpu_matches_numpy_to_float64_precision(make, shape, rng):
    x = rng.standard_normal(shape)  # float64
    cpu, gpu = both(lambda: _double(make()), x, rng, rtol=1e-10)
    assert all(p.data.dtype == np.float64 for p in gpu.parameters())


def test_adam_in_float64_on_the_gpu(rng):
    w0 = rng.standard_normal((7, 5))
    p, q = nn.Parameter(w0.copy()), nn.Parameter(to_gpu(w0))
    opt_cpu, opt_gpu = optim.Adam([p], lr=0.01), optim.Adam([q], lr=0.01)
    for _ in range(3):
        g = rng.standard_normal((7, 5))
        p.grad, q.grad = g.copy(), to_gpu(g)
        opt_cpu.step()
        opt_gpu.step()
    assert q.data.dtype == np.float64
    assert_close_to_scale(backend.to_numpy(q.data), p.data, 1e-12)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"momentum": None}, {"affine": False, "momentum": None}])
def test_batch_norm_without_affine_and_with_cumulative_averages(kwargs, rng):
    cpu, gpu = nn.BatchNorm2d(4, **kwargs), nn.BatchNorm2d(4, **kwargs).to("cuda")
    for step in range(3):  # momentum=None: running statistics are the plain average over the batches seen
        x = (rng.standard_normal((5, 4, 6, 6)) * (step + 1) + step).astype(np.float32)
        g = rng.standard_normal(x.shape).astype(np.float32)
        assert_close_to_scale(backend.to_numpy(gpu(to_gpu(x))), cpu(x), RTOL, f"forward {step}")
        assert_close_to_scale(backend.to_numpy(gpu.backward(to_gpu(g))), cpu.backward(g), RTOL, f"dx {step}")
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert_close_to_scale(backend.to_numpy(b), np.asarray(a), RTOL, name)
    assert int(gpu.num_batches_tracked) == 3
    cpu.eval(), gpu.eval()
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    assert_close_to_scale(backend.to_numpy(gpu(to_gpu(x))), cpu(x), RTOL, "eval forward")


def test_gpu_to_gpu_load_state_dict_copies(rng):
    source = simple_cnn(3, image_size=16).to("cuda")
    target = simple_cnn(3, image_size=16).to("cuda")
    target.load_state_dict(source.state_dict())
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert backend.is_cupy_array(b), name
        assert a.data.ptr != b.data.ptr, f"{name}: the loaded array is the source's own memory"
        np.testing.assert_array_equal(backend.to_numpy(b), backend.to_numpy(a))
    before = {k: backend.to_numpy(v).copy() for k, v in target.state_dict().items()}
    for p in source.parameters():
        p.data[...] = 0  # as an optimizer step on the source would, in place
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(v), before[k], err_msg=k)


@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_labels_on_the_device_fail_clearly(bad, rng):
    # CuPy wraps out-of-range indices where NumPy raises: unchecked, such labels would train wrong classes.
    z = rng.standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0, 1, bad, 2])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 4\]") as on_cpu:
        nn.CrossEntropyLoss()(z, labels)
    with pytest.raises(ValueError, match=r"\[0, 4\]") as on_gpu:
        nn.CrossEntropyLoss()(to_gpu(z), to_gpu(labels))
    assert "target" in str(on_gpu.value) and str(on_cpu.value).split(":")[0] == str(on_gpu.value).split(":")[0]


def test_nan_in_a_max_pool_window_propagates_as_in_numpy(rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan
    x[1, 2, 0, 0] = np.nan  # a corner, inside a padded window
    cpu, gpu = nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1).to("cuda")
    y_cpu, y_gpu = cpu(x), backend.to_numpy(gpu(to_gpu(x)))
    assert np.isnan(y_cpu).any()
    np.testing.assert_array_equal(y_gpu, y_cpu)  # NaN where NumPy has NaN, equal elsewhere
    g = rng.standard_normal(y_cpu.shape).astype(np.float32)
    np.testing.assert_array_equal(backend.to_numpy(gpu.backward(to_gpu(g))), cpu.backward(g))


def test_nan_gradients_through_relu_backward_as_in_numpy(rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    g[0, 0, 0, :] = np.nan  # NaN upstream gradients at active and inactive units alike
    g[1, 2][x[1, 2] <= 0] = np.nan
    cpu, gpu = nn.ReLU(), nn.ReLU().to("cuda")
    cpu(x), gpu(to_gpu(x))
    dx_cpu, dx_gpu = cpu.backward(g), backend.to_numpy(gpu.backward(to_gpu(g)))
    assert np.isnan(dx_cpu).any()
    np.testing.assert_array_equal(dx_gpu, dx_cpu)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv2d(4, 6, 3, 1, 1, bias=False, rng=np.random.default_rng(0)), (3, 4, 7, 7)),
    (lambda: nn.Conv2d(4, 6, 3, 2, 1, rng=np.random.default_rng(0)), (3, 4, 8, 8)),
    (lambda: nn.BatchNorm2d(4), (3, 4, 6, 6)),
    (lambda: nn.MaxPool2d(3, 2, 1), (3, 4, 8, 8)),
    (lambda: nn.AvgPool2d(2), (3, 4, 8, 8)),
    (lambda: nn.AdaptiveAvgPool2d(1), (3, 4, 5, 5)),
    (nn.ReLU, (3, 4, 5, 5)),
    (nn.Flatten, (3, 4, 2, 2)),
    (lambda: nn.BasicBlock(4, 4, 1, None, rng=np.random.default_rng(3)), (3, 4, 6, 6)),
])
def test_single_layers_take_chwn_views_as_inside_a_network(make, shape, rng, fast_path_on):
    # Inside a network every activation is an NCHW view of a CHWN buffer (tinynet.nn.layout);
    # a layer tested alone on plain NCHW arrays would not see that layout.
    x = rng.standard_normal(shape).astype(np.float32)
    both(make, x, rng, move=chwn_on_gpu)
