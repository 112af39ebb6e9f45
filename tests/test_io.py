"""tinynet.io: PyTorch / npz / safetensors weights, and the defences against hostile files.

Runs without PyTorch: the .pth files of the hostile cases are built here, byte
for byte, by a pickler that writes PyTorch's global names without importing
it (:class:`_TorchLikePickler`).  The committed fixtures come from
``tools/make_resnet18_fixture.py``.  Tests marked optional import torch with
``importorskip``.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tinynet
from tinynet import backend, nn
from tinynet.io import (Limits, UnsafeFileError, WeightsFileError, WeightsLimitError, load_into, load_weights,
                        save_weights)
from tinynet.models import resnet18

from conftest import assert_close_to_scale, torch_or_skip

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
RESNET_PTH = FIXTURES / "resnet18_w8.pth"
ZOO_PTH = FIXTURES / "tensors_zoo.pth"


# ---------------------------------------------------------------------------
# Building PyTorch-like files without PyTorch
# ---------------------------------------------------------------------------
class _Global:
    """A name written as a pickle GLOBAL (``module.name``) without importing the module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that a REDUCE's callable be callable
        raise AssertionError("never called: only written")


class _Call:
    """Pickles as REDUCE ``func(*args)`` (and BUILD ``state`` when given)."""

    def __init__(self, func: _Global, args: tuple, state=None):
        self.func, self.args, self.state = func, args, state


class _Storage:
    """Pickles as the persistent id ``('storage', torch.<type>, key, 'cpu', numel)``."""

    def __init__(self, key: str, data: np.ndarray, type_name: str | None = None, numel: int | None = None):
        self.key, self.data = key, np.ascontiguousarray(data)
        self.type_name = type_name or {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage",
                                       np.dtype("float64"): "DoubleStorage"}[self.data.dtype]
        self.numel = self.data.size if numel is None else numel


def _tensor(storage: _Storage, offset=0, size=None, stride=None) -> _Call:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    size = (storage.data.size,) if size is None else size
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    return _Call(_Global("torch._utils", "_rebuild_tensor_v2"),
                 (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict()))


class _TorchLikePickler(pickle._Pickler):
    """The pure-Python pickler, taught to write :class:`_Global`, :class:`_Call` and storage ids."""

    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _Global("torch", obj.type_name), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Call):
            return (obj.func, obj.args) if obj.state is None else (obj.func, obj.args, obj.state)
        return NotImplemented


def _save_global(pickler, obj):
    pickler.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())


_TorchLikePickler.dispatch[_Global] = _save_global


