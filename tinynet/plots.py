"""The assignment's figures, saved as PNG files.

Matplotlib is used through its object-oriented API with the Agg canvas (no
``pyplot``, no global state, no display needed), so plotting works on
headless machines and never changes the caller's matplotlib backend.

Class names are someone else's text (folder names, a model file's metadata),
and every text in these figures is drawn as plain text (:data:`PLAIN`):
matplotlib would otherwise parse a name with two ``$`` as mathtext (``x$^$y``
is a parse error that ends the run; ``price $5-$10`` is silently set as
math), and with the ``text.usetex`` setting would hand it to LaTeX, an
external program.
"""
from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .io.files import atomic_write

__all__ = ["plot_class_distribution", "plot_batch_grid", "plot_curves", "plot_confusion_matrix", "plot_tsne",
           "PLAIN"]

#: Text properties for every text these figures draw: no mathtext (``$`` is a dollar sign), no LaTeX, whatever
#: the caller's rcParams say. Given to each call that makes a text, so that it holds for that text alone.
PLAIN = {"parse_math": False, "usetex": False}


def _legend(ax, *args, **kwargs):
    """``ax.legend(...)`` with its texts plain (a legend takes no text properties of its own)."""
    legend = ax.legend(*args, **kwargs)
    for text in legend.get_texts():
        text.set(**PLAIN)
    return legend


