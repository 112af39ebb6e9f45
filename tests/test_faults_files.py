"""Fault injection, untrusted files: loading weights or a checkpoint never runs code and never over-allocates.

tests/test_io.py holds the hostile .pth, .npz and .safetensors files
(__reduce__ payloads with GLOBAL and STACK_GLOBAL, every other global, zip
bombs, oversized pickles and safetensors headers, truncation).  This file
proves the rules over the source tree (every np.load passes
allow_pickle=False; nothing unpickles outside the restricted reader), adds
payloads that test_io does not build (protocol 0's INST opcode, a bare pickle
under an .npz name, pickled objects inside a checkpoint, a .pth posing as a
checkpoint), two oversized headers, and hostile --pretrained files given to
the command line.
"""
import ast
import json
import pathlib
import pickle
import re
import zipfile

import numpy as np
import pytest

import tinynet
from tinynet.io import UnsafeFileError, WeightsFileError, load_weights
from tinynet.models import simple_cnn
from tinynet.train import CheckpointError, load_checkpoint

from fault_inject import call_main, image_folder
from test_io import _patch_declared_size, _RunsCommand, _write_pth

PACKAGE = pathlib.Path(tinynet.__file__).resolve().parent


def dotted(node) -> str:
    """``np.lib.format.read_array`` for the expression naming a called function; "" when it is not a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def calls_in_package():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call):
                yield path.relative_to(PACKAGE.parent), node


def test_every_np_load_in_tinynet_passes_allow_pickle_false():
    loads = [(path, node) for path, node in calls_in_package()
             if dotted(node.func).split(".")[0] in ("np", "numpy")
             and dotted(node.func).rsplit(".", 1)[-1] in ("load", "read_array")]
    assert loads, "the scan found no np.load at all: it no longer sees the readers"
    for path, node in loads:
        flags = [k.value for k in node.keywords if k.arg == "allow_pickle"]
        assert len(flags) == 1 and isinstance(flags[0], ast.Constant) and flags[0].value is False, \
            f"{path}:{node.lineno}: {dotted(node.func)} without allow_pickle=False"


def test_nothing_in_tinynet_unpickles_or_evaluates_outside_the_restricted_reader():
    forbidden = {"pickle.load", "pickle.loads", "pickle.Unpickler", "pickle._Unpickler", "pickle._load",
                 "pickle._loads", "torch.load", "marshal.loads", "shelve.open", "eval", "exec", "joblib.load",
                 "dill.load", "dill.loads"}
    found = [f"{path}:{node.lineno}: {dotted(node.func)}" for path, node in calls_in_package()
             if dotted(node.func) in forbidden]
    assert found == []
    # The one unpickler is a subclass that overrides find_class, the door every global passes through.
    subclasses = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any("Unpickler" in dotted(base) for base in node.bases):
                methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
                subclasses.append((path.name, node.name, "find_class" in methods))
    assert subclasses == [("pth.py", "StateDictUnpickler", True)]


def test_inst_opcode_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    # Protocol 0: MARK, the argument, then INST os.system, which calls os.system(argument) when read.
    payload = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    path = _write_pth(tmp_path / "evil.pth", data_pkl=payload, storages={})
    with pytest.raises(UnsafeFileError, match=r"refused opcode INST at byte \d+ \('os system'\)"):
        load_weights(path)
    assert not marker.exists()


def test_bare_pickle_payload_named_like_an_npz_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.npz"
    path.write_bytes(pickle.dumps({"weight": _RunsCommand(f"touch {marker}")}, protocol=2))
    with pytest.raises(WeightsFileError, match="a bare pickle"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="a bare pickle"):
        load_checkpoint(path, simple_cnn(2, image_size=16))
    assert not marker.exists()


def test_checkpoint_holding_pickled_objects_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.npz"
    meta = np.frombuffer(json.dumps({"format": "tinynet-checkpoint-1"}).encode(), np.uint8)
    np.savez(path, __meta__=meta, **{"model/0.weight": np.array([_RunsCommand(f"touch {marker}")], dtype=object)})
    with pytest.raises(CheckpointError, match=r"dtype object \(Python objects\)"):
        load_checkpoint(path, simple_cnn(2, image_size=16))
    assert not marker.exists()


def test_pth_with_a_payload_posing_as_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"__meta__": _RunsCommand(f"touch {marker}")}, protocol=2)
    path = _write_pth(tmp_path / "checkpoint.npz", data_pkl=payload, storages={})
    with pytest.raises(CheckpointError, match=r"refused global '(posix|nt|os)\.system'"):
        load_checkpoint(path, simple_cnn(2, image_size=16))
    assert not marker.exists()


def test_npz_member_with_an_oversized_npy_header_is_refused(tmp_path):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), " + " " * 1_000_000 + "}"
    header += " " * (-(len(header) + 13) % 64) + "\n"
    member = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header.encode() + bytes(4)
    with zipfile.ZipFile(tmp_path / "big-header.npz", "w") as zf:
        zf.writestr("w.npy", member)
    with pytest.raises(WeightsFileError, match=r"'w\.npy' is not a readable \.npy array \(Header info length"):
        load_weights(tmp_path / "big-header.npz")


def test_safetensors_header_nested_a_million_deep_is_refused(tmp_path):
    header = b'{"a": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"  # valid JSON, too deep to parse
    (tmp_path / "deep.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(WeightsFileError, match="not valid UTF-8 JSON"):
        load_weights(tmp_path / "deep.safetensors")


# ---------------------------------------------------------------------------
# Hostile --pretrained files given to the command line
# ---------------------------------------------------------------------------
def _evil_pth(tmp_path, marker):
    payload = pickle.dumps({"conv1.weight": _RunsCommand(f"touch {marker}")}, protocol=2)
    return _write_pth(tmp_path / "resnet18.pth", data_pkl=payload, storages={})


def _bomb_npz(tmp_path, marker):
    path = tmp_path / "resnet18.npz"
    np.savez(path, a=np.zeros(4, np.float32), b=np.zeros(4, np.float32))
    for member in ("a.npy", "b.npy"):  # 2 x 4 GiB declared
        _patch_declared_size(path, member, 0xFFFFFFF0)
    return path


def _giant_header_safetensors(tmp_path, marker):
    path = tmp_path / "resnet18.safetensors"
    path.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    return path


@pytest.mark.parametrize("make, message", [
    (_evil_pth, r"refused global '(posix|nt|os)\.system'"),
    (_bomb_npz, "more than the limit of 4294967296 bytes"),
    (_giant_header_safetensors, r"header length 1000000000000 bytes .* exceeds the limit"),
], ids=["reduce payload .pth", "zip bomb .npz", "giant header .safetensors"])
def test_cli_hostile_pretrained_file_is_one_line_exit_2_and_nothing_runs(tmp_path, capsys, make, message):
    marker = tmp_path / "pwned"
    weights = make(tmp_path, marker)
    data = image_folder(tmp_path / "data")
    status, _, err = call_main(capsys, "resnet", "--data", data, "--out", tmp_path / "out", "--pretrained", weights,
                               "--image-size", "16", "--no-progress")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot load pretrained weights {str(weights)!r}" in err
    assert re.search(message, err), err
    assert not marker.exists() and not (tmp_path / "out" / "checkpoint.npz").exists()


# ---------------------------------------------------------------------------
# Pickles built to exhaust the reader: nesting and memo sharing (measured in a subprocess)
# ---------------------------------------------------------------------------
def _deep_tuple(depth: int) -> bytes:
    """EMPTY_TUPLE, then TUPLE1 ``depth`` times: ((((),),),) nested ``depth`` deep, 1 byte a level."""
    return b")" + b"\x85" * depth


def _deep_list(depth: int) -> bytes:
    """MARK ``depth`` times, EMPTY_LIST, then LIST ``depth`` times: [[[...]]]."""
    return b"(" * depth + b"]" + b"l" * depth


def _shared_dag(levels: int) -> bytes:
    """Level 0 is (); level i+1 is (level i, level i), the two references fetched from the memo.

    6 bytes a level; walking level 40 visits 2**40 tuples.
    """
    out = b")q\x00"
    for i in range(levels):
        out += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
    return out


def _as_value(body: bytes) -> bytes:
    """{'w': <body>}: the hostile object where a tensor belongs."""
    return b"\x80\x02}X\x01\x00\x00\x00w" + body + b"s."


def _as_persistent_id(body: bytes) -> bytes:
    """The hostile object as a storage's persistent id, which the reader checks (and used to repr)."""
    return b"\x80\x02}X\x01\x00\x00\x00w" + body + b"Qs."