def _storages_in(obj, found):
    if isinstance(obj, _Storage):
        found[obj.key] = obj
    elif isinstance(obj, _Call):
        _storages_in(obj.args, found)
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages_in(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages_in(v, found)
    return found


def _write_pth(path, obj=None, *, data_pkl: bytes | None = None, storages=None, prefix="archive",
               byteorder: bytes | None = b"little", compression=zipfile.ZIP_STORED) -> pathlib.Path:
    """A zip laid out as torch.save writes one; the pickle is ``data_pkl`` or ``obj`` pickled."""
    if data_pkl is None:
        buf = io.BytesIO()
        _TorchLikePickler(buf, protocol=2).dump(obj)
        data_pkl = buf.getvalue()
    storages = _storages_in(obj, {}) if storages is None else storages
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, storage in storages.items():
            raw = storage if isinstance(storage, bytes) else storage.data.tobytes()
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return pathlib.Path(path)


def _small_state_dict():
    """Two float32 tensors and an int64 0-d buffer, in torch's pickled form."""
    w = _Storage("0", np.arange(6, dtype=np.float32))
    n = _Storage("1", np.array([7], dtype=np.int64))
    return collections.OrderedDict([
        ("w", _tensor(w, 0, (2, 3))), ("wt", _tensor(w, 0, (3, 2), (1, 3))), ("n", _tensor(n, 0, (), ())),
    ])


def _patch_declared_size(path: pathlib.Path, member: str, size: int) -> None:
    """Overwrite the uncompressed size the central directory declares for ``member``."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = int.from_bytes(data[pos + 28:pos + 30], "little")
        if data[pos + 46:pos + 46 + name_len] == name:
            data[pos + 24:pos + 28] = size.to_bytes(4, "little")
            path.write_bytes(bytes(data))
            return
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"no central-directory entry for {member}")


def _safetensors_file(path, header, data: bytes = b"", header_len: int | None = None) -> pathlib.Path:
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(raw) if header_len is None else header_len
    pathlib.Path(path).write_bytes(n.to_bytes(8, "little") + raw + data)
    return pathlib.Path(path)


# ---------------------------------------------------------------------------
# Parity with files written by PyTorch (committed fixtures)
# ---------------------------------------------------------------------------
def test_resnet18_fixture_gives_pytorchs_logits():
    """torchvision's layout at width 8, saved by torch.save: eval logits within 1e-4 of max|logits| (relative
    to scale, ``assert_close_to_scale``); measured 2.5e-7."""
    model = resnet18(10, head="linear", width=8)
    result = load_into(model, RESNET_PTH)
    assert result == nn.LoadResult([], [], [])
    model.eval()
    expected = np.load(FIXTURES / "resnet18_w8_expected.npz")
    with tinynet.no_grad():
        logits = model(expected["x"])
    assert_close_to_scale(logits, expected["logits"], 1e-4, "logits")
    assert int(model.bn1.num_batches_tracked) == 3  # the buffers came from the file too
    assert not np.allclose(model.bn1.running_var, 1.0)


def test_resnet18_fixture_keys_order_and_dtypes():
    sd = load_weights(RESNET_PTH)
    model_keys = list(resnet18(10, head="linear", width=8).state_dict())
    assert list(sd) == model_keys  # torch.save keeps the state dict's order
    assert sd["conv1.weight"].shape == (8, 3, 7, 7) and sd["conv1.weight"].dtype == np.float32
    nbt = sd["layer1.0.bn1.num_batches_tracked"]
    assert nbt.dtype == np.int64 and nbt.shape == ()
    assert all(a.flags.c_contiguous and a.flags.writeable for a in sd.values())


def test_zoo_fixture_every_dtype_view_and_stride():
    got = load_weights(ZOO_PTH)
    expected = np.load(FIXTURES / "tensors_zoo_expected.npz")
    assert list(got) == expected.files
    for key in expected.files:
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert got["bfloat16"].dtype == np.float32 and got["bfloat16"][0] == np.float32(0.333984375)  # 1/3 in bf16
    assert got["scalar_int64"].shape == () and got["scalar_int64"] == 42
    # The two views were saved as one storage: one data member fewer than tensors.
    with zipfile.ZipFile(ZOO_PTH) as zf:
        members = [n for n in zf.namelist() if "/data/" in n and not n.split("/")[-2].startswith(".")]
    assert len(members) == len(expected.files) - 1


def test_pth_reader_never_imports_torch():
    code = ("import sys, tinynet.io; tinynet.io.load_weights(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(ZOO_PTH)], check=True, timeout=120)


def test_format_comes_from_content_not_extension(tmp_path):
    shutil.copy(ZOO_PTH, tmp_path / "zoo.npz")
    assert list(load_weights(tmp_path / "zoo.npz")) == list(load_weights(ZOO_PTH))
    saved = save_weights({"a": np.arange(3.0)}, tmp_path / "w.safetensors")
    shutil.copy(saved, tmp_path / "w.pth")
    np.testing.assert_array_equal(load_weights(tmp_path / "w.pth")["a"], np.arange(3.0))
    saved = save_weights({"a": np.arange(3)}, tmp_path / "w.npz")
    shutil.copy(saved, tmp_path / "w.bin")
    np.testing.assert_array_equal(load_weights(str(tmp_path / "w.bin"))["a"], np.arange(3))


# ---------------------------------------------------------------------------
# Round trips through save_weights
# ---------------------------------------------------------------------------
def _every_dtype_state_dict():
    rng = np.random.default_rng(0)
    sd = collections.OrderedDict()
    sd["z.first"] = rng.standard_normal((3, 4)).astype(np.float32)  # keys are not sorted on the way
    sd["a.float64"] = rng.standard_normal(5)
    sd["m.float16"] = rng.standard_normal((2, 2)).astype(np.float16)
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        info = np.iinfo(t)
        sd[f"int.{np.dtype(t).name}"] = np.array([info.min, 0, 1, info.max], dtype=t)
    sd["bool"] = np.array([[True, False], [False, True]])
    sd["num_batches_tracked"] = np.array(123, dtype=np.int64)  # 0-d
    sd["empty"] = np.zeros((0, 3), dtype=np.float32)
    sd["special"] = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)
    sd["file"] = np.ones(2)  # would clash with np.savez(file, ...)
    sd["allow_pickle"] = np.ones(2)  # would clash with np.savez(..., allow_pickle=)
    return sd


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_round_trip_is_exact(tmp_path, ext):
    sd = _every_dtype_state_dict()
    path = save_weights(sd, tmp_path / f"w{ext}")
    assert path == tmp_path / f"w{ext}"
    back = load_weights(path)
    # The safetensors writer sorts tensors by dtype size, then name (for alignment); .npz keeps the order.
    assert list(back) == list(sd) if ext == ".npz" else sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert np.signbit(back["special"][3])  # -0.0 kept bit for bit


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_round_trip_of_views_big_endian_and_parameters(tmp_path, ext):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    sd = {"t": base.T, "s": base[1:, ::2], "be": base.astype(">f4"), "p": nn.Parameter(base * 2), "i": 3}
    back = load_weights(save_weights(sd, tmp_path / f"w{ext}"))
    np.testing.assert_array_equal(back["t"], base.T)
    np.testing.assert_array_equal(back["s"], base[1:, ::2])
    assert back["be"].dtype == np.float32 and back["be"].dtype.isnative  # stored little-endian
    np.testing.assert_array_equal(back["be"], base)
    np.testing.assert_array_equal(back["p"], base * 2)
    assert back["i"].shape == () and back["i"] == 3


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_model_round_trip_through_a_file(tmp_path, ext):
    source = resnet18(4, width=8, rng=np.random.default_rng(1))
    source.bn1.running_mean[:] = 0.5
    path = save_weights(source, tmp_path / f"model{ext}")  # a Module saves its state_dict()
    target = resnet18(4, width=8, rng=np.random.default_rng(2))
    assert load_into(target, path) == nn.LoadResult([], [], [])
    for (k, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_safetensors_writer_layout(tmp_path):
    """The safetensors package lays the file out: back to back, the data section 8-byte aligned."""
    path = save_weights(collections.OrderedDict(b=np.ones(3, np.float16), a=np.arange(2)), tmp_path / "w.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and len(raw) == 8 + n + 6 + 16
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}  # 8-byte items first
    assert header["b"] == {"dtype": "F16", "shape": [3], "data_offsets": [16, 22]}


def test_safetensors_metadata_round_trips(tmp_path):
    meta = {"classes": json.dumps(["cat", "dog"]), "image_size": "64"}
    path = save_weights({"w": np.ones(2, np.float32)}, tmp_path / "m.safetensors", metadata=meta)
    assert tinynet.io.read_metadata(path) == meta
    state, got = load_weights(path, with_metadata=True)
    assert got == meta and list(state) == ["w"]
    assert tinynet.io.read_metadata(save_weights({"w": np.ones(2)}, tmp_path / "n.safetensors")) == {}
    assert tinynet.io.read_metadata(save_weights({"w": np.ones(2)}, tmp_path / "n.npz")) == {}
    with pytest.raises(ValueError, match="only .safetensors files hold metadata"):
        save_weights({"w": np.ones(2)}, tmp_path / "x.npz", metadata=meta)
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_weights({"w": np.ones(2)}, tmp_path / "x.safetensors", metadata={"size": 64})
    assert not (tmp_path / "x.safetensors").exists()


def test_safetensors_reads_bf16_and_metadata(tmp_path):
    values = np.array([1 / 3, -2.5, 3e38], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")  # truncation to bfloat16
    header = {"__metadata__": {"format": "pt"}, "x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}
    got = load_weights(_safetensors_file(tmp_path / "bf.safetensors", header, bits.tobytes()))
    assert list(got) == ["x"] and got["x"].dtype == np.float32
    np.testing.assert_array_equal(got["x"], (bits.astype(np.uint32) << 16).view(np.float32))


def test_save_weights_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"extension '\.pth'.*\.npz, \.safetensors"):
        save_weights({"a": np.ones(1)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="extension '\\(none\\)'"):
        save_weights({"a": np.ones(1)}, tmp_path / "weights")
    with pytest.raises(TypeError, match="keys must be str"):
        save_weights({1: np.ones(1)}, tmp_path / "w.npz")
    with pytest.raises(TypeError, match="'obj' has dtype object"):
        save_weights({"obj": np.array([{}], dtype=object)}, tmp_path / "w.npz")
    with pytest.raises(TypeError, match="complex128"):
        save_weights({"c": np.ones(2, complex)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        save_weights({"__metadata__": np.ones(1)}, tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_weights({"a": np.ones(1)}, tmp_path / "no" / "w.npz")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError):
        save_weights({"a": np.ones(1)}, tmp_path / "d.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]  # no file, no leftover temporary


def test_save_weights_is_atomic(tmp_path, monkeypatch):
    """A writer that dies half-way leaves the previous file whole and no temporary behind."""
    path = save_weights({"a": np.arange(4.0)}, tmp_path / "w.npz")
    before = path.read_bytes()

    def dying_writer(f, arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setitem(tinynet.io.weights.SAVE_FORMATS, ".npz", dying_writer)
    with pytest.raises(KeyboardInterrupt):
        save_weights({"a": np.zeros(4)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


# ---------------------------------------------------------------------------
# Checkpoint dicts
# ---------------------------------------------------------------------------
def test_checkpoint_dict_is_unwrapped(tmp_path):
    ckpt = {"epoch": 3, "state_dict": _small_state_dict(), "optimizer": {"lr": 0.1, "momentum": [0.9]}}
    sd = load_weights(_write_pth(tmp_path / "ckpt.pth", ckpt))
    assert list(sd) == ["w", "wt", "n"]
    np.testing.assert_array_equal(sd["wt"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert sd["n"].shape == () and sd["n"] == 7


def test_parameters_are_unwrapped(tmp_path):
    s = _Storage("0", np.arange(4, dtype=np.float32))
    param = _Call(_Global("torch._utils", "_rebuild_parameter"), (_tensor(s), True, collections.OrderedDict()))
    sd = load_weights(_write_pth(tmp_path / "p.pth", {"model": {"w": param}, "step": 10}))
    np.testing.assert_array_equal(sd["w"], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("make, message", [
    (lambda: {"model": _small_state_dict(), "state_dict": _small_state_dict()},
     "holds several state dicts \\(state_dict, model\\)"),
    (lambda: {"epoch": 3, "best": 0.5}, r"the file holds a dict \{'epoch': int, 'best': float\}"),
    (lambda: [1, 2], "the file holds a list"),
])
def test_ambiguous_or_foreign_checkpoints_are_refused(tmp_path, make, message):
    with pytest.raises(WeightsFileError, match=message):
        load_weights(_write_pth(tmp_path / "c.pth", make()))


# ---------------------------------------------------------------------------
# Hostile pickles: nothing runs
# ---------------------------------------------------------------------------
class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Evals:
    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
def test_reduce_payload_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _RunsCommand(f"touch {marker}")}, protocol=protocol)
    path = _write_pth(tmp_path / "evil.pth", data_pkl=payload, storages={})
    with pytest.raises(UnsafeFileError, match=r"refused global '(posix|nt|os)\.system'") as info:
        load_weights(path)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)
    assert not marker.exists()
    pickle.loads(payload)  # the control: the payload is live, plain pickle runs it
    assert marker.exists()


def test_eval_payload_after_real_tensors_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = _small_state_dict()
    sd["zz.evil"] = _Evals(f"open({str(marker)!r}, 'w').close()")
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(sd)
    path = _write_pth(tmp_path / "evil.pth", data_pkl=buf.getvalue(), storages=_storages_in(_small_state_dict(), {}))
    with pytest.raises(UnsafeFileError, match=r"refused global '(__builtin__|builtins)\.eval'"):
        load_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("subprocess", "Popen"), ("builtins", "getattr"), ("__builtin__", "eval"), ("numpy", "load"),
    ("torch", "UntypedStorage"), ("torch._utils", "_rebuild_tensor"),
    ("torch.serialization", "_get_layout"), ("torch", "device"), ("collections", "defaultdict"),
])
def test_any_other_global_is_refused(tmp_path, module, name):
    obj = {"w": _Call(_Global(module, name), ("ls",))}
    with pytest.raises(UnsafeFileError, match=f"refused global '{module}.{name}'"):
        load_weights(_write_pth(tmp_path / "g.pth", obj))


def test_unknown_storage_type_in_a_storage_id_is_refused(tmp_path):
    s = _Storage("0", np.zeros(2, np.float32), type_name="NoSuchStorage")
    with pytest.raises(UnsafeFileError, match="torch.NoSuchStorage"):
        load_weights(_write_pth(tmp_path / "q.pth", {"w": _tensor(s)}))


@pytest.mark.parametrize("type_name", ["ComplexFloatStorage", "QInt8Storage"])
def test_legitimate_but_unsupported_storage_dtypes_are_unsupported_not_unsafe(tmp_path, type_name):
    s = _Storage("0", np.zeros(2, np.float32), type_name=type_name, numel=1)
    message = f"unsupported dtype: a tensor is stored through torch.{type_name}"
    with pytest.raises(WeightsFileError, match=message) as info:
        load_weights(_write_pth(tmp_path / "c.pth", {"w": _tensor(s)}))
    assert not isinstance(info.value, UnsafeFileError) and "unsafe" not in str(info.value).replace("not unsafe", "")


@pytest.mark.parametrize("dtype", ["uint16", "complex64", "uint32"])
def test_torch_files_of_unsupported_dtypes_say_unsupported(tmp_path, dtype):
    torch = torch_or_skip()
    torch.save({"w": torch.zeros(3, dtype=getattr(torch, dtype))}, tmp_path / "u.pth")
    with pytest.raises(WeightsFileError, match="unsupported dtype") as info:
        load_weights(tmp_path / "u.pth")
    assert not isinstance(info.value, UnsafeFileError)


@pytest.mark.parametrize("obj, message", [
    ({"w": _Call(_Global("torch", "FloatStorage"), (10,))}, "tried to call torch.FloatStorage"),
    ({"w": _Call(_Global("torch._utils", "_rebuild_tensor_v2"),
                 (_Storage("0", np.zeros(2, np.float32)), 0, (2,), (1,), False, collections.OrderedDict()),
                 state={"data": 1})}, "set the state of a _Tensor"),
])
def test_allowed_names_cannot_be_misused(tmp_path, obj, message):
    with pytest.raises(UnsafeFileError, match=message):
        load_weights(_write_pth(tmp_path / "m.pth", obj))


class _CallWithItems(_Call):
    """Pickles as REDUCE ``func(*args)``, then SETITEMS ``items`` on the result."""

    def __init__(self, func: _Global, args: tuple, items: dict):
        super().__init__(func, args)
        self.items = items


class _ItemsPickler(_TorchLikePickler):
    def reducer_override(self, obj):
        if isinstance(obj, _CallWithItems):
            return obj.func, obj.args, None, None, iter(obj.items.items())
        return super().reducer_override(obj)


def _pickled_with_items(obj) -> bytes:
    buf = io.BytesIO()
    _ItemsPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _rebuilt(storage=None):
    storage = storage or _Storage("0", np.zeros(2, np.float32))
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (storage, 0, (2,), (1,), False, collections.OrderedDict()))


#: Every way the .pth reader refuses a pickle or an archive: (name, write(path) -> path, error class).
_REFUSED_PTH = [
    ("BUILD on a rebuilt tensor", lambda p: _write_pth(p, {"w": _Call(*_rebuilt(), state={"data": 1})}),
     UnsafeFileError),
    ("BUILD on a storage class", lambda p: _write_pth(p, data_pkl=b"\x80\x02ctorch\nFloatStorage\n}b.", storages={}),
     UnsafeFileError),
    ("SETITEM on a rebuilt tensor", lambda p: _write_pth(
        p, data_pkl=_pickled_with_items({"w": _CallWithItems(*_rebuilt(), {0: 1.0})}),
        storages={"0": _Storage("0", np.zeros(2, np.float32))}), UnsafeFileError),
    ("calling a storage class", lambda p: _write_pth(p, {"w": _Call(_Global("torch", "FloatStorage"), (10,))}),
     UnsafeFileError),
    ("refused global", lambda p: _write_pth(p, {"w": _Call(_Global("os", "system"), ("ls",))}), UnsafeFileError),
    ("unsupported dtype", lambda p: _write_pth(
        p, {"w": _tensor(_Storage("0", np.zeros(2, np.float32), type_name="ComplexFloatStorage", numel=1))}),
     WeightsFileError),
    ("unknown storage class", lambda p: _write_pth(
        p, {"w": _tensor(_Storage("0", np.zeros(2, np.float32), type_name="NoSuchStorage"))}), UnsafeFileError),
    ("refused opcode", lambda p: _write_pth(p, data_pkl=b"\x80\x02\x82\x01.", storages={}), UnsafeFileError),
    ("pickle cut short", lambda p: _write_pth(p, data_pkl=b"\x80\x02}q\x00(X\x01\x00\x00", storages={}),
     WeightsFileError),
    ("huge memo index", lambda p: _write_pth(p, data_pkl=b"\x80\x02Nr" + (1 << 26).to_bytes(4, "little") + b".",
                                             storages={}), WeightsFileError),
    ("persistent id not a storage", lambda p: _write_pth(p, data_pkl=b"\x80\x02X\x01\x00\x00\x00xQ.", storages={}),
     WeightsFileError),
    ("missing storage member", lambda p: _write_pth(p, {"w": _tensor(_Storage("0", np.zeros(4, np.float32)))},
                                                    storages={}), WeightsFileError),
    ("storage size mismatch", lambda p: _write_pth(p, {"w": _tensor(_Storage("0", np.zeros(4, np.float32),
                                                                              numel=8))}), WeightsFileError),
    ("view past the storage", lambda p: _write_pth(p, _one(_Storage("0", np.zeros(4, np.float32)), 0, (10,), (1,))),
     WeightsFileError),
    ("negative offset", lambda p: _write_pth(p, _one(_Storage("0", np.zeros(4, np.float32)), -1, (2,), (1,))),
     WeightsFileError),
    ("rebuild with a non-storage", lambda p: _write_pth(
        p, {"w": _Call(_Global("torch._utils", "_rebuild_tensor_v2"), (1, 0, (2,), (1,), False, None))}),
     WeightsFileError),
    ("rebuild with too few arguments", lambda p: _write_pth(
        p, {"w": _Call(_Global("torch._utils", "_rebuild_tensor_v2"), (1,))}), WeightsFileError),
    ("parameter of a non-tensor", lambda p: _write_pth(
        p, {"w": _Call(_Global("torch._utils", "_rebuild_parameter"), (1, False, collections.OrderedDict()))}),
     WeightsFileError),
    ("conflicting storage types", lambda p: _write_pth(
        p, {"w": _tensor(_Storage("0", np.zeros(4, np.float32))), "v": _tensor(_Storage("0", np.zeros(2, np.int64)))},
        storages={"0": _Storage("0", np.zeros(4, np.float32))}), WeightsFileError),
    ("not a state dict", lambda p: _write_pth(p, [1, 2]), WeightsFileError),
    ("checkpoint without a state dict", lambda p: _write_pth(p, {"epoch": 3}), WeightsFileError),
    ("two state dicts", lambda p: _write_pth(p, {"model": _small_state_dict(), "state_dict": _small_state_dict()}),
     WeightsFileError),
    ("big-endian", lambda p: _write_pth(p, _small_state_dict(), byteorder=b"big"), WeightsFileError),
    ("TorchScript", lambda p: _torchscript(_write_pth(p, _small_state_dict())), WeightsFileError),
    ("two data.pkl", lambda p: _second_archive(_write_pth(p, _small_state_dict())), WeightsFileError),
]


def _torchscript(path):
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/constants.pkl", b"")
    return path


def _second_archive(path):
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("other/data.pkl", b"\x80\x02}.")
    return path


@pytest.mark.parametrize("name, write, error", _REFUSED_PTH, ids=[case[0] for case in _REFUSED_PTH])
def test_every_refused_pth_names_the_file(tmp_path, name, write, error):
    path = write(tmp_path / "weights-under-test.pth")
    with pytest.raises(error) as info:
        load_weights(path)
    message = str(info.value)
    assert str(path) in message, message  # before the fix: BUILD, SETITEM and calls on stand-ins named no file
    assert len(message.splitlines()) == 1, message


@pytest.mark.parametrize("body, error, message", [
    # BINBYTES8 claiming 1 TiB: the C unpickler would allocate it before reading.
    (b"\x8e" + (1 << 40).to_bytes(8, "little") + b"x.", WeightsFileError, "expected 1099511627776 bytes in a bytes8"),
    # LONG_BINPUT 2**26: the C unpickler would grow its memo to 2**27 zeroed pointers (1 GiB).
    (b"N" + b"r" + (1 << 26).to_bytes(4, "little") + b".", WeightsFileError, "memo index 67108864 at byte 3"),
    (b"\x95" + (1 << 40).to_bytes(8, "little") + b"N.", WeightsFileError, "frame of 1099511627776 bytes"),
    (b"\x82\x01.", UnsafeFileError, "refused opcode EXT1"),  # a global through copyreg's registry
    (b"}q\x00(X\x01\x00\x00", WeightsFileError, "not a valid pickle"),  # cut short
])
def test_pickle_is_scanned_before_the_unpickler_allocates(tmp_path, body, error, message):
    path = _write_pth(tmp_path / "p.pth", data_pkl=b"\x80\x02" + body, storages={})
    with pytest.raises(error, match=message):
        load_weights(path)


# ---------------------------------------------------------------------------
# Inconsistent .pth files
# ---------------------------------------------------------------------------
def _one(storage, *view):
    return {"w": _tensor(storage, *view)}


@pytest.mark.parametrize("make, message", [
    (lambda: _one(_Storage("0", np.zeros(4, np.float32)), 0, (10,), (1,)), r"reads element 9 of storage '0', which has 4"),
    (lambda: _one(_Storage("0", np.zeros(4, np.float32)), 3, (2, 2), (2, 1)), "reads element 6"),
    (lambda: _one(_Storage("0", np.zeros(4, np.float32)), -1, (2,), (1,)), "storage_offset -1"),
    (lambda: _one(_Storage("0", np.zeros(4, np.float32)), 0, (2,), (-1,)), "stride"),
    (lambda: _one(_Storage("0", np.zeros(4, np.float32)), 0, (2, 2), (1,)), "as many"),
    (lambda: _one(_Storage("0", np.zeros(4, np.float32), numel=8)), "holds 16 bytes; torch.FloatStorage of 8"),
])
def test_tensor_geometry_is_checked_before_reading(tmp_path, make, message):
    with pytest.raises(WeightsFileError, match=message):
        load_weights(_write_pth(tmp_path / "t.pth", make()))


def test_missing_storage_member_and_conflicting_types(tmp_path):
    s = _Storage("0", np.zeros(4, np.float32))
    with pytest.raises(WeightsFileError, match="no member 'archive/data/0'"):
        load_weights(_write_pth(tmp_path / "a.pth", {"w": _tensor(s)}, storages={}))
    other = _Storage("0", np.zeros(2, np.int64))
    with pytest.raises(WeightsFileError, match="referenced as torch.FloatStorage and as torch.LongStorage"):
        load_weights(_write_pth(tmp_path / "b.pth", {"w": _tensor(s), "v": _tensor(other)}, storages={"0": s}))


def test_big_endian_file_is_refused(tmp_path):
    with pytest.raises(WeightsFileError, match="'big'.*little-endian"):
        load_weights(_write_pth(tmp_path / "be.pth", _small_state_dict(), byteorder=b"big"))
    # Files from before PyTorch 1.12 have no byteorder member, and are little-endian.
    sd = load_weights(_write_pth(tmp_path / "old.pth", _small_state_dict(), byteorder=None, prefix="old"))
    assert list(sd) == ["w", "wt", "n"]


def test_legacy_and_bare_pickles_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    with pytest.raises(WeightsFileError, match=r"legacy serialization format \(before 1\.6.*torch\.save\(torch\.load"):
        load_weights(legacy)
    bare = tmp_path / "bare.npz"
    bare.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(WeightsFileError, match="a bare pickle"):
        load_weights(bare)


def test_torchscript_archive_is_refused(tmp_path):
    path = _write_pth(tmp_path / "scripted.pt", _small_state_dict())
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/constants.pkl", b"")
    with pytest.raises(WeightsFileError, match="TorchScript"):
        load_weights(path)


# ---------------------------------------------------------------------------
# Zip bombs and limits
# ---------------------------------------------------------------------------
def test_members_larger_than_the_limit_are_refused(tmp_path):
    path = _write_pth(tmp_path / "big.pth", {"w": _tensor(_Storage("0", np.zeros(1024, np.float32)))})
    with pytest.raises(WeightsLimitError, match="more than the limit of 2000 bytes"):
        load_weights(path, max_bytes=2000)
    assert load_weights(path, max_bytes=8000)["w"].shape == (1024,)


def _rezip(src: pathlib.Path, dst: pathlib.Path, level: int = 6) -> pathlib.Path:
    """``src`` with every member deflated, as ``zip -r`` or a model hub's repacking writes it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return dst


