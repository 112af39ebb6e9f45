"""report.html (tinynet.report): self-contained, complete, and rendered by a real browser (headless Chromium)."""
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinynet.report import confident_mistakes, mistakes_gallery, write_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
# Appended to a copy of the page: after the load event, count the images that decoded.
IMAGE_CHECK = """<script>window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
});</script>"""


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A short ResNet18 run on the digits (t-SNE plots included)."""
    out = tmp_path_factory.mktemp("report") / "resnet"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_resnet.py"), "--limit", "12",
                             "--image-size", "32", "--epochs", "1", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "metrics.json").read_text())


def test_report_is_self_contained_and_complete(resnet_run):
    out, metrics = resnet_run
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r"""<img src=['"]([^'"]*)['"]""", page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "the page must load nothing from the network"
    assert "<script" not in page and "<link" not in page
    for title in ("Training curves", "Confusion matrix", "Class distribution", "A training batch",
                  "t-SNE of pooled features: training set", "t-SNE of pooled features: validation set",
                  "t-SNE of pooled features: test set (3-D)", "Most confident mistakes", "Configuration"):
        assert title in page, title
    for name, scores in metrics["test"]["per_class"].items():  # the per-class table, every class
        assert f"<td>{html.escape(name)}</td><td class=\"num\">{scores['precision']:.4f}</td>" in page
    for kind in ("last", "best"):
        assert f"{100 * metrics['shipped'][kind]['accuracy']:.1f} %" in page
    # one gallery entry per mistake of the last weights on the test set, at most 16
    matrix = np.array(metrics["test"]["confusion_matrix"])
    mistakes = int(matrix.sum() - np.trace(matrix))
    assert page.count("predicted: ") == min(16, mistakes)
    assert len(sources) == len(metrics["figures"]) + min(16, mistakes)


def test_report_of_the_bundled_digits_says_what_the_data_was(resnet_run):
    """Before: the configuration table read "data null", and the mistakes had no name."""
    out, metrics = resnet_run
    page = (out / "report.html").read_text(encoding="utf-8")
    assert metrics["config"]["data"] is None
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", page)  # an embedded image may hold "null" by chance
    assert "null" not in text
    described = f"bundled scikit-learn digits ({metrics['images']} of its 1,797 images, rendered to 32x32 RGB)"
    assert f"<h1>tinynet run: resnet on {described}</h1>" in page
    assert f"<tr><td>data</td><td>none: {described}</td></tr>" in page
    # each mistake named by its index in the data set, which has no files
    indices = re.findall(r"<span class='source'>#(\d+)</span>", page)
    assert len(indices) == page.count("predicted: ") and all(int(i) < metrics["images"] for i in indices)
    assert "1 epoch;" in page and "1 epochs" not in page


class AlwaysFirstClass:
    """A model whose every answer is class 0, with 90 % confidence: every image of another class is a mistake."""

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, x):
        logits = np.zeros((len(x), 2), dtype=np.float32)
        logits[:, 0] = np.log(9.0)
        return logits


def test_mistakes_gallery_names_each_file_relative_to_the_data_folder(tmp_path):
    """Before: the gallery showed the image and the classes, but not which file it was."""
    from tinynet.data import DataLoader, ImageFolder

    names = ["plain.png", "<b>bold<b> & 'quoted'.png", "esc\x1b[31m.png"]
    for folder in ("cat", "dog"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "data" / folder / name)
    dataset = ImageFolder(tmp_path / "data", size=8)
    indices = np.arange(len(dataset))
    mistakes = mistakes_gallery(AlwaysFirstClass(), dataset, indices, DataLoader(dataset, indices, 4), dataset.classes)
    assert sorted(m["file"] for m in mistakes) == sorted(os.path.join("dog", name) for name in names)
    assert {m["true"] for m in mistakes} == {"dog"} and {m["predicted"] for m in mistakes} == {"cat"}

    result = {"model": "cnn", "data": str(tmp_path / "data"), "classes": dataset.classes, "images": len(dataset),
              "split": {"train": 0, "validation": 0, "test": len(dataset)}, "history": {"epochs": []},
              "test": {"accuracy": 0.5, "f1_weighted": 0.33, "per_class": {}}, "config": {"data": "data"}}
    page = write_report(tmp_path, result, mistakes).read_text(encoding="utf-8")
    shown = re.findall(r"<span class='source'>([^<]*)</span>", page)
    assert sorted(shown) == sorted(html.escape(os.path.join("dog", name).replace("\x1b", "\\x1b"), quote=True)
                                   for name in names)
    assert "<b>" not in page and "\x1b" not in page


def test_an_evaluation_page_leaves_out_what_it_has_no_data_for(tmp_path):
    """Before: an evaluation's page had the training page's sections ("Training", "Data", "Test set", epochs)."""
    result = {"kind": "evaluation", "model": "resnet", "weights": "runs/resnet/best.safetensors",
              "data": "/photos/labelled", "classes": ["cat", "dog"], "images": 2, "skipped_files": 0,
              "test": {"accuracy": 1.0, "f1_weighted": 1.0,
                       "per_class": {"cat": {"precision": 1.0, "recall": 1.0, "f1-score": 1.0, "support": 1},
                                     "dog": {"precision": 1.0, "recall": 1.0, "f1-score": 1.0, "support": 1}}},
              "figures": [], "config": {"weights": "runs/resnet/best.safetensors", "data": "/photos/labelled"}}
    page = write_report(tmp_path, result).read_text(encoding="utf-8")
    assert "<h1>tinynet evaluation: best.safetensors on /photos/labelled</h1>" in page
    assert re.findall(r"<h2>([^<]*)</h2>", page) == ["Result", "Errors", "Most confident mistakes", "Configuration"]
    assert "<p>None: every image was classified correctly.</p>" in page
    for absent in ("epoch", "split", "test set", "Test set", "<img"):
        assert absent not in page, absent


def test_confident_mistakes_are_ordered_by_confidence():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.05, 0.95]])
    labels = np.array([0, 0, 1, 1, 0])  # wrong: rows 1 (0.8), 2 (0.6), 4 (0.95)
    assert confident_mistakes(probabilities, labels) == [4, 1, 2]
    assert confident_mistakes(probabilities, labels, count=2) == [4, 1]


def chromium(*args, profile, timeout=120):
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: the report's browser test is skipped")
def test_chromium_renders_every_image(resnet_run, tmp_path):
    out, metrics = resnet_run
    checked = tmp_path / "checked.html"
    checked.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"),
                       encoding="utf-8")
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", checked.as_uri(), profile=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    counted = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert counted, f"the load handler did not run; chromium said: {dom.stderr[-1000:]}"
    loaded, total = map(int, counted.groups())
    assert total == len(metrics["figures"]) + dom.stdout.count("predicted: ") and loaded == total

    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1280,2400", (out / "report.html").as_uri(),
                      profile=tmp_path / "profile2")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    not_white = np.mean(pixels.min(axis=2) < 240)
    colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert not_white > 0.05 and colours > 200, (not_white, colours)  # text, plots and photos, not a blank page
    keep = os.environ.get("TINYNET_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
