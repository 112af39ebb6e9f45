"""``tinynet evaluate``: trained weights on a labelled folder, without training.

    tinynet evaluate --weights runs/resnet/best.safetensors photos/          # photos/<class>/*.jpg
    tinynet evaluate --onnx model.onnx photos/ --out runs/evaluate

The folder holds one sub-folder per class, named as the model's classes (a
class the model does not know is refused; a class of the model without a
folder is allowed: it has no support).  Every image is classified with the
same decoder, size and normalisation as :mod:`tinynet.predict`; the command
prints the accuracy, the weighted F1 and the per-class precision / recall /
F1 table (:func:`tinynet.metrics.classification_metrics`), and writes to
``--out`` the confusion matrix (``confusion_matrix.png``), ``evaluation.json``
with every number, and ``report.html`` (:mod:`tinynet.report`: an
evaluation's page, with the most confident mistakes and their files).  A new
evaluation never replaces another: as for training runs, ``runs/evaluate`` is
followed by ``runs/evaluate-2``, ...  An image's class is the sub-folder of
``data`` it lies in, at any depth (``photos/cat/2024/a.jpg`` is a cat).
``--device`` and ``--threads`` are predict's (:mod:`tinynet.commands.predict`).

Exit status: 0 done; 1 no image could be classified; 2 unusable input
(one line on stderr).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import time

import numpy as np

from .. import backend
from ..cli import CommandLineParser, FailedRun, UsageError, check_threads, claim_output_folder, hardware, run_command, \
    write_json
from ..data.decode import decode_rgb, image_size, read_file
from ..metrics import classification_metrics
from ..predict import find_images, predict_files
from ..report import confident_mistakes, write_report
from ..text import printable
from .predict import add_model_options, check_model_device, load_forward, start_model_threads

__all__ = ["build_parser", "main", "evaluate_folder"]

OUTPUT_FILES = frozenset({"evaluation.json", "confusion_matrix.png", "report.html"})


def build_parser(prog: str = "tinynet evaluate") -> CommandLineParser:
    parser = CommandLineParser(prog=prog, description="Accuracy, weighted F1, per-class table, confusion matrix and "
                                                      "report of trained weights on a labelled folder (one "
                                                      "sub-folder per class), without training.")
    add_model_options(parser)
    parser.add_argument("data", help="folder with one sub-folder of images per class, named as the model's classes")
    parser.add_argument("--out", default="runs/evaluate", help="output folder; default runs/evaluate")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass; default 64")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def evaluate_folder(args, log=print) -> dict:
    """Evaluate as ``args`` say; returns what is written to ``evaluation.json``."""
    started = time.time()
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    check_threads(args.threads)
    data = pathlib.Path(args.data)
    if not data.is_dir():
        raise UsageError(f"data folder {args.data!r} does not exist or is not a folder")
    device = check_model_device(args)
    forward, meta = load_forward(args, device)
    classes = list(meta["classes"])
    folders = sorted(entry.name for entry in os.scandir(data) if entry.is_dir() and not entry.name.startswith("."))
    unknown = [name for name in folders if name not in classes]
    if not folders or unknown:
        found = f"sub-folders {printable(', '.join(unknown[:5]))}{' ...' if len(unknown) > 5 else ''} are not" \
            if unknown else "no sub-folder is"
        raise UsageError(f"{args.data!r}: {found} among the model's {len(classes)} classes "
                         f"({printable(', '.join(classes[:5]))}{', ...' if len(classes) > 5 else ''}); evaluate "
                         f"needs one sub-folder per class, named as the classes it was trained on")
    label_of = {}  # file -> class index: the class folder it lies in, however deep
    for name in folders:
        label_of.update(dict.fromkeys(find_images([data / name])[0], classes.index(name)))
    files = list(label_of)
    held = contextlib.ExitStack()
    with held:
        out, moved = claim_output_folder(args.out, OUTPUT_FILES, resume=False, keep=held)
        if moved:
            log(moved)
        forward, governor = start_model_threads(args, forward, log)
        labels, predictions, probabilities, used, skipped = [], [], [], [], []
        for item in predict_files(forward, meta, files, top_k=len(classes), batch_size=args.batch_size,
                                  progress=not args.no_progress and sys.stderr.isatty()):
            if item.skipped:
                skipped.append((item.path, item.skipped))
                continue
            row = dict(item.top)
            probabilities.append([row[name] for name in classes])
            labels.append(label_of[item.path])
            predictions.append(classes.index(item.top[0][0]))
            used.append(item.path)
        for path, reason in skipped[:10]:
            log(f"  skipped {printable(path)}: {printable(reason)}")
        if not used:
            raise FailedRun(f"{args.data!r}: no image could be classified ({len(skipped)} files skipped)")
        metrics = classification_metrics(labels, predictions, classes)
        from .. import plots

        title = f"{data.name}: accuracy {metrics['accuracy']:.3f}, weighted F1 {metrics['f1_weighted']:.3f}"
        plots.plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png", title=title)
        size = image_size(meta["image_size"])
        mistakes = []
        for i in confident_mistakes(np.asarray(probabilities), np.asarray(labels)):
            mistakes.append({"image": decode_rgb(read_file(used[i]), size), "true": classes[labels[i]],
                             "predicted": classes[predictions[i]], "file": os.path.relpath(used[i], data),
                             "confidence": float(probabilities[i][predictions[i]])})
        source = args.weights or args.onnx
        result = {
            "kind": "evaluation",  # report.html is an evaluation's page, not a training run's
            "model": meta["model"], "weights": str(source), "data": str(data.resolve()),
            "classes": classes, "images": len(used), "skipped_files": len(skipped),
            "test": {"accuracy": metrics["accuracy"], "f1_weighted": metrics["f1_weighted"], "loss": None,
                     "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]},
            "figures": ["confusion_matrix.png"], "report": "report.html",
            "config": {"weights" if args.weights else "onnx": str(source), "data": str(data), "device": device,
                       "batch_size": args.batch_size, "threads": args.threads},
            "hardware": hardware(device),
            # tinynet's threads (--weights); with --onnx, onnxruntime sized its own pool
            "threads": backend.num_threads() if governor is not None else None,
            "threads_setting": args.threads, "threads_changes": governor.changes if governor is not None else 0,
            "wall_seconds": time.time() - started,
        }
        write_json(out / "evaluation.json", result)
        write_report(out, result, mistakes)
    width = max(len(name) for name in classes)
    log(f"{'class':<{width}}  precision  recall     F1  support")
    for name, row in metrics["per_class"].items():
        log(f"{printable(name):<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1-score']:5.3f}  "
            f"{int(row['support']):7d}")
    log(f"Accuracy: {100 * metrics['accuracy']:.1f} %  |  weighted F1: {metrics['f1_weighted']:.2f}  "
        f"({len(used)} image{'s' if len(used) != 1 else ''}, {len(skipped)} skipped)")
    log(f"confusion_matrix.png, evaluation.json, report.html written to {out}")
    return result


def main(argv=None, prog: str = "tinynet evaluate") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: evaluate_folder(args))