def test_rezipped_torch_save_of_a_fresh_resnet18_loads(tmp_path):
    """Its all-zero biases and running means deflate >100:1; the weights beside them do not compress at all."""
    torch = torch_or_skip()
    sd = resnet18(1000, head="linear").state_dict()
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp_path / "resnet18.pth")
    path = _rezip(tmp_path / "resnet18.pth", tmp_path / "resnet18-deflated.pth")
    with zipfile.ZipFile(path) as zf:
        ratios = [i.file_size / i.compress_size for i in zf.infolist() if i.compress_size]
    assert max(ratios) > 100  # the member that the per-member ratio check refused
    back = load_weights(path)
    assert list(back) == list(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def _zip_of_zeros(path, members: int, member_bytes: int) -> pathlib.Path:
    zeros = bytes(min(member_bytes, 1 << 20))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for i in range(members):
            with zf.open(f"archive/data/{i}", "w") as f:
                for _ in range(member_bytes // len(zeros)):
                    f.write(zeros)
        zf.writestr("archive/data.pkl", b"\x80\x02}.")
    return pathlib.Path(path)


@pytest.mark.parametrize("members, member_bytes", [(1, 80 << 20), (1280, 64 << 10)])
def test_zip_bombs_are_refused_before_anything_is_inflated(tmp_path, members, member_bytes):
    """80 MiB in one member, or in 1280 small ones, each in a file of ~0.1-0.2 MB: the total is refused."""
    path = _zip_of_zeros(tmp_path / "bomb.pth", members, member_bytes)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(WeightsLimitError, match=r"ratio \d+:1\), more than the limit of 100:1"):
        load_weights(path)
    npz_path = _zip_of_zeros(tmp_path / "bomb.npz", members, member_bytes)
    with pytest.raises(WeightsLimitError, match=r"more than the limit of 100:1"):
        load_weights(npz_path)


def test_compression_ratio_limits_are_configurable(tmp_path):
    path = _rezip(_write_pth(tmp_path / "z.pth", {"w": _tensor(_Storage("0", np.zeros(1 << 18, np.float32)))}),
                  tmp_path / "zd.pth", level=9)  # 1 MiB of zeros in a file of ~2 kB
    assert load_weights(path)["w"].shape == (1 << 18,)  # under ratio_free_bytes: never refused by ratio
    with pytest.raises(WeightsLimitError, match="Limits.ratio_free_bytes"):
        load_weights(path, ratio_free_bytes=1 << 19)
    assert load_weights(path, ratio_free_bytes=1 << 19, max_compression_ratio=10_000)["w"].shape == (1 << 18,)


def test_declared_size_is_checked_before_anything_is_inflated(tmp_path):
    path = _write_pth(tmp_path / "lie.pth", _small_state_dict())
    _patch_declared_size(path, "archive/data/0", 0x7FFFFFFF)  # claims 2 GiB
    with pytest.raises(WeightsLimitError, match=r"declare at least 2147\d{6} uncompressed bytes \(at 'archive/data/0'\)"):
        load_weights(path, max_bytes=1 << 20)
    with pytest.raises(WeightsFileError):  # under the default limit the lie is caught on reading
        load_weights(path)


def test_oversized_pickle_is_refused(tmp_path):
    path = _write_pth(tmp_path / "p.pth", _small_state_dict())
    with pytest.raises(WeightsLimitError, match="data.pkl is \\d+ bytes, more than the limit of 64"):
        load_weights(path, max_pickle_bytes=64)


def test_stride_zero_expansion_counts_against_the_limit(tmp_path):
    one = _Storage("0", np.zeros(1, np.float32))
    path = _write_pth(tmp_path / "x.pth", _one(one, 0, (10 ** 6, 10 ** 6), (0, 0)))  # 4 TB from 4 bytes
    with pytest.raises(WeightsLimitError, match="4000000000000 bytes"):
        load_weights(path)


def test_npz_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, zeros=np.zeros(1 << 19))  # 4 MiB of zeros in a few kB
    assert path.stat().st_size < 50_000
    with pytest.raises(WeightsLimitError, match="limit of 1048576 bytes"):
        load_weights(path, max_bytes=1 << 20)
    assert load_weights(path)["zeros"].shape == (1 << 19,)  # an honest compressed .npz still loads


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_bytes must be a positive int, got 0"):
        load_weights(ZOO_PTH, max_bytes=0)
    assert Limits().max_bytes == 4 << 30


# ---------------------------------------------------------------------------
# Hostile or broken .safetensors
# ---------------------------------------------------------------------------
_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, header_len, error, message", [
    (b"{}", b"", 200_000_000, WeightsLimitError, "200000000 bytes .* exceeds the limit of 100000000"),
    (b"{}", b"", (1 << 64) - 1, WeightsLimitError, "as a signed int -1"),
    (b"{}", b"", 1000, WeightsFileError, "only 2 bytes follow it; the file is truncated"),
    (b"{not json", b"", None, WeightsFileError, "not valid UTF-8 JSON"),
    (b'{"a": 1, "a": 2}', b"", None, WeightsFileError, "'a' appears twice"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"", None, WeightsFileError, "expected an object with dtype"),
    ({"a": {**_ENTRY, "dtype": "C64"}}, bytes(8), None, WeightsFileError, "unsupported dtype 'C64'"),
    ({"a": {"dtype": "F32", "shape": [0, 2 ** 62], "data_offsets": [0, 0]}}, b"", None, WeightsFileError,
     r"'a': shape \(0, 4611686018427387904\) is not a real array"),
    ({"a": {**_ENTRY, "shape": [-2]}}, bytes(8), None, WeightsFileError, "shape"),
    ({"a": {**_ENTRY, "shape": [3]}}, bytes(8), None, WeightsFileError, r"12 bytes, but its data_offsets \[0, 8\] span 8"),
    ({"a": {**_ENTRY, "data_offsets": [8, 0]}}, bytes(8), None, WeightsFileError, "0 <= begin <= end"),
    # Layout errors come from the safetensors package, wrapped: a hole, an overlap, too few or too many bytes.
    ({"a": {**_ENTRY, "data_offsets": [8, 16]}}, bytes(8), None, WeightsFileError, "invalid offset for tensor `a`"),
    ({"a": _ENTRY, "b": {**_ENTRY, "data_offsets": [4, 12]}}, bytes(12), None, WeightsFileError,
     "invalid offset for tensor `b`"),
    ({"a": _ENTRY}, bytes(4), None, WeightsFileError, "not a valid .safetensors file .*not fully covered"),
    ({"a": _ENTRY}, bytes(12), None, WeightsFileError, "not a valid .safetensors file .*not fully covered"),
    ({"__metadata__": [1], "a": _ENTRY}, bytes(8), None, WeightsFileError, r"__metadata__ is \[1\], expected"),
    ({"__metadata__": {"n": 1}, "a": _ENTRY}, bytes(8), None, WeightsFileError, "expected an object of str -> str"),
    (b"[1]", b"", None, WeightsFileError, "unknown format"),  # no '{' at byte 8: not taken for safetensors
])
def test_bad_safetensors_are_refused(tmp_path, header, data, header_len, error, message):
    path = _safetensors_file(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(error, match=message):
        load_weights(path)


def test_empty_padded_safetensors_header_is_valid(tmp_path):
    assert load_weights(_safetensors_file(tmp_path / "s.safetensors", b"{}      ")) == collections.OrderedDict()


# ---------------------------------------------------------------------------
# .npz specifics
# ---------------------------------------------------------------------------
def test_object_array_npz_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, weight=np.ones(2), evil=np.array([{"a": 1}], dtype=object))  # savez pickles object arrays
    with pytest.raises(WeightsFileError, match="'evil' has dtype object.*allow_pickle=False"):
        load_weights(path)