_MEASURE = """
import json, sys, time
import tinynet.io


def peak_kib():
    # VmHWM: this process's peak resident memory.  (ru_maxrss would start at the parent's, kept across fork.)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


before = peak_kib()
start = time.perf_counter()
try:
    tinynet.io.load_weights(sys.argv[1])
    kind, message = "loaded", ""
except Exception as exc:
    kind, message = type(exc).__name__, str(exc)
seconds = time.perf_counter() - start
print(json.dumps({"kind": kind, "message": message[:400], "length": len(message), "seconds": seconds,
                  "extra_mb": (peak_kib() - before) / 1024, "peak_mb": peak_kib() / 1024}))
"""


def measure_load(path, timeout: float = 30.0) -> dict:
    """Load ``path`` in a fresh interpreter (a crash or a hang cannot take the tests down): what came out.

    ``extra_mb``: growth of the peak resident memory during ``load_weights``; ``peak_mb``: the peak.
    """
    import os
    import subprocess
    import sys
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"kind": f"no answer within {timeout} s", "message": "", "length": 0, "seconds": timeout}
    if done.returncode != 0:
        return {"kind": f"exit status {done.returncode}", "message": done.stderr[-400:], "length": 0, "seconds": 0}
    return json.loads(done.stdout)


HOSTILE_PICKLES = {
    "tuple nested 1,000,000 deep": _as_value(_deep_tuple(1_000_000)),
    "tuple nested 50,000 deep": _as_value(_deep_tuple(50_000)),
    "persistent id nested 1,000,000 deep": _as_persistent_id(_deep_tuple(1_000_000)),
    "persistent id nested 50,000 deep": _as_persistent_id(_deep_tuple(50_000)),
    "list nested 500,000 deep": _as_value(_deep_list(500_000)),
    "memo-shared tuples 40 levels (persistent id)": _as_persistent_id(_shared_dag(40)),
    "memo-shared tuples 40 levels (value)": _as_value(_shared_dag(40)),
    "memo-shared tuples 22 levels (persistent id)": _as_persistent_id(_shared_dag(22)),
}


