"""Classification metrics (scikit-learn's definitions): accuracy, weighted F1, confusion matrix."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

__all__ = ["classification_metrics"]


def classification_metrics(labels, predictions, classes) -> dict:
    """Accuracy, weighted F1 (per-class F1 averaged with class frequencies as weights), confusion matrix.

    Returns JSON-able values: ``accuracy``, ``f1_weighted``, ``confusion_matrix``
    (rows: true class, columns: predicted, in the order of ``classes``) and
    ``per_class`` (precision, recall, F1, support).
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    ids = list(range(len(classes)))
    report = classification_report(labels, predictions, labels=ids, target_names=list(classes),
                                   output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_weighted": float(f1_score(labels, predictions, labels=ids, average="weighted", zero_division=0)),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
        "per_class": {name: {k: float(v) for k, v in report[name].items()} for name in classes},
    }