def test_npz_with_strings_single_npy_and_foreign_zip_are_refused(tmp_path):
    np.savez(tmp_path / "s.npz", names=np.array(["cat", "dog"]))
    with pytest.raises(WeightsFileError, match="'names' has unsupported dtype <U3"):
        load_weights(tmp_path / "s.npz")
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(WeightsFileError, match="single .npy array"):
        load_weights(tmp_path / "one.npy")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(WeightsFileError, match="neither a PyTorch checkpoint.*'readme.txt'"):
        load_weights(tmp_path / "other.zip")


def test_npz_header_larger_than_its_member_is_refused(tmp_path):
    """np.load would allocate what the .npy header claims before finding the data missing."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(2))
    forged = buf.getvalue().replace(b"(2,), }  ", b"(9999,),}")  # same length: the header stays aligned
    with zipfile.ZipFile(tmp_path / "f.npz", "w") as zf:
        zf.writestr("w.npy", forged)
    with pytest.raises(WeightsFileError, match=r"claims shape \(9999,\) of float64 \(79992 bytes\) in a member of"):
        load_weights(tmp_path / "f.npz")


@pytest.mark.parametrize("fmt", ["pth", "npz"])
def test_corrupt_zip_member_is_refused(tmp_path, fmt):
    """A flipped byte inside a member fails its CRC-32."""
    path = _valid_files(tmp_path)[fmt]
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.file_size >= 64 and not i.filename.endswith("data.pkl"))
    # The data starts after the local header: 30 bytes, the name, and an extra field (PyTorch pads it to
    # align the data) whose lengths the local header gives at bytes 26..30.
    name_len, extra_len = (int.from_bytes(data[info.header_offset + i:info.header_offset + i + 2], "little")
                           for i in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size - 1] ^= 0xFF
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match="(?i)bad crc|corrupt"):
        load_weights(bad)


@pytest.mark.parametrize("fmt", ["pth", "npz"])
def test_zip_whose_end_record_hides_its_members_is_refused(tmp_path, fmt):
    """Found by the fuzzer: zeroed member counts in the end record made zipfile see an empty archive
    (the members taken for bytes prepended to it), which loaded as an empty state dict."""
    path = _valid_files(tmp_path)[fmt] if fmt == "npz" else _write_pth(tmp_path / "v.pth", _small_state_dict())
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")  # (torch.save's own files also have a zip64 end record, which zipfile prefers)
    data[end + 6:end + 14] = bytes(8)  # entries on this disk, entries in total, size of the directory
    bad = tmp_path / f"hidden.{fmt}"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match=r"lists 0 member\(s\), but \d+ bytes before byte \d+ belong to none"):
        load_weights(bad)
    # A comment length 256 bytes too long swallows the next directory entry: one array less, silently.
    data = bytearray(path.read_bytes())
    entry = data.find(b"PK\x01\x02")
    data[entry + 33] += 1
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsFileError, match="belong to none of them"):
        load_weights(bad)


def test_empty_state_dict_round_trips(tmp_path):
    for ext in (".npz", ".safetensors"):
        assert load_weights(save_weights({}, tmp_path / f"e{ext}")) == collections.OrderedDict()


# ---------------------------------------------------------------------------
# Truncated files, non-files
# ---------------------------------------------------------------------------
def _valid_files(tmp_path):
    sd = {"a": np.arange(100, dtype=np.float32), "b": np.ones((3, 3))}
    return {"pth": ZOO_PTH, "npz": save_weights(sd, tmp_path / "v.npz"),
            "safetensors": save_weights(sd, tmp_path / "v.safetensors")}


@pytest.mark.parametrize("fmt", ["pth", "npz", "safetensors"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -1])
def test_truncated_files_are_refused(tmp_path, fmt, keep):
    source = _valid_files(tmp_path)[fmt].read_bytes()
    cut = len(source) - 1 if keep == -1 else int(len(source) * keep)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(source[:cut])
    with pytest.raises(WeightsFileError):
        load_weights(path)


@pytest.mark.parametrize("content, message", [(b"", "only 0 bytes"), (b"PK", "only 2 bytes"),
                                              (b"hello, world, not weights", "unknown format")])
def test_tiny_or_unknown_files_are_refused(tmp_path, content, message):
    (tmp_path / "w.pth").write_bytes(content)
    with pytest.raises(WeightsFileError, match=message):
        load_weights(tmp_path / "w.pth")


def test_missing_file_directory_and_fifo(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="No such weights file") as info:
        load_weights(missing)
    assert info.value.filename == str(missing)
    with pytest.raises(WeightsFileError, match="is a directory"):
        load_weights(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(WeightsFileError, match="not a regular file"):  # refused, never opened (would block)
            load_weights(tmp_path / "pipe")


# ---------------------------------------------------------------------------
# load_into
# ---------------------------------------------------------------------------
def test_load_into_skip_prefixes_keeps_the_new_head():
    model = resnet18(5, head="mlp", width=8)  # the file has a linear 10-class head
    with pytest.raises(nn.StateDictError, match=r"(?s)missing keys .*fc.0.weight.*unexpected keys .*fc.weight"):
        load_into(model, RESNET_PTH)
    head_before = {k: v.copy() for k, v in model.state_dict().items() if k.startswith("fc.")}
    result = load_into(model, RESNET_PTH, skip_prefixes="fc.")  # a str, not a sequence of characters
    assert result == nn.LoadResult([], [], [])
    file = load_weights(RESNET_PTH)
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            np.testing.assert_array_equal(value, head_before[key], err_msg=key)
        else:
            np.testing.assert_array_equal(value, file[key], err_msg=key)
    load_into(resnet18(5, head="mlp", width=8), RESNET_PTH, skip_prefixes=["fc.", "layer4."])


def test_load_into_strict_errors_come_from_load_state_dict():
    model = resnet18(10, head="linear", width=4)  # half the channels: every weight mis-shaped
    before = model.conv1.weight.data.copy()
    with pytest.raises(nn.StateDictError, match=r"shape mismatch for conv1.weight: expected \(4, 3, 7, 7\), "
                                                r"received \(8, 3, 7, 7\)"):
        load_into(model, RESNET_PTH)
    np.testing.assert_array_equal(model.conv1.weight.data, before)  # strict: nothing loaded
    result = load_into(model, RESNET_PTH, strict=False)
    assert ("conv1.weight", (4, 3, 7, 7), (8, 3, 7, 7)) in result.mismatched_keys
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(WeightsLimitError):  # limits pass through
        load_into(model, RESNET_PTH, max_bytes=1000)


def test_npz_keys_that_differ_by_a_npy_suffix_load_their_own_arrays(tmp_path):
    """np.load's NpzFile["x.npy"] reads member "x.npy", the array saved as "x": the two keys swapped values."""
    sd = collections.OrderedDict([("x", np.zeros(2)), ("x.npy", np.ones(3)), ("x.npy.npy", np.full(4, 2.0))])
    for path in (save_weights(sd, tmp_path / "w.npz"), tmp_path / "savez.npz"):
        if path.name == "savez.npz":
            np.savez(path, **sd)
        back = load_weights(path)
        assert list(back) == list(sd), path.name
        for key, value in sd.items():
            np.testing.assert_array_equal(back[key], value, err_msg=f"{path.name}: {key}")


