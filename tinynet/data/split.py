"""The assignment's stratified 70 / 20 / 10 split into training, validation and test indices."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(labels, seed: int = 42, classes: Sequence[str] | None = None):
    """Split ``range(len(labels))`` into train (70 %), validation (20 %) and test (10 %), stratified by label.

    Exactly the assignment's two calls to scikit-learn::

        train, rest = train_test_split(indices, test_size=0.3, random_state=seed, stratify=labels)
        val, test = train_test_split(rest, test_size=1/3, random_state=seed, stratify=labels[rest])

    so the same labels and seed give the same indices as the original
    notebook.  In the second call the *first* part, two thirds of the rest
    (20 % overall), is validation, and the second part, the one third named
    by ``test_size`` (10 % overall), is test.  Each part keeps every class's
    share of the whole, up to rounding.

    Parameters
    ----------
    labels : int array ``(N,)``, e.g. ``dataset.labels``.
    seed : ``random_state`` of both calls.
    classes : class names, used only to name a class in an error.

    Returns
    -------
    ``(train_idx, val_idx, test_idx)``: int64 arrays into ``labels``, in
    scikit-learn's (shuffled) order.

    Raises ``ValueError`` naming the classes with too few images to be
    stratified: each needs at least 2 images in the whole set and 2 in the
    30 % rest, which takes about 7 images per class.
    """
    from sklearn.model_selection import train_test_split  # imported here: scikit-learn is slow to import

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"stratified_split: expected labels of shape (N,), received shape {labels.shape}")
    indices = np.arange(len(labels), dtype=np.int64)
    try:
        train, rest = train_test_split(indices, test_size=0.3, random_state=seed, stratify=labels)
    except ValueError as error:
        raise ValueError(_cannot_stratify(labels, "the whole set", classes, error)) from error
    try:
        val, test = train_test_split(rest, test_size=1 / 3, random_state=seed, stratify=labels[rest])
    except ValueError as error:
        where = "the 30 % rest that validation and test are drawn from"
        raise ValueError(_cannot_stratify(labels[rest], where, classes, error)) from error
    return train, val, test


def _cannot_stratify(pool: np.ndarray, where: str, classes, error: ValueError) -> str:
    """scikit-learn's stratification error, rephrased to name the classes behind it."""
    values, counts = np.unique(pool, return_counts=True)
    single = values[counts < 2].tolist()
    if single:
        names = ", ".join(f"{classes[label]!r} (label {label})" if classes is not None else f"label {label}"
                          for label in single[:10])
        return (f"stratified_split: cannot stratify: in {where} ({len(pool)} images) each class needs at least "
                f"2 images (about 7 per class in all), but these have 1: {names}. (scikit-learn: {error})")
    return (f"stratified_split: cannot stratify {where}: {len(pool)} images are too few for {len(values)} "
            f"classes, as every part must hold at least one image of each class; the 10 % test part alone "
            f"needs {len(values)}, i.e. about {10 * len(values)} images in all. (scikit-learn: {error})")
