"""Run tracking (tinynet.tracking): W&B offline runs and TensorBoard event files, read back after a training run."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tinynet.tracking import Trackers, TrackingUnavailable

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


def tfrecords(path):
    """The records of a TFRecord file: [len u64][masked crc32c of len][data][masked crc32c of data], checked."""
    from tensorboardX.crc32c import crc32c

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, pos = path.read_bytes(), 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
        assert length_crc == masked(header), f"{path}: corrupt length at byte {pos}"
        record = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked(record)
        yield record
        pos += 16 + length


def tensorboard_scalars(folder):
    """{tag: {step: value}} from every event file below ``folder`` (tensorboardX's own protobufs)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for record in tfrecords(path):
            event = Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def wandb_records(path):
    """The protobuf records of a W&B run file (``run-*.wandb``): a ':W&B' header, then LevelDB-log chunks.

    The log is cut into 32 KiB blocks; each chunk has a 7-byte header (crc32, length u16, type: 1 full,
    2 first, 3 middle, 4 last); a block's tail shorter than a header is zero padding.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield Record.FromString(pending)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("wandb", reason="wandb not installed (optional extra 'track')")
    pytest.importorskip("tensorboardX", reason="tensorboardX not installed (optional extra 'track')")
    base = tmp_path_factory.mktemp("tracked")
    out = base / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_DIR=str(base / "wandb-dir"),
               WANDB_SILENT="true", WANDB_CONFIG_DIR=str(base / "wandb-config"), WANDB_CACHE_DIR=str(base / "cache"))
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_cnn.py"), "--limit", "12",
                             "--image-size", "32", "--epochs", str(EPOCHS), "--out", str(out), "--no-progress",
                             "--wandb", "tinynet-test", "--tensorboard"],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return out, base / "wandb-dir", json.loads((out / "metrics.json").read_text()), result.stdout


def test_tensorboard_event_files_hold_every_epoch(tracked_run):
    out, _, metrics, stdout = tracked_run
    assert f"TensorBoard event files in {out / 'tensorboard'}" in stdout
    scalars = tensorboard_scalars(out / "tensorboard")
    epochs = metrics["history"]["epochs"]
    for tag, field in (("train/loss", "train_loss"), ("train/accuracy", "train_acc"), ("val/loss", "val_loss"),
                       ("val/accuracy", "val_acc"), ("lr", "lr")):
        assert sorted(scalars[tag]) == list(range(1, EPOCHS + 1)), tag
        for e in epochs:
            assert scalars[tag][e["epoch"]] == pytest.approx(e[field], rel=1e-6), (tag, e["epoch"])
    assert scalars["test/last/accuracy"][EPOCHS] == pytest.approx(metrics["shipped"]["last"]["accuracy"])
    assert scalars["test/best/accuracy"][EPOCHS] == pytest.approx(metrics["shipped"]["best"]["accuracy"])


def test_wandb_offline_run_holds_config_metrics_figures_and_confusion_matrix(tracked_run):
    out, wandb_dir, metrics, stdout = tracked_run
    assert "(offline)" in stdout
    runs = list(wandb_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    records = list(wandb_records(next(run.glob("run-*.wandb"))))
    by_type = {}
    for record in records:
        by_type.setdefault(record.WhichOneof("record_type"), []).append(record)

    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
              for item in by_type["run"][0].run.config.update}
    assert config["lr"] == 1e-3 and config["epochs"] == EPOCHS and config["wandb"] == "tinynet-test"
    assert by_type["run"][0].run.project == "tinynet-test"

    history = []
    for record in by_type["history"]:
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        if "train/loss" in items:
            history.append(items)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    for h, e in zip(history, metrics["history"]["epochs"]):
        assert h["train/loss"] == pytest.approx(e["train_loss"]) and h["val/accuracy"] == pytest.approx(e["val_acc"])

    summary = {}
    for record in by_type["summary"]:
        for item in record.summary.update:
            summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert summary["test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert summary["test/best/epoch"] == metrics["best_epoch"]

    files = {Path(f.path).name.split("_")[0] for record in by_type["files"] for f in record.files.files}
    assert {"curves", "confusion", "batch", "class"} <= files  # curves_*.png, confusion_matrix_*.png, ...
    for name in ("curves", "confusion_matrix"):
        image = next(run.glob(f"files/media/images/figures/{name}_*.png"))
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(next(run.glob("files/media/table/test/confusion_matrix_table_*.table.json")).read_text())
    # W&B's confusion matrix: one row per (actual, predicted) pair, with the count
    counts = {(row[0], row[1]): row[2] for row in table["data"]}
    matrix = metrics["test"]["confusion_matrix"]
    classes = metrics["classes"]
    for i, actual in enumerate(classes):
        for j, predicted in enumerate(classes):
            assert counts.get((actual, predicted), 0) == matrix[i][j]


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    class Args:
        wandb, tensorboard = "p", False

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackingUnavailable, match=r'--wandb needs the wandb package.*pip install -e "\.\[track\]"'):
        Trackers.from_args(Args, {}, tmp_path)
    assert not Trackers.from_args(type("NoTracking", (), {})(), {}, tmp_path)  # nothing asked: nothing imported