def _fresh_state(model):
    return collections.OrderedDict((k, np.array(v)) for k, v in model.state_dict().items())


@pytest.mark.parametrize("key, bad, message", [
    ("conv1.weight", np.nan, r"tensor 'conv1.weight' \(shape \(8, 3, 7, 7\)\) holds 1 NaN or infinite value"),
    ("layer1.0.bn2.bias", np.inf, "tensor 'layer1.0.bn2.bias'.*holds 1 NaN or infinite"),
    ("bn1.running_var", -0.5, r"tensor 'bn1.running_var' holds negative variances \(smallest -0.5\)"),
    ("bn1.num_batches_tracked", -3, "tensor 'bn1.num_batches_tracked' is -3; a count of batches is never negative"),
])
@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_load_into_refuses_values_no_model_can_use(tmp_path, key, bad, message, ext):
    """NaN/inf weights or a negative running_var used to load silently (and then train to NaN)."""
    sd = _fresh_state(resnet18(10, head="linear", width=8))
    sd[key] = sd[key].copy()
    sd[key].reshape(-1)[0] = bad
    path = save_weights(sd, tmp_path / f"bad{ext}")
    model = resnet18(10, head="linear", width=8)
    before = _fresh_state(model)
    with pytest.raises(tinynet.io.WeightsValueError, match=message) as info:
        load_into(model, path)
    assert str(path) in str(info.value)
    for k, v in model.state_dict().items():  # nothing loaded
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # Skipping the bad tensor's prefix skips its check too; load_weights itself reads any value.
    load_into(resnet18(10, head="linear", width=8), path, skip_prefixes=key.split(".")[0] + ".")
    assert np.isnan(load_weights(path)[key]).any() or load_weights(path)[key].reshape(-1)[0] == bad


