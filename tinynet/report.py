"""``report.html``: one self-contained page per training run, or per evaluation.

Everything a run produced, on one page that opens offline in any browser and
can be mailed as one file: the images are embedded as base64 ``data:`` URIs,
the styles are inline, and the page loads nothing from the network.

Sections of a training run's page: the test numbers for the last and the best
epoch's weights, the training curves, the confusion matrix, per-class
precision / recall / F1, a gallery of the test set's most confident mistakes
(the photos the model got wrong while being surest of itself, with the true
and the predicted class and the file, which shows which classes it confuses:
in the assignment, black and brown bears), the class distribution, a
training batch, the t-SNE plots (ResNet) and the configuration.

An evaluation (``tinynet evaluate``: ``result["kind"] == "evaluation"``) has
no training: its page is titled as the evaluation of a weights file on a
folder and shows the numbers, the confusion matrix, the per-class table, the
mistakes and the configuration.  A section whose data the result does not
hold is left out, never shown empty.

File names and class names are someone else's text: they are HTML-escaped,
and their control characters written as visible escapes
(:func:`tinynet.text.printable`), which also keeps a file name that is not
valid UTF-8 from stopping the page.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import pathlib

import numpy as np

from .io.files import atomic_write
from .text import printable

__all__ = ["confident_mistakes", "mistakes_gallery", "image_source", "describe_data", "write_report"]

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
.source { color: #555; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
"""

#: What ``result["data"]`` holds for a run on the bundled digits (no ``--data``): see :func:`describe_data`.
DIGITS_IMAGES = 1797


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
             "predicted": str(classes[int(probabilities[i].argmax())]), "confidence": float(probabilities[i].max()),
             **image_source(dataset, int(indices[i]))}
            for i in confident_mistakes(probabilities, labels, count)]


def image_source(dataset, index: int) -> dict:
    """Where image ``index`` of ``dataset`` comes from, for its caption in the gallery.

    ``{"file": path}``, relative to the data folder, for a dataset read from
    files (:class:`~tinynet.data.ImageFolder`: ``samples`` and ``root``);
    else (the bundled digits) ``{"index": index}``, its index in the dataset.
    """
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if samples is None:
        return {"index": index}
    path = samples[index]
    return {"file": os.path.relpath(path, root) if root is not None else path}


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
        return f"<{tag}>{_text(value)}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    return "<table>" + head + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def describe_data(result: dict) -> str:
    """What the run's data was, in words: the folder, or the bundled digits (``config["data"]`` is None)."""
    config = result.get("config", {})
    if "data" in config and config["data"] is None:
        size = config.get("image_size")
        rendered = f", rendered to {size}x{size} RGB" if size else ""
        images = result.get("images", DIGITS_IMAGES)
        count = f"{images:,} images" if images == DIGITS_IMAGES else f"{images:,} of its {DIGITS_IMAGES:,} images"
        return f"bundled scikit-learn digits ({count}{rendered})"
    return str(result["data"])


def write_report(out, result: dict, mistakes=(), path=None) -> pathlib.Path:
    """Write ``report.html`` into the run folder ``out`` from its metrics (``result``, as in metrics.json).

    ``mistakes``: dicts with ``image`` (uint8 (H, W, 3)), ``true``,
    ``predicted`` (class names), ``confidence`` (the predicted class's
    probability) and, optionally, where the image comes from: ``file`` (its
    path relative to the data folder) or ``index`` (for images without a
    file), e.g. from :func:`mistakes_gallery`.  The
    figures are read from ``out`` (the names in ``result["figures"]``) and
    embedded.  ``result["kind"] == "evaluation"`` makes it an evaluation's
    page (see the module's docstring).
    """
    out = pathlib.Path(out)
    path = pathlib.Path(path) if path else out / "report.html"
    evaluation = result.get("kind") == "evaluation"
    figures = [name for name in result.get("figures", []) if (out / name).is_file()]
    head = _evaluation_head(result) if evaluation else _training_head(result)
    parts = head + _errors(out, result, figures, evaluation)
    parts += _mistakes(result, mistakes, evaluation)
    if not evaluation:
        parts += _training_data(out, figures)
    config = [[key, _option(key, value, result)] for key, value in result.get("config", {}).items()]
    if config:
        parts += ["<h2>Configuration</h2>", _table(config, ["option", "value"])]
    parts += [f"<p class='note'>hardware: {html.escape(json.dumps(result.get('hardware', {})))}; "
              f"{result.get('wall_seconds', 0):.0f} s in all.</p>", "</body></html>"]
    with atomic_write(path) as file:  # a kill midway leaves the old page or none, never half of one
        file.write("\n".join(parts).encode("utf-8"))
    return path


def _page_start(title: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_text(title)}</title>"
            f"<style>{STYLE}</style></head><body>")