@pytest.mark.parametrize("name", list(HOSTILE_PICKLES))
def test_pickles_nested_or_shared_to_exhaust_the_reader_are_refused_quickly(tmp_path, name):
    """Refused in well under a second and 100 MB, with a short message; before, these crashed the interpreter
    (SIGSEGV), raised RecursionError, or ran for hours building a message of hundreds of MB."""
    path = _write_pth(tmp_path / "hostile.pth", data_pkl=HOSTILE_PICKLES[name], storages={})
    got = measure_load(path)
    assert got["kind"] == "WeightsLimitError", got
    assert str(path) in got["message"] and got["length"] < 400, got
    assert re.search(r"nest more than 100 deep|holds more than 200000 objects", got["message"]), got
    assert got["seconds"] < 0.5 and got["extra_mb"] < 100, got


def test_an_object_placed_inside_itself_is_refused(tmp_path):
    """EMPTY_LIST, PUT 0, GET 0, APPEND: a list that holds itself; so does a dict, through SETITEM."""
    for body in (b"]q\x00h\x00a", b"}q\x00X\x01\x00\x00\x00kh\x00s"):
        path = _write_pth(tmp_path / "cycle.pth", data_pkl=_as_value(body), storages={})
        with pytest.raises(WeightsFileError, match="inside itself|already placed inside another"):
            load_weights(path)
    # Changing a list after it was put in a tuple: (L,), then L.append(...).
    body = b"]q\x00h\x00\x85q\x01h\x00N" + b"a" + b"0h\x01"
    with pytest.raises(WeightsFileError, match="already placed inside another"):
        load_weights(_write_pth(tmp_path / "late.pth", data_pkl=_as_value(body), storages={}))


def test_pickle_limits_are_configurable_and_a_real_checkpoint_is_far_below_them(tmp_path):
    from tinynet.io.pth import scan_pickle
    from tinynet.io.files import Limits
    path = _write_pth(tmp_path / "deep.pth", data_pkl=_as_value(_deep_tuple(150)), storages={})
    with pytest.raises(tinynet.io.WeightsLimitError, match="nest more than 100 deep"):
        load_weights(path)
    with pytest.raises(WeightsFileError, match="expected a state dict"):  # under a larger limit it is read
        load_weights(path, max_pickle_depth=200)
    with pytest.raises(tinynet.io.WeightsLimitError, match="more than 50 opcodes"):
        load_weights(path, max_pickle_items=50, max_pickle_depth=200)
    fixture = pathlib.Path(__file__).resolve().parent / "fixtures" / "resnet18_w8.pth"
    with zipfile.ZipFile(fixture) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    scan_pickle(data, "fixture", Limits(max_pickle_depth=6))  # a torchvision state dict nests 6 deep


