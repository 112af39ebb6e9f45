"""``tinynet predict`` (and ``examples/predict.py``): classify photos with a model trained by tinynet.

    tinynet predict --weights runs/resnet/best.safetensors photo.jpg more/*.png folder/
    tinynet predict --weights runs/resnet/best.safetensors --top-k 3 --csv out.csv folder/
    tinynet predict --onnx model.onnx folder/          # the exported graph, run by onnxruntime

Prints, for every image, its top-k classes with their probabilities (one line
per image); files that cannot be read are listed as skipped, with the reason
(the same decoder and limits as in training).  Folders are searched
recursively for image files, listed in natural order (``img2`` before
``img10``).  The model, its class names, image size and normalisation come
from the weights file's metadata.  When images lie in folders named after the
model's classes (a labelled folder, as for training), the accuracy on them is
printed too; ``tinynet evaluate`` gives the full evaluation.

Exit status: 0 when at least one image was classified; 1 when none could be;
2 for unusable input (no weights, weights that do not fit, metadata with a
value tinynet cannot use, an unknown option, --device cuda without a GPU),
with a one-line message.

Class names and file names are someone else's text: printed, their control
characters are escaped (tinynet.text.printable: no ESC sequence reaches the
terminal); in the CSV file, a cell that would start like a spreadsheet
formula (= + - @ ...) starts with a ' (tinynet.text.csv_cell, OWASP's advice).
"""
from __future__ import annotations

import csv
import itertools
import os
import sys

from .. import backend
from ..cli import CommandLineParser, UsageError
from ..predict import ModelFileError, find_images, load_model, load_onnx, model_forward, predict_files
from ..text import csv_cell, printable

__all__ = ["build_parser", "main", "load_forward", "true_class"]


def build_parser(prog: str = "predict.py") -> CommandLineParser:
    parser = CommandLineParser(prog=prog, description="Top-k classes of photos, with a model trained by tinynet.")
    add_model_options(parser)
    parser.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image; default 5")
    parser.add_argument("--csv", help="also write the predictions to this CSV file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; default cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass; default 64")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_model_options(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="best.safetensors or last.safetensors from a training run")
    source.add_argument("--onnx", help="a model exported with tinynet export (runs on onnxruntime)")


def load_forward(args, device: str):
    """``(forward, meta)`` for ``--weights`` or ``--onnx``; a :class:`UsageError` for a file that cannot serve.

    An ONNX graph given to ``--weights`` (the safetensors reader would call it
    damaged) is refused with the option that reads it.
    """
    if args.weights is not None and args.weights.lower().endswith(".onnx"):
        raise UsageError(f"--weights {args.weights!r} is an ONNX graph; run it with --onnx {args.weights}")
    try:
        if args.onnx:
            return load_onnx(args.onnx, device)
        model, meta = load_model(args.weights, device)
        return model_forward(model, device), meta
    except (ModelFileError, ValueError, RuntimeError, ImportError) as error:
        raise UsageError(printable(error)) from None


def true_class(path: str, classes) -> str | None:
    """The class ``path`` is labelled with: the name of its folder, when that is one of ``classes``; else None."""
    folder = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return folder if folder in classes else None


def main(argv=None, prog: str = "predict.py") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    prog = parser.prog
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if args.top_k < 1 or args.batch_size < 1:
        print(f"{prog}: error: --top-k and --batch-size must be positive, got {args.top_k} and {args.batch_size}",
              file=sys.stderr)
        return 2
    try:
        device = backend.check_device(args.device)
        forward, meta = load_forward(args, device)
    except (UsageError, ValueError, RuntimeError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2

    files, missing = find_images(args.inputs)
    k = min(args.top_k, len(meta["classes"]))
    try:
        csv_file = open(args.csv, "w", newline="", encoding="utf-8", errors="backslashreplace") if args.csv else None
    except OSError as error:
        print(f"{prog}: error: --csv {args.csv!r} cannot be written: {printable(error.strerror or error)}",
              file=sys.stderr)
        return 2
    writer = csv.writer(csv_file) if csv_file else None
    if writer:
        writer.writerow(["path"] + [f"{what}{i}" for i in range(1, k + 1) for what in ("class", "p")] + ["skipped"])
    done = skipped = labelled = correct = 0
    try:  # printed (and written) as each batch is done, so a large folder shows results as it goes
        results = predict_files(forward, meta, files, top_k=args.top_k, batch_size=args.batch_size,
                                progress=not args.no_progress and sys.stderr.isatty())
        for item in itertools.chain(missing, results):
            if item.skipped:
                skipped += 1
                print(f"{printable(item.path)}: skipped: {printable(item.skipped)}")
            else:
                done += 1
                print(f"{printable(item.path)}: "
                      + ", ".join(f"{printable(name)} {100 * p:.1f} %" for name, p in item.top))
                label = true_class(item.path, meta["classes"])
                if label is not None:
                    labelled += 1
                    correct += item.top[0][0] == label
            if writer:
                row = [c for name, p in item.top for c in (csv_cell(name), f"{p:.6f}")]
                writer.writerow([csv_cell(item.path)] + row + [""] * (2 * k - len(row))
                                + [csv_cell(item.skipped or "")])
    except ModelFileError as error:  # outputs that do not fit the class names, found at the first batch
        print(f"{prog}: error: {printable(error)}", file=sys.stderr)
        return 2
    finally:
        if csv_file:
            csv_file.close()
    print(f"{prog}: {done} image{'s' if done != 1 else ''} classified, {skipped} skipped", file=sys.stderr)
    if labelled:
        print(f"{prog}: accuracy {100 * correct / labelled:.1f} % ({correct} of {labelled} images in folders named "
              f"after a class; tinynet evaluate gives F1, the per-class table and the confusion matrix)",
              file=sys.stderr)
    return 0 if done else 1
