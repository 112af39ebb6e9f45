"""The benchmark cases hand each layer arrays laid out as inside a network, on the GPU too.

Without a GPU, CuPy's transfer is played by a stand-in with its one property
that matters here: ``cupy.asarray`` of a non-contiguous view copies it into a
plain C-contiguous array.  A case that moved the NCHW view of a CHWN buffer
would then time layers on NCHW memory, and the transposes the network never does.
"""
import numpy as np
import pytest

from benchmarks import cases
from tinynet import backend, nn
from tinynet.nn.layout import from_chwn, to_chwn


def _like_cupy_asarray(a, device):
    """What cupy.asarray does to the memory order: a C-contiguous copy of anything else."""
    return np.array(a, order="C")


@pytest.fixture
def moves_like_cupy(monkeypatch):
    monkeypatch.setattr(backend, "to_device", _like_cupy_asarray)


@pytest.mark.parametrize("shape,make", [
    ((2, 3, 4, 5), lambda rng, s: from_chwn(rng.standard_normal(s[1:] + s[:1]))),  # CHWN buffer, NCHW view
    ((2, 3, 4, 5), lambda rng, s: rng.standard_normal(s)),  # plain NCHW
    ((6, 7), lambda rng, s: rng.standard_normal(s[::-1]).T),  # Fortran order
    ((1, 3, 1, 2), lambda rng, s: from_chwn(rng.standard_normal(s[1:] + s[:1]))),  # size-1 axes
])
def test_moving_keeps_the_memory_order_and_the_values(moves_like_cupy, shape, make, rng):
    a = make(rng, shape)
    moved = cases.to_device_keeping_layout(a, "cuda")
    assert moved.shape == a.shape
    # the same memory order (strides of size-1 axes say nothing: any value addresses the one element)
    assert [s for s, n in zip(moved.strides, a.shape) if n > 1] == [s for s, n in zip(a.strides, a.shape) if n > 1]
    np.testing.assert_array_equal(moved, a)


def test_moving_hands_the_transfer_a_contiguous_buffer(monkeypatch, rng):
    received = []
    monkeypatch.setattr(backend, "to_device", lambda a, device: received.append(a) or np.array(a))
    buffer = rng.standard_normal((3, 4, 5, 2))
    cases.to_device_keeping_layout(from_chwn(buffer), "cuda")
    assert received[0].flags.c_contiguous and received[0].base is buffer  # the buffer itself, not a copy


class _Recorder(nn.ReLU):
    """ReLU that records the memory layout of what it receives."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(("x", to_chwn(x).flags.c_contiguous))
        return from_chwn(np.ascontiguousarray(to_chwn(super().forward(x))))

    def backward(self, g):
        self.seen.append(("g", to_chwn(g).flags.c_contiguous))
        return super().backward(g)


def test_a_layer_case_receives_chwn_inputs_and_gradients_on_the_device(moves_like_cupy):
    layers = []

    def make():
        layers.append(_Recorder())
        return layers[-1]

    step = cases.tinynet_layer(make, (4, 3, 5, 5), chwn=True)("cpu")
    step()
    assert layers[0].seen and all(chwn for _, chwn in layers[0].seen), layers[0].seen


# ---------------------------------------------------------------------------
# TF32: set in both frameworks, recorded, refused on the CPU
# ---------------------------------------------------------------------------
def _fake_cupy_with_compute_types(monkeypatch):
    """A stand-in for CuPy's cuBLAS compute-type switch (cupy._core._routines_linalg)."""
    import sys
    import types

    state = {}
    linalg = types.SimpleNamespace(
        COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
        set_compute_type=lambda dtype, t: state.__setitem__(np.dtype(dtype), t),
        get_compute_type=lambda dtype: state[np.dtype(dtype)],
        compute_type_to_str=lambda t: {1: "COMPUTE_TYPE_DEFAULT", 7: "COMPUTE_TYPE_TF32"}[t])
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "fake"
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    for name, module in (("cupy", cupy), ("cupy._core", core), ("cupy._core._routines_linalg", linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    return state


def _fake_torch():
    import types

    flags = types.SimpleNamespace
    return flags(backends=flags(cuda=flags(matmul=flags(allow_tf32=None)), cudnn=flags(allow_tf32=None)))


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_is_set_in_both_frameworks_and_read_back(monkeypatch, enabled):
    from benchmarks import run

    state = _fake_cupy_with_compute_types(monkeypatch)
    monkeypatch.delenv("CUPY_TF32", raising=False)
    torch = _fake_torch()
    settings = run.set_tf32(enabled, torch)
    assert state[np.dtype(np.float32)] == (7 if enabled else 1)
    assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled
    assert settings == {"tf32": enabled, "cupy": "fake",
                        "cupy_float32_compute_type": "COMPUTE_TYPE_TF32" if enabled else "COMPUTE_TYPE_DEFAULT",
                        "torch_matmul_allow_tf32": enabled, "torch_cudnn_allow_tf32": enabled}
    import os

    assert os.environ["CUPY_TF32"] == ("1" if enabled else "0")


def test_tf32_modes():
    from benchmarks import run

    assert run.tf32_modes("both", "cuda") == [False, True]
    assert run.tf32_modes("on", "cuda") == [True]
    assert run.tf32_modes("off", "cpu") == [False]
    with pytest.raises(ValueError, match="TF32 exists only on the GPU"):
        run.tf32_modes("on", "cpu")


def test_cpu_rows_record_the_tf32_mode(tmp_path):
    from benchmarks import run
    import json

    out = tmp_path / "b.json"
    assert run.main(["--batch", "2", "--only", "Linear 2048", "--no-torch", "--no-memory", "--warmup", "1",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["header"]["tf32_modes"] == [False] and [r["tf32"] for r in data["rows"]] == [False]
    assert run.main(["--tf32", "on", "--json", str(out)]) == 2


def test_layer_profile_accounts_for_every_leaf_and_removes_its_timers(capsys):
    from benchmarks import layers
    from tinynet.models import simple_cnn

    model = simple_cnn(10, image_size=16)
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    timers = layers.Timers(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    model.backward(np.ones_like(model(x)))
    timers.end_step()
    assert {name for name, _ in timers.steps} == {name for name, m in model.named_modules()
                                                  if name and not list(m.children())}
    conv = timers.info["0"]
    assert conv[1] == 2 * 2 * 16 * 16 * 32 * 3 * 9  # direct forward FLOPs of the first convolution
    timers.remove()
    assert {name: dict(m.__dict__) for name, m in model.named_modules()} == before


def test_scaling_grid_times_both_frameworks_and_skips_what_would_not_fit(capsys):
    from benchmarks import scaling

    args = type("Args", (), dict(models=["cnn"], batches=[2], sizes=[16, 24], threads=1, rounds=1,
                                 max_step_s=30.0, max_memory_gb=12.0))()
    rows = scaling.grid(args)["rows"]
    assert rows[0]["tinynet_ms"] > 0 and "skipped" not in rows[0]
    assert "multiple of 16" in rows[1]["skipped"]


def test_the_pass_after_a_product_is_timed_after_both_and_blas_gets_its_count_back():
    from benchmarks import gemm_threads
    from tinynet.nn.fast import gemm

    libs = gemm._blas_libraries()
    if not libs:
        pytest.skip("threadpoolctl finds no BLAS to set")
    before = [lib.get_num_threads() for lib in libs]
    result = gemm_threads.pass_after_product(repeat=1)
    assert set(result) == {"after a 1-thread sgemm", "after a 2-thread sgemm"} and min(result.values()) > 0
    assert [lib.get_num_threads() for lib in libs] == before