# ---------------------------------------------------------------------------
# Checkpoints: edited metadata and values no run can continue from
# ---------------------------------------------------------------------------
def _small_bn_model():
    from tinynet import nn
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _checkpoint(tmp_path):
    from tinynet import optim
    from tinynet.train import save_checkpoint
    model = _small_bn_model()
    opt = optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # one step, so that Adam has moments and a step count to save
        p.grad = np.ones_like(p.data)
    opt.step()
    sched = optim.lr_scheduler.StepLR(opt, step_size=2)
    history = {"epochs": [{"epoch": 1, "train_loss": 0.7, "train_acc": 0.5, "val_loss": 0.6, "val_acc": 0.5,
                           "seconds": 1.0, "images_per_second": 10.0, "lr": 1e-3}]}
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, sched, epoch=1, history=history,
                           extra={"seed": 0})
    return path


def _fresh_training_state():
    from tinynet import optim
    model = _small_bn_model()
    opt = optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, optim.lr_scheduler.StepLR(opt, step_size=2)


def _edit_checkpoint(path, edit_meta=None, edit_arrays=None):
    arrays = dict(load_weights(path))
    meta = json.loads(arrays["__meta__"].tobytes())
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    return path


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("epoch", "3"), "epoch is '3', expected an int >= 0"),
    (_set("batch", -1), "batch is -1"),
    (_set("optimizer", "param_groups", 0, "lr", "fast"), r"param_groups\[0\].lr is 'fast', expected a finite number"),
    (_set("optimizer", "param_groups", 0, "params", "all"), r"param_groups\[0\] is not an object with params"),
    (_set("optimizer", "param_groups", [1]), r"param_groups\[0\] is not an object"),
    (_set("optimizer", "scalars", "0", "step", "x"), r"scalars\['0'\] is .*expected finite numbers >= 0"),
    (_set("optimizer", "scalars", "0", "step", -5), r"scalars\['0'\]"),
    (_set("scheduler", "last_epoch", "a"), "scheduler is not an object with last_epoch"),
    (_set("history", "epochs", [{"bogus": 1}]), "history cannot be read"),
    (_set("history", "epochs", 0, "lr", "x"), "history holds a value that is not a number"),
    (_set("extra", "_partial_epoch", {"loss_sum": "x"}), "extra._partial_epoch is"),
    (_set("model_keys", 3), "model_keys is not a list of str"),
    (_set("optimizer", 7), "optimizer is not an object"),
])
def test_edited_checkpoint_metadata_is_one_line_checkpoint_error(tmp_path, edit, message):
    path = _checkpoint(tmp_path)
    _edit_checkpoint(path, edit)
    model, opt, sched = _fresh_training_state()
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, model, opt, sched)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and "edited" in str(info.value)


def _poison(key, value):
    def edit(arrays):
        arrays[key] = arrays[key].copy()
        arrays[key].reshape(-1)[0] = value
    return edit


@pytest.mark.parametrize("key, value, message", [
    ("model/0.weight", np.nan, r"tensor '0.weight'.* holds 1 NaN or infinite"),
    ("model/1.running_var", -1.0, r"tensor '1.running_var' holds negative variances"),
    ("model/1.num_batches_tracked", -2, r"tensor '1.num_batches_tracked' is -2"),
    ("optimizer/0/exp_avg_sq", np.inf, r"tensor 'optimizer/0/exp_avg_sq'.* holds 1 NaN or infinite"),
])
def test_checkpoint_with_values_no_run_can_continue_from_is_refused(tmp_path, key, value, message):
    """Resuming from it used to train to NaN, then call it 'the last good checkpoint' and blame the rate."""
    path = _checkpoint(tmp_path)
    assert key in load_weights(path), sorted(load_weights(path))
    _edit_checkpoint(path, edit_arrays=_poison(key, value))
    model, opt, sched = _fresh_training_state()
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(path))} cannot be resumed: {message}"):
        load_checkpoint(path, model, opt, sched)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_cli_resume_from_a_nan_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    args = ("cnn", "--data", data, "--out", tmp_path / "out", "--image-size", "16", "--epochs", "1", "--no-progress")
    status, _, err = call_main(capsys, *args)
    assert status == 0, err
    path = tmp_path / "out" / "checkpoint.npz"
    first = sorted(k for k in load_weights(path) if k.startswith("model/"))[0]
    _edit_checkpoint(path, edit_arrays=_poison(first, np.nan))
    status, _, err = call_main(capsys, *args[:-2], "2", "--no-progress", "--resume")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "NaN or infinite" in err and first[len("model/"):] in err and "learning rate" not in err