def test_check_state_values_on_num_batches_tracked_of_another_dtype():
    with pytest.raises(tinynet.io.WeightsValueError, match="expected one integer"):
        tinynet.io.check_state_values({"bn.num_batches_tracked": np.array(1.5)}, "f.npz")
    tinynet.io.check_state_values({"bn.num_batches_tracked": np.array(3), "w": np.ones(2, np.float16)}, "f.npz")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_data_parallel_files_load_with_the_prefix_stripped(tmp_path, prefix):
    sd = load_weights(RESNET_PTH)
    path = save_weights({prefix + k: v for k, v in sd.items()}, tmp_path / "dp.npz")
    model = resnet18(10, head="linear", width=8)
    assert load_into(model, path) == nn.LoadResult([], [], [])
    np.testing.assert_array_equal(model.conv1.weight.data, sd["conv1.weight"])


def test_a_file_with_no_matching_key_says_so(tmp_path):
    sd = load_weights(RESNET_PTH)
    path = save_weights({"backbone." + k: v for k, v in sd.items()}, tmp_path / "other.npz")
    for strict in (True, False):
        with pytest.raises(nn.StateDictError, match=r"none of the file's 122 keys matches a key of the ResNet "
                                                    r"\('backbone.conv1.weight'.*prefix"):
            load_into(resnet18(10, head="linear", width=8), path, strict=strict)


