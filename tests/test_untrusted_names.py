"""Class and file names are someone else's text: shown as text by figures, terminals and spreadsheets.

``tinynet.text`` (``printable`` for terminals and logs, ``csv_cell`` for CSV
files) and ``tinynet.plots`` (no mathtext, no LaTeX), with the doors that use
them: ``predict.py``'s printout and ``--csv``, the training log's skipped
files, every figure that shows a class name.
"""
import argparse
import csv
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from safetensors.numpy import save_file

from tinynet import plots
from tinynet.text import CSV_FORMULA_STARTS, csv_cell, printable

ROOT = Path(__file__).resolve().parents[1]
ESC, BEL = "\x1b", "\x07"
RETITLE = f"{ESC}]0;owned{BEL}"  # xterm's "set window title"
CLEAR = f"{ESC}[2J"
#: Names that matplotlib's mathtext would parse (the first is a parse error that ended the run), one that
#: matplotlib's legend would drop (a leading underscore), and one with an escaped dollar.
MATH_NAMES = ["x$^$y", "price $5-$10", "_hidden", "a\\$b"]


# ---------------------------------------------------------------------------
# printable, csv_cell
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, shown", [
    (RETITLE, "\\x1b]0;owned\\x07"), (CLEAR, "\\x1b[2J"), ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),
    ("del\x7f", "del\\x7f"), ("csi\x9b2J", "csi\\x9b2J"), ("abc\u202eexe.png", "abc\\u202eexe.png"),
    ("bad\udcffbyte.jpg", "bad\\xffbyte.jpg"), ("ours bruns — é, 熊", "ours bruns — é, 熊"),
    ("C:\\photos\\bear.jpg", "C:\\photos\\bear.jpg")])
def test_printable_escapes_control_characters_only(raw, shown):
    assert printable(raw) == shown


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(codec=None), max_size=40))
def test_printable_never_lets_a_control_character_through(text):
    shown = printable(text)
    assert not any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068"
                   "\u2069\u200e\u200f\u061c" for c in shown)
    if shown == text:  # nothing escaped: nothing needed it
        assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in text)
    shown.encode("utf-8")  # printable on any UTF-8 terminal, surrogates included


@pytest.mark.parametrize("cell", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "\nx", "\0x", "\uff1d1+1",
                                  '=HYPERLINK("http://evil","click")', "=cmd|' /C calc'!A0"])
def test_csv_cells_that_start_like_a_formula_start_with_a_quote(cell, tmp_path):
    assert csv_cell(cell) == "'" + cell
    with open(tmp_path / "out.csv", "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerow([csv_cell(cell), "ok"])
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as file:
        assert next(csv.reader(file)) == ["'" + cell, "ok"]  # the csv module quotes; the cell is text


@pytest.mark.parametrize("cell", ["", "bear", "0.5", "'=already", " =space", "photos/=x.jpg", "a-b"])
def test_other_csv_cells_are_unchanged(cell):
    assert csv_cell(cell) == cell


def test_every_formula_start_is_covered_by_owasp_and_asvs():
    assert {"=", "+", "-", "@", "\t", "\r", "\0"} <= set(CSV_FORMULA_STARTS)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
@pytest.fixture
def drawn_texts(monkeypatch):
    """Every string matplotlib draws, with how it would draw it: False (plain), True (mathtext), "TeX"."""
    from matplotlib.text import Text

    seen = []
    original = Text._preprocess_math

    def spy(self, s):
        result = original(self, s)
        seen.append((s, result[1]))
        return result
    monkeypatch.setattr(Text, "_preprocess_math", spy)
    return seen


def _figures(tmp_path, classes):
    k = len(classes)
    labels = np.arange(4 * k) % k
    rng = np.random.default_rng(0)
    plots.plot_class_distribution({"train": labels, "validation": labels[:k]}, classes, tmp_path / "d.png")
    plots.plot_batch_grid(rng.integers(0, 255, (k, 8, 8, 3), dtype=np.uint8), np.arange(k), classes,
                          tmp_path / "b.png")
    plots.plot_confusion_matrix(np.eye(k, dtype=int), classes, tmp_path / "c.png")
    plots.plot_tsne(rng.normal(size=(4 * k, 5)), labels, classes, tmp_path / "t.png", dims=2)


def test_class_names_in_figures_are_plain_text(tmp_path, drawn_texts):
    """Before: "x$^$y" ended the run with a mathtext ParseException; "price $5-$10" was set as math."""
    classes = MATH_NAMES + ["plain"]
    _figures(tmp_path, classes)
    for name in classes:
        shown = [how for s, how in drawn_texts if s == name]
        assert shown, f"{name!r} was not drawn"
        assert set(shown) == {False}, f"{name!r} drawn as {set(shown)}"
    assert all(how is False for s, how in drawn_texts if "$" in s)


def test_a_class_name_with_a_leading_underscore_keeps_its_legend_entry(tmp_path, drawn_texts):
    plots.plot_tsne(np.random.default_rng(1).normal(size=(12, 4)), np.arange(12) % 3, ["_a", "b", "c"],
                    tmp_path / "t.png")
    assert ("_a", False) in drawn_texts


def test_figures_never_hand_names_to_latex(tmp_path, drawn_texts):
    """``text.usetex`` set by the user's matplotlibrc does not reach the texts that show class names."""
    import matplotlib

    with matplotlib.rc_context({"text.usetex": True}):
        fig_texts = []
        original = plots._save
        try:
            plots._save = lambda fig, path: fig_texts.extend(fig.findobj(matplotlib.text.Text)) or Path(path)
            _figures(tmp_path, MATH_NAMES)
        finally:
            plots._save = original
    names = [t for t in fig_texts if t.get_text() in MATH_NAMES]
    assert names and all(not t.get_usetex() and not t.get_parse_math() for t in names)


# ---------------------------------------------------------------------------
# predict.py: the printout and --csv
# ---------------------------------------------------------------------------
HOSTILE_CLASSES = ['=HYPERLINK("http://evil.example","x")', RETITLE, "+1", "@SUM(1)", "-2", "\tx", "x$^$y"]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """predict.py --csv on files with hostile names, with a model whose class names are hostile."""
    from tinynet.models import simple_cnn
    from tinynet.predict import model_metadata

    root = tmp_path_factory.mktemp("hostile")
    net = simple_cnn(len(HOSTILE_CLASSES), image_size=16)
    weights = root / "m.safetensors"
    save_file({k: np.array(v) for k, v in net.state_dict().items()}, str(weights),
              metadata={k: json.dumps(v) for k, v in model_metadata("cnn", net, HOSTILE_CLASSES, 16).items()})
    photos = root / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    names = ["=cmd|' calc'!A1.png", f"{CLEAR}.png", "-rf.png", "plain.png"]
    for name in names:
        Image.fromarray(pixels).save(photos / name)
    (photos / f"{RETITLE}broken.png").write_bytes(b"not an image")
    out = root / "out.csv"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "predict.py"), "--weights", str(weights),
                             str(photos), "--top-k", str(len(HOSTILE_CLASSES)), "--csv", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result, out


