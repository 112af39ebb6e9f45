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

from tinynet.report import confident_mistakes

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