@pytest.mark.gpu
def test_save_weights_from_the_gpu(tmp_path):
    if not backend.gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    model = resnet18(4, width=8).to("cuda")
    path = save_weights(model.state_dict(), tmp_path / "gpu.safetensors")
    target = resnet18(4, width=8).to("cuda")
    load_into(target, path)
    assert backend.is_cupy_array(target.conv1.weight.data)
    np.testing.assert_array_equal(backend.to_numpy(target.conv1.weight.data), backend.to_numpy(model.conv1.weight.data))


# ---------------------------------------------------------------------------
# Optional: files written by PyTorch itself
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_torch_save_files_round_trip(tmp_path, seed):
    torch = torch_or_skip()
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]
    sd = collections.OrderedDict()
    for i in range(12):
        shape = tuple(int(d) for d in rng.integers(0, 5, size=rng.integers(0, 4)))
        base = (torch.randn(shape, generator=g) * 50).to(dtypes[i % len(dtypes)])
        kind = rng.integers(4)
        if kind == 1 and base.dim() >= 2:
            base = base.transpose(0, 1)
        elif kind == 2 and base.dim() >= 1:
            base = base[1::2]
        sd[f"t{i}.{str(base.dtype)[6:]}"] = base
    shared = torch.randn(30, generator=g)
    sd["shared.a"], sd["shared.b"] = shared[3:9], shared[10:28].view(3, 6)[:, ::3]
    buffer = io.BytesIO()  # a buffer: the archive's folder is "archive"
    torch.save({"state_dict": sd, "epoch": seed}, buffer)
    path = tmp_path / "t.pth"
    path.write_bytes(buffer.getvalue())
    got = load_weights(path)
    assert list(got) == list(sd)
    for key, t in sd.items():
        want = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_torch_module_state_dict_with_parameters(tmp_path):
    torch = torch_or_skip()
    from tests_torch_models import torch_resnet18

    torch.manual_seed(0)
    ref = torch_resnet18(3, head="mlp", width=8)
    params = collections.OrderedDict(ref.named_parameters())  # nn.Parameter objects: _rebuild_parameter
    torch.save(params, tmp_path / "params.pt")
    got = load_weights(tmp_path / "params.pt")
    for key, p in params.items():
        np.testing.assert_array_equal(got[key], p.detach().numpy(), err_msg=key)
    model = resnet18(3, head="mlp", width=8)
    torch.save(ref.state_dict(), tmp_path / "sd.pth")
    assert load_into(model, tmp_path / "sd.pth") == nn.LoadResult([], [], [])