def test_predict_prints_names_with_control_characters_escaped(hostile_run):
    result, _ = hostile_run
    for stream in (result.stdout, result.stderr):
        assert not any(c in stream for c in (ESC, BEL, "\x9b")), stream
    assert "\\x1b]0;owned\\x07" in result.stdout  # the class name, shown, not obeyed
    assert "\\x1b[2J.png" in result.stdout and "\\x1b]0;owned\\x07broken.png: skipped" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 5  # one line per file: a tab or newline cannot add lines


def test_predict_csv_cells_never_start_like_a_formula(hostile_run):
    _, out = hostile_run
    with open(out, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert len(rows) == 6
    cells = [cell for row in rows[1:] for cell in row]
    assert not [cell for cell in cells if cell.startswith(CSV_FORMULA_STARTS)]
    assert any(cell.startswith("'=HYPERLINK(") for cell in cells)
    assert any(cell.endswith("=cmd|' calc'!A1.png") for cell in cells)  # the path: it starts with the folder
    classes = {cell for row in rows[1:] for cell in row[1:-1:2] if cell}
    assert classes == {csv_cell(name) for name in HOSTILE_CLASSES}  # only a quote added: nothing else changes


def test_predict_csv_of_a_relative_path_that_starts_like_a_formula(tmp_path):
    """A file named on the command line as ``=1+1.png`` is the path cell itself."""
    from tinynet.models import simple_cnn
    from tinynet.predict import model_metadata

    net = simple_cnn(2, image_size=16)
    weights = tmp_path / "m.safetensors"
    save_file({k: np.array(v) for k, v in net.state_dict().items()}, str(weights),
              metadata={k: json.dumps(v) for k, v in model_metadata("cnn", net, ["a", "b"], 16).items()})
    for name in ("=1+1.png", "-@x.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "predict.py"), "--weights", str(weights),
                             "--csv", "out.csv", "--no-progress", "--", "=1+1.png", "-@x.png"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert [row[0] for row in rows[1:]] == ["'=1+1.png", "'-@x.png"]


# ---------------------------------------------------------------------------
# The training log
# ---------------------------------------------------------------------------
def test_training_log_escapes_skipped_file_names(tmp_path):
    from tinynet.experiment import load_dataset

    for k in ("a", "b"):
        (tmp_path / k).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / k / f"{i}.png")
    (tmp_path / "a" / f"{RETITLE}{CLEAR}.png").write_bytes(b"not an image")
    lines = []
    load_dataset(argparse.Namespace(data=str(tmp_path), image_size=16, limit=None), lines.append)
    skipped = [line for line in lines if "skipped" in line and ".png" in line]
    assert skipped, lines
    assert not any(ESC in line or BEL in line for line in lines)
    assert any("\\x1b]0;owned\\x07\\x1b[2J.png" in line for line in skipped)
