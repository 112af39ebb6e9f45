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

``--device`` says where the model runs.  With ``--weights``, tinynet's own
backend: ``cuda`` needs CuPy and a GPU.  With ``--onnx``, onnxruntime runs the
graph and CuPy plays no part: ``cuda`` selects onnxruntime's
``CUDAExecutionProvider`` (the ``onnxruntime-gpu`` package); an onnxruntime
without it is refused in one line rather than run on the CPU, as ``--device
cuda`` without a GPU is refused with ``--weights``: a run asked for on the GPU
that silently ran on the CPU would report CPU timings as GPU ones; so is a
provider that is built in but does not start (onnxruntime would fall back to
the CPU with only a warning).

``--threads auto|N`` (default ``auto``, or ``$TINYNET_THREADS``) is train's
option (:mod:`tinynet.cores`): the CPU threads of the matrix products and of
tinynet's own passes, chosen before the first batch and, with ``auto``,
looked at again while the batches run.  With ``--onnx`` a number sets
onnxruntime's intra-op threads, and ``auto`` leaves onnxruntime its own default.

Exit status: 0 when at least one image was classified; 1 when none could be;
2 for unusable input (no weights, weights that do not fit, metadata with a
value tinynet cannot use, an unknown option, a bad --threads, --device cuda
without a GPU or, with --onnx, without onnxruntime's CUDA provider), with a
one-line message.

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
from ..cli import CommandLineParser, UsageError, add_threads_argument, check_device, check_threads, start_threads
from ..predict import ModelFileError, find_images, load_model, load_onnx, model_forward, predict_files
from ..text import csv_cell, printable

__all__ = ["build_parser", "main", "add_model_options", "check_model_device", "load_forward", "start_model_threads",
           "true_class"]


def build_parser(prog: str = "predict.py") -> CommandLineParser:
    parser = CommandLineParser(prog=prog, description="Top-k classes of photos, with a model trained by tinynet.")
    add_model_options(parser)
    parser.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image; default 5")
    parser.add_argument("--csv", help="also write the predictions to this CSV file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass; default 64")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_model_options(parser) -> None:
    """``--weights`` or ``--onnx``, ``--device`` and ``--threads``: what runs the model, and where."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="best.safetensors or last.safetensors from a training run")
    source.add_argument("--onnx", help="a model exported with tinynet export (runs on onnxruntime)")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda; default cpu.  With --onnx, cuda is onnxruntime's CUDAExecutionProvider "
                             "(the onnxruntime-gpu package), and CuPy is not needed")
    add_threads_argument(parser)


def check_model_device(args) -> str:
    """``args.device`` normalised ("cpu" or "cuda") for the model source; a :class:`UsageError` if it cannot serve.

    ``--weights`` runs on tinynet's backend (:func:`tinynet.cli.check_device`:
    ``cuda`` needs CuPy and a GPU).  ``--onnx`` runs on onnxruntime, which
    does not use CuPy: ``cuda`` needs onnxruntime's ``CUDAExecutionProvider``.
    Without onnxruntime at all, the check is left to :func:`load_forward`,
    whose error says how to install it.
    """
    if args.onnx is None:
        return check_device(args.device)
    try:
        device = backend.normalize_device(args.device)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if device == "cuda":
        try:
            import onnxruntime
        except ImportError:
            return device
        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise UsageError(f"--device {args.device} with --onnx runs the graph on onnxruntime's "
                             f"CUDAExecutionProvider, which this onnxruntime ({onnxruntime.__version__}) does not "
                             f"have (it has {', '.join(providers)}); install the onnxruntime-gpu package in its "
                             f"place, or leave out --device to run on the CPU")
    return device


def start_model_threads(args, forward, log=lambda line: None):
    """Apply ``--threads`` where it has something to set: ``(forward, governor)``.

    For ``--weights``: the :class:`~tinynet.cores.ThreadGovernor` of
    :func:`tinynet.cli.start_threads` (which logs its choice), and ``forward``
    wrapped to call its ``tick`` after every batch, so that "auto" gives
    cores back to other programs during a long run, as in training.  For
    ``--onnx``: ``forward`` unchanged and None (a number reached onnxruntime's own pool in
    :func:`load_forward`).
    """
    if args.onnx is not None:
        return forward, None
    governor = start_threads(args.threads, log)

    def governed(x):
        out = forward(x)
        governor.tick()  # looks at the machine every RECHECK_SECONDS; otherwise a clock read
        return out
    return governed, governor


def load_forward(args, device: str):
    """``(forward, meta)`` for ``--weights`` or ``--onnx``; a :class:`UsageError` for a file that cannot serve.

    An ONNX graph given to ``--weights`` (the safetensors reader would call it
    damaged) is refused with the option that reads it.
    """
    if args.weights is not None and args.weights.lower().endswith(".onnx"):
        raise UsageError(f"--weights {args.weights!r} is an ONNX graph; run it with --onnx {args.weights}")
    try:
        if args.onnx:  # onnxruntime sizes its own pool: a number given to --threads is passed to it
            from ..cores import parse_threads

            threads = parse_threads(args.threads)  # already checked by check_threads
            return load_onnx(args.onnx, device, threads=None if threads == "auto" else threads)
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
        check_threads(args.threads)
        device = check_model_device(args)
        forward, meta = load_forward(args, device)
        forward, governor = start_model_threads(args, forward)  # the choice is told in the summary line
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
    threads = ""
    if governor is not None:
        threads = f"; {governor.reason}" + (f", then {governor.threads} after {governor.changes} change"
                                            f"{'s' if governor.changes != 1 else ''}" if governor.changes else "")
    print(f"{prog}: {done} image{'s' if done != 1 else ''} classified, {skipped} skipped{threads}", file=sys.stderr)
    if labelled:
        print(f"{prog}: accuracy {100 * correct / labelled:.1f} % ({correct} of {labelled} images in folders named "
              f"after a class; tinynet evaluate gives F1, the per-class table and the confusion matrix)",
              file=sys.stderr)
    return 0 if done else 1
