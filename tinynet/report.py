"""``report.html``: one self-contained page per training run.

Everything a run produced, on one page that opens offline in any browser and
can be mailed as one file: the images are embedded as base64 ``data:`` URIs,
the styles are inline, and the page loads nothing from the network.

Sections: the test numbers for the last and the best epoch's weights, the
configuration, the training curves, the confusion matrix, per-class
precision / recall / F1, the class distribution, a training batch, the t-SNE
plots (ResNet), and a gallery of the test set's most confident mistakes:
the photos the model got wrong while being surest of itself, with the true
and the predicted class, which shows which classes it confuses (in the
assignment: black and brown bears).
"""
from __future__ import annotations

import base64
import html
import io
import json
import pathlib

import numpy as np

from .io.files import atomic_write

__all__ = ["confident_mistakes", "mistakes_gallery", "write_report"]

FIGURE_TITLES = {
    "curves.png": "Training curves",
    "confusion_matrix.png": "Confusion matrix (test set, last epoch's weights)",
    "class_distribution.png": "Class distribution",
    "batch_grid.png": "A training batch",
    "tsne_train_2d.png": "t-SNE of pooled features: training set",
    "tsne_validation_2d.png": "t-SNE of pooled features: validation set",
    "tsne_test_3d.png": "t-SNE of pooled features: test set (3-D)",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
.gallery figure { width: 150px; } .gallery img { width: 128px; height: 128px; image-rendering: pixelated; }
figcaption { font-size: 0.8em; } .wrong { color: #b00; } .note { color: #666; font-size: 0.9em; }
"""


def confident_mistakes(probabilities, labels, count: int = 16) -> list[int]:
    """Indices of the misclassified rows of ``probabilities`` (n, K), most confident first, at most ``count``.

    Confidence is the predicted class's probability; ties keep the data order.
    """
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count].tolist()


def mistakes_gallery(model, dataset, indices, loader, classes, device: str = "cpu", count: int = 16,
                     outputs_probabilities: bool = False) -> list[dict]:
    """The ``count`` most confident mistakes of ``model`` on ``dataset[indices]``, for :func:`write_report`.

    ``loader`` yields those images in the order of ``indices`` (no shuffle).
    ``outputs_probabilities``: the model ends in a softmax (the CNN's
    ``--softmax-before-loss`` variant), so its outputs are not logits.
    """
    from .nn.functional import softmax
    from .train import predict

    outputs = predict(model, loader, device)
    probabilities = outputs if outputs_probabilities else softmax(outputs.astype(np.float64), axis=1)
    labels = np.asarray(dataset.labels)[np.asarray(indices)]
    return [{"image": dataset.image(int(indices[i])), "true": str(classes[labels[i]]),
             "predicted": str(classes[int(probabilities[i].argmax())]), "confidence": float(probabilities[i].max())}
            for i in confident_mistakes(probabilities, labels, count)]


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _array_uri(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return _png_uri(buffer.getvalue())


def _table(rows, header=None) -> str:
    def cell(value, tag="td"):
        if isinstance(value, float):
            return f'<{tag} class="num">{value:.4f}</{tag}>'
        if isinstance(value, int):
            return f'<{tag} class="num">{value}</{tag}>'
        return f"<{tag}>{html.escape(str(value))}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    return "<table>" + head + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def write_report(out, result: dict, mistakes=(), path=None) -> pathlib.Path:
    """Write ``report.html`` into the run folder ``out`` from its metrics (``result``, as in metrics.json).

    ``mistakes``: dicts with ``image`` (uint8 (H, W, 3)), ``true``,
    ``predicted`` (class names) and ``confidence`` (the predicted class's
    probability), e.g. from :func:`confident_mistakes`.  The figures are read
    from ``out`` (the names in ``result["figures"]``) and embedded.
    """
    out = pathlib.Path(out)
    path = pathlib.Path(path) if path else out / "report.html"
    test, shipped = result["test"], result.get("shipped") or {}
    title = f"{result['model']} on {result['data']}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>tinynet run: {html.escape(title)}</h1>",
             f"<p class='note'>{result['images']} images in {len(result['classes'])} classes; split "
             f"{result['split']['train']} / {result['split']['validation']} / {result['split']['test']}; "
             f"{len(result['history']['epochs'])} epochs; best validation accuracy "
             f"{_percent(result.get('best_val_accuracy'))} at epoch {result.get('best_epoch')}.</p>"]

    rows = []
    for kind, what in (("last", "last epoch (the assignment's number)"), ("best", "best validation epoch (shipped)")):
        entry = shipped.get(kind)
        if entry:
            rows.append([f"{kind}: {what}", entry.get("epoch"), _percent(entry.get("accuracy")),
                         float(entry["f1_weighted"]) if entry.get("f1_weighted") is not None else "n/a",
                         entry.get("file", "")])
    if not rows:
        rows.append(["last epoch", len(result["history"]["epochs"]), _percent(test["accuracy"]),
                     float(test["f1_weighted"]), ""])
    parts += ["<h2>Test set</h2>", _table(rows, ["weights", "epoch", "accuracy", "weighted F1", "file"])]

    figures = [name for name in result.get("figures", []) if (out / name).is_file()]
    for group, names in (("Training", ["curves.png"]), ("Errors", ["confusion_matrix.png"])):
        parts.append(f"<h2>{group}</h2>")
        parts += [_figure(out / name) for name in names if name in figures]
        if group == "Errors":
            per_class = [[name, float(v["precision"]), float(v["recall"]), float(v["f1-score"]), int(v["support"])]
                         for name, v in test["per_class"].items()]
            parts += ["<h3>Per class (test set, last epoch's weights)</h3>",
                      _table(per_class, ["class", "precision", "recall", "F1", "support"])]
    parts.append("<h2>Most confident mistakes (test set, last epoch's weights)</h2>")
    if mistakes:
        parts.append("<div class='gallery'>")
        for m in mistakes:
            parts.append(f"<figure><img src='{_array_uri(m['image'])}' alt='{html.escape(m['true'])}'>"
                         f"<figcaption>true: {html.escape(m['true'])}<br><span class='wrong'>predicted: "
                         f"{html.escape(m['predicted'])}</span><br>confidence {100 * m['confidence']:.1f} %"
                         f"</figcaption></figure>")
        parts.append("</div>")
    else:
        parts.append("<p>None: every test image was classified correctly.</p>")
    parts.append("<h2>Data</h2>")
    parts += [_figure(out / name) for name in ("class_distribution.png", "batch_grid.png") if name in figures]
    tsne = [name for name in figures if name.startswith("tsne_")]
    if tsne:
        parts.append("<h2>Features</h2>")
        parts += [_figure(out / name) for name in tsne]
    config = [[key, json.dumps(value) if not isinstance(value, str) else value]
              for key, value in result.get("config", {}).items()]
    parts += ["<h2>Configuration</h2>", _table(config, ["option", "value"]),
              f"<p class='note'>hardware: {html.escape(json.dumps(result.get('hardware', {})))}; "
              f"{result.get('wall_seconds', 0):.0f} s in all.</p>", "</body></html>"]
    with atomic_write(path) as file:  # a kill midway leaves the old page or none, never half of one
        file.write("\n".join(parts).encode("utf-8"))
    return path


def _figure(path: pathlib.Path) -> str:
    caption = FIGURE_TITLES.get(path.name, path.stem)
    return (f"<figure><img src='{_png_uri(path.read_bytes())}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