def test_torch_legacy_file_is_refused_with_a_resave_hint(tmp_path):
    torch = torch_or_skip()
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsFileError, match="legacy serialization format.*re-save it with PyTorch >= 1.6"):
        load_weights(tmp_path / "legacy.pth")


@pytest.mark.parametrize("reader", ["load_weights", "read_metadata"])
def test_a_safetensors_file_is_read_from_the_file_opened_not_from_its_path_again(tmp_path, monkeypatch, reader):
    """Issue 20's leftover: the .safetensors reader reopened the file by its path after the checks, so a file put
    in its place in between (another model, or a FIFO that would block forever) was what it read."""
    from tinynet.io import files, read_metadata

    path, other = tmp_path / "model.safetensors", tmp_path / "other.safetensors"
    mine = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_weights(mine, path, metadata={"who": "mine"})
    save_weights({"w": np.zeros((4, 4), np.float32), "b": np.ones(2, np.float32)}, other, metadata={"who": "other"})
    real = files.open_regular_file

    def open_then_swap(p, refuse):  # the path names another file right after the checked open
        opened = real(p, refuse)
        os.replace(other, p)
        return opened

    monkeypatch.setattr(files, "open_regular_file", open_then_swap)
    if reader == "load_weights":
        state, metadata = load_weights(path, with_metadata=True)
        assert list(state) == ["w"]
        np.testing.assert_array_equal(state["w"], mine["w"])
    else:
        metadata = read_metadata(path)
    assert metadata == {"who": "mine"}