def _save(fig: Figure, path) -> pathlib.Path:
    """Render ``fig`` to the PNG file ``path`` atomically: a kill midway leaves the old figure or none."""
    path = pathlib.Path(path)
    FigureCanvasAgg(fig)
    with atomic_write(path) as file:
        fig.savefig(file, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_class_distribution(splits: dict, classes, path) -> pathlib.Path:
    """Bar chart of images per class for each named split, e.g. ``{"train": labels, "validation": labels}``."""
    k = len(classes)
    fig = Figure(figsize=(max(6.0, 0.45 * k + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(len(splits), 1)
    x = np.arange(k)
    for i, (name, labels) in enumerate(splits.items()):
        counts = np.bincount(np.asarray(labels), minlength=k)
        ax.bar(x + (i - (len(splits) - 1) / 2) * width, counts, width, label=f"{name} ({len(labels)})")
    ax.set_xticks(x, list(classes), rotation=45, ha="right", **PLAIN)
    ax.set_ylabel("images", **PLAIN)
    ax.set_title("Class distribution", **PLAIN)
    # Outside the axes, right of the plot: inside, with every class about equally frequent, there is no free
    # corner, and matplotlib's "best" place covers the last classes' bars.  The saved figure grows to hold it.
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_batch_grid(images, labels, classes, path, columns: int = 8) -> pathlib.Path:
    """A grid of one batch: ``images`` uint8 (B, H, W, 3) or normalised float (B, 3, H, W) in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:  # (B, 3, H, W) normalised with mean 0.5, std 0.5
        images = np.clip((images.transpose(0, 2, 3, 1) * 0.5 + 0.5) * 255, 0, 255).astype(np.uint8)
    b = len(images)
    rows = -(-b // columns)
    fig = Figure(figsize=(1.6 * columns, 1.75 * rows))
    for i in range(b):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(images[i])
        ax.set_title(str(classes[int(labels[i])]), fontsize=7, **PLAIN)
        ax.axis("off")
    return _save(fig, path)


def plot_curves(history, path) -> pathlib.Path:
    """Loss and accuracy per epoch, training against validation (a :class:`~tinynet.train.History`)."""
    epochs = [e.epoch for e in history.epochs]
    fig = Figure(figsize=(11, 4))
    for i, (metric, title) in enumerate((("loss", "Loss"), ("acc", "Accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(epochs, [getattr(e, f"train_{metric}") for e in history.epochs], "o-", label="train")
        val = [getattr(e, f"val_{metric}") for e in history.epochs]
        if any(v is not None for v in val):
            ax.plot(epochs, val, "o-", label="validation")
        if history.best_epoch is not None:
            ax.axvline(history.best_epoch, color="grey", ls=":", label=f"best epoch {history.best_epoch}")
        ax.set_xlabel("epoch", **PLAIN)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.25, 1.5 on a short run
        ax.set_title(title, **PLAIN)
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(fig, path)


#: The side of one confusion-matrix cell, in inches, as long as the counts are written in the cells: the figure
#: grows with the class count, so that the numbers keep :data:`MATRIX_FONT_POINTS` (a 5-digit count fits).
MATRIX_CELL_INCHES = 0.4
#: The counts' font size, in points; class names are written at the same size.
MATRIX_FONT_POINTS = 8
#: The most classes whose counts are written in the cells (a 50 x 50 matrix is already 20 inches wide).
MATRIX_MOST_ANNOTATED = 50
#: Beyond :data:`MATRIX_MOST_ANNOTATED` classes the matrix keeps this side, in inches, and its cells shrink.
MATRIX_LARGEST_SIDE = 20.0
#: A matrix of few classes is drawn at least this large, in inches.
MATRIX_SMALLEST_SIDE = 4.0


def plot_confusion_matrix(matrix, classes, path, title: str = "Confusion matrix") -> pathlib.Path:
    """Counts with class names; rows are true classes, columns predicted.

    The figure is laid out in inches around the matrix, rather than the
    matrix shrunk into a fixed figure: each cell is :data:`MATRIX_CELL_INCHES`
    wide (larger for few classes), so the counts keep a readable
    :data:`MATRIX_FONT_POINTS` whatever the class count, up to
    :data:`MATRIX_MOST_ANNOTATED` classes; beyond, the cells shrink to keep
    the figure :data:`MATRIX_LARGEST_SIDE` inches wide and carry no numbers.
    """
    matrix = np.asarray(matrix)
    k = len(classes)
    annotate = k <= MATRIX_MOST_ANNOTATED
    side = max(MATRIX_SMALLEST_SIDE, k * MATRIX_CELL_INCHES) if annotate else MATRIX_LARGEST_SIDE
    cell_points = 72 * side / max(k, 1)
    names_points = min(MATRIX_FONT_POINTS, 0.8 * cell_points)  # a name per row must fit its row
    # Margins, in inches: the class names left and below (rotated), the title above, the colour bar right.
    # Names longer than the margin still show: the figure is saved with bbox_inches="tight".
    left, bottom, top, right = 1.6, 1.6, 0.6, 1.2
    width, height = left + side + right, bottom + side + top
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    im = ax.imshow(matrix, cmap="Blues", aspect="auto")  # the axes box is square: cells are square
    colour_bar = fig.add_axes(((left + side + 0.2) / width, bottom / height, 0.2 / width, side / height))
    fig.colorbar(im, cax=colour_bar).ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts are whole
    ax.set_xticks(range(k), list(classes), rotation=45, ha="right", fontsize=names_points, **PLAIN)
    ax.set_yticks(range(k), list(classes), fontsize=names_points, **PLAIN)
    ax.set_xlabel("predicted", **PLAIN)
    ax.set_ylabel("true", **PLAIN)
    ax.set_title(title, **PLAIN)
    if annotate:
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=MATRIX_FONT_POINTS,
                        color="white" if matrix[i, j] > threshold else "black", **PLAIN)
    return _save(fig, path)


def tsne_embedding(features, dims: int = 2, seed: int = 42) -> np.ndarray:
    """scikit-learn's t-SNE of ``features`` (n, d) into ``dims`` dimensions; perplexity capped for small n."""
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = float(min(30.0, (n - 1) / 3))
    return TSNE(n_components=dims, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(features, dtype=np.float32))


def plot_tsne(features, labels, classes, path, dims: int = 2, title: str = "t-SNE", seed: int = 42) -> pathlib.Path:
    """Scatter plot of the t-SNE embedding of ``features``, one colour per class (2-D or 3-D)."""
    points = tsne_embedding(features, dims, seed)
    labels = np.asarray(labels)
    fig = Figure(figsize=(8, 6.5))
    ax = fig.add_subplot(projection="3d" if dims == 3 else None)
    cmap = _class_colours(len(classes))
    handles, names = [], []
    for k, name in enumerate(classes):
        sel = labels == k
        if sel.any():
            handles.append(ax.scatter(*points[sel].T, s=8, color=cmap[k], alpha=0.8))
            names.append(str(name))
    ax.set_title(title, **PLAIN)
    # Handles and names given explicitly: from the artists' labels, matplotlib would leave out a class whose
    # name starts with "_" (its mark for "no legend entry").
    _legend(ax, handles, names, fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def _class_colours(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab20" if k > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(k)]