def _training_head(result: dict) -> list[str]:
    test, shipped = result["test"], result.get("shipped") or {}
    title = f"{result['model']} on {describe_data(result)}"
    epochs = len(result["history"]["epochs"])
    parts = [_page_start(title), f"<h1>tinynet run: {_text(title)}</h1>",
             f"<p class='note'>{result['images']} images in {len(result['classes'])} classes; split "
             f"{result['split']['train']} / {result['split']['validation']} / {result['split']['test']}; "
             f"{epochs} epoch{'s' if epochs != 1 else ''}; best validation accuracy "
             f"{_percent(result.get('best_val_accuracy'))} at epoch {result.get('best_epoch')}.</p>"]
    rows = []
    for kind, what in (("last", "last epoch (the assignment's number)"), ("best", "best validation epoch (shipped)")):
        entry = shipped.get(kind)
        if entry:
            rows.append([f"{kind}: {what}", entry.get("epoch"), _percent(entry.get("accuracy")),
                         float(entry["f1_weighted"]) if entry.get("f1_weighted") is not None else "n/a",
                         entry.get("file", "")])
    if not rows:
        rows.append(["last epoch", epochs, _percent(test["accuracy"]), float(test["f1_weighted"]), ""])
    return parts + ["<h2>Test set</h2>", _table(rows, ["weights", "epoch", "accuracy", "weighted F1", "file"])]


def _evaluation_head(result: dict) -> list[str]:
    test, weights = result["test"], pathlib.Path(str(result["weights"])).name
    title = f"{weights} on {result['data']}"
    skipped = result.get("skipped_files", 0)
    parts = [_page_start(f"evaluation of {title}"), f"<h1>tinynet evaluation: {_text(title)}</h1>",
             f"<p class='note'>The {_text(result['model'])} weights {_text(result['weights'])} classified "
             f"{result['images']} image{'s' if result['images'] != 1 else ''} of the labelled folder "
             f"{_text(result['data'])} ({len(result['classes'])} classes"
             f"{f'; {skipped} files skipped' if skipped else ''}), without training.</p>"]
    rows = [["accuracy", _percent(test["accuracy"])], ["weighted F1", float(test["f1_weighted"])],
            ["images", int(result["images"])]]
    return parts + ["<h2>Result</h2>", _table(rows)]


def _errors(out: pathlib.Path, result: dict, figures, evaluation: bool) -> list[str]:
    """The curves (training) and the confusion matrix with the per-class table."""
    parts = []
    if "curves.png" in figures:
        parts += ["<h2>Training</h2>", _figure(out / "curves.png")]
    scope = "the evaluated folder" if evaluation else "test set, last epoch's weights"
    parts.append("<h2>Errors</h2>")
    if "confusion_matrix.png" in figures:
        parts.append(_figure(out / "confusion_matrix.png", f"Confusion matrix ({scope})"))
    per_class = [[name, float(v["precision"]), float(v["recall"]), float(v["f1-score"]), int(v["support"])]
                 for name, v in result["test"]["per_class"].items()]
    return parts + [f"<h3>Per class ({scope})</h3>",
                    _table(per_class, ["class", "precision", "recall", "F1", "support"])]


def _mistakes(result: dict, mistakes, evaluation: bool) -> list[str]:
    scope = "" if evaluation else " (test set, last epoch's weights)"
    parts = [f"<h2>Most confident mistakes{scope}</h2>"]
    if not mistakes:
        what = "image" if evaluation else "test image"
        return parts + [f"<p>None: every {what} was classified correctly.</p>"]
    if any("index" in m for m in mistakes):
        parts.append("<p class='note'>These images have no file: #N is the image's index in the data set the run "
                     "used (for the bundled digits, scikit-learn's <code>load_digits()</code> order, after "
                     "<code>--limit</code> when given).</p>")
    if any("file" in m for m in mistakes):
        parts.append(f"<p class='note'>Files relative to the data folder {_text(describe_data(result))}.</p>")
    parts.append("<div class='gallery'>")
    for m in mistakes:
        source = m["file"] if "file" in m else f"#{m['index']}" if "index" in m else None
        where = f"<br><span class='source'>{_text(source)}</span>" if source is not None else ""
        parts.append(f"<figure><img src='{_array_uri(m['image'])}' alt='{_text(source or m['true'])}'>"
                     f"<figcaption>true: {_text(m['true'])}<br><span class='wrong'>predicted: "
                     f"{_text(m['predicted'])}</span><br>confidence {100 * m['confidence']:.1f} %{where}"
                     f"</figcaption></figure>")
    return parts + ["</div>"]


def _training_data(out: pathlib.Path, figures) -> list[str]:
    parts = []
    data = [name for name in ("class_distribution.png", "batch_grid.png") if name in figures]
    if data:
        parts.append("<h2>Data</h2>")
        parts += [_figure(out / name) for name in data]
    tsne = [name for name in figures if name.startswith("tsne_")]
    if tsne:
        parts.append("<h2>Features</h2>")
        parts += [_figure(out / name) for name in tsne]
    return parts


def _option(key: str, value, result: dict) -> str:
    """A configuration value as the table shows it: the data in words, an option not given as such."""
    if key == "data" and value is None:
        return f"none: {describe_data(result)}"
    if value is None:
        return "not given"
    return value if isinstance(value, str) else json.dumps(value)


def _text(value) -> str:
    """``value`` as HTML text: control characters visible (:func:`printable`), then escaped, quotes included."""
    return html.escape(printable(value), quote=True)


def _figure(path: pathlib.Path, caption: str | None = None) -> str:
    caption = caption or FIGURE_TITLES.get(path.name, path.stem)
    return (f"<figure><img src='{_png_uri(path.read_bytes())}' alt='{_text(caption)}'>"
            f"<figcaption>{_text(caption)}</figcaption></figure>")
