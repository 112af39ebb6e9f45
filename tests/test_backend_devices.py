"""Device names: parsed into (kind, index), never compared as strings.

``"cuda:0"`` is the GPU ``"cuda"`` names; ``"cuda:1"`` is refused with a hint
(tinynet runs on one GPU, chosen with CUDA_VISIBLE_DEVICES) rather than
silently run on GPU 0.  The GPU side is checked here without a GPU, with CuPy
absent (the errors) and with a stand-in for CuPy (what moves where).
"""
import types

import numpy as np
import pytest

from tinynet import backend, nn
from tinynet.data import ArrayDataset, DataLoader
from tinynet.train import evaluate, predict


@pytest.mark.parametrize("name,expected", [
    ("cpu", ("cpu", None)), ("CPU", ("cpu", None)), ("cuda", ("cuda", None)), ("gpu", ("cuda", None)),
    ("cuda:0", ("cuda", 0)), (" cuda:3 ", ("cuda", 3)),
])
def test_device_names_parse_to_kind_and_index(name, expected):
    assert backend._parse_device(name) == expected


@pytest.mark.parametrize("name", ["tpu", "gpu0", "gpu:0", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "cuda:0:1", ""])
def test_unknown_device_names_say_what_is_accepted(name):
    with pytest.raises(ValueError, match=r"unknown device .*expected 'cpu' or 'cuda'"):
        backend.normalize_device(name)


@pytest.mark.parametrize("name", ["cuda:0", "cuda", "gpu", "Cuda:0"])
def test_cuda_spellings_normalise_to_cuda(name):
    assert backend.normalize_device(name) == "cuda"


@pytest.mark.parametrize("fn", [backend.normalize_device, backend.check_device])
def test_other_gpu_indices_are_refused_with_the_way_to_choose_a_gpu(fn):
    with pytest.raises(ValueError, match=r"'cuda:1'.*one GPU.*CUDA_VISIBLE_DEVICES=1"):
        fn("cuda:1")


# ---------------------------------------------------------------------------
# CuPy absent (CI): every cuda spelling fails the same clear way, in evaluate and predict too
# ---------------------------------------------------------------------------
needs_no_cupy = pytest.mark.skipif(backend.cupy_available(), reason="CuPy is installed")


def _model_and_loader():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = np.zeros((4, 2, 2, 3), np.uint8)
    return model, DataLoader(ArrayDataset(images, np.array([0, 1, 2, 0]), ["a", "b", "c"]), batch_size=2)


@needs_no_cupy
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_check_device_without_cupy_names_the_device_and_the_install(name):
    with pytest.raises(RuntimeError, match=rf"device '{name}' needs CuPy.*pip install -e \"\.\[cuda12\]\""):
        backend.check_device(name)


@needs_no_cupy
@pytest.mark.parametrize("call", [evaluate, predict])
def test_evaluate_and_predict_on_cuda0_do_not_quietly_stay_on_the_host(call):
    # "cuda:0" used to be compared with "cuda" literally: the batches stayed on the host and the
    # evaluation ran on the CPU as if nothing had been asked.
    model, loader = _model_and_loader()
    with pytest.raises(RuntimeError, match="'cuda:0' needs CuPy"):
        call(model, loader, device="cuda:0")


@pytest.mark.parametrize("call", [evaluate, predict])
def test_evaluate_and_predict_refuse_cuda1(call):
    model, loader = _model_and_loader()
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        call(model, loader, device="cuda:1")


# ---------------------------------------------------------------------------
# A stand-in for CuPy: what to_device moves, and the current-device check
# ---------------------------------------------------------------------------
class _FakeArray(np.ndarray):
    """A NumPy array that the backend takes for a CuPy one (it only asks isinstance)."""


def _fake_cupy(current_device=0):
    def asarray(x):
        return x if isinstance(x, _FakeArray) else np.array(x).view(_FakeArray)

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 2, getDevice=lambda: current_device)
    return types.SimpleNamespace(ndarray=_FakeArray, asarray=asarray, asnumpy=lambda a: np.array(a),
                                 cuda=types.SimpleNamespace(runtime=runtime))


def test_to_device_moves_on_every_cuda_spelling(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", _fake_cupy())
    x = np.arange(6.0).reshape(2, 3)
    for name in ("cuda", "cuda:0", "gpu"):
        moved = backend.to_device(x, name)
        assert isinstance(moved, _FakeArray)
        np.testing.assert_array_equal(moved, x)
        assert backend.to_device(moved, name) is moved  # already there: no copy
    assert not isinstance(backend.to_device(moved, "cpu"), _FakeArray)


def test_evaluate_on_cuda0_moves_the_batches(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", _fake_cupy())
    model, loader = _model_and_loader()
    seen = []
    forward = model.forward

    def spy(x):
        seen.append(type(x))
        return forward(np.asarray(x))

    monkeypatch.setattr(model, "forward", spy)
    evaluate(model, loader, device="cuda:0")
    assert seen == [_FakeArray, _FakeArray]


def test_cuda0_while_another_gpu_is_current_is_refused(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", _fake_cupy(current_device=1))
    assert backend.check_device("cuda") == "cuda"  # 'cuda' means the current device, whichever it is
    with pytest.raises(RuntimeError, match=r"'cuda:0'.*current device is GPU 1.*pass 'cuda'"):
        backend.check_device("cuda:0")
