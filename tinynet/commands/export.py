"""``tinynet export`` (and ``examples/export_onnx.py``): weights of a training run to ONNX.

    tinynet export --weights runs/resnet/best.safetensors --out model.onnx

The graph (opset 17, standard operators only: see tinynet/onnx.py) takes a
float32 batch ``input`` of shape (N, 3, size, size), normalised as in
training, and returns ``logits`` (N, classes).  The class names, image size
and normalisation are copied into the ONNX file's metadata, so that
``tinynet predict --onnx model.onnx photo.jpg`` needs nothing else.
Needs the optional extra: ``pip install -e ".[onnx]"`` (from the checkout).
"""
from __future__ import annotations

import os
import pathlib

from .. import onnx
from ..cli import CommandLineParser, UsageError, run_command
from ..onnx import OPSET, ExportError, OnnxUnavailable
from ..predict import ModelFileError, load_model

__all__ = ["build_parser", "check_out", "export", "main"]


def build_parser(prog: str = "export_onnx.py") -> CommandLineParser:
    parser = CommandLineParser(prog=prog, description="Export the weights of a training run to an ONNX graph "
                                                      "(opset %d), with its class names, image size and "
                                                      "normalisation, for onnxruntime or tinynet predict --onnx. "
                                                      "Needs the extra: pip install -e \".[onnx]\"" % OPSET)
    parser.add_argument("--weights", required=True, help="best.safetensors or last.safetensors of a training run")
    parser.add_argument("--out", required=True, help="the .onnx file to write (replaced only once complete)")
    return parser


def check_out(out: pathlib.Path) -> str | None:
    """Why ``out`` cannot become the exported file (None if it can), found before any work is done."""
    if out.is_dir():
        return "is a folder; name the .onnx file to write"
    if out.exists() and not out.is_file():
        return "is not a regular file"
    parent = out.parent
    if not parent.exists():
        return f"its folder {str(parent)!r} does not exist"
    if not parent.is_dir():
        return f"its folder {str(parent)!r} is not a folder"
    return None


def export(args, load=load_model, log=print) -> None:
    """Export as ``args`` say (``--weights``, ``--out``); a :class:`UsageError` for anything the user can mend."""
    if args.weights.lower().endswith(".onnx"):
        raise UsageError(f"--weights {args.weights!r} is an ONNX graph already; export reads the "
                         f"best.safetensors or last.safetensors of a training run")
    out = pathlib.Path(args.out)
    problem = check_out(out)
    if problem:
        raise UsageError(f"--out {args.out!r} {problem}")
    # The graph goes to a temporary file beside --out, renamed over it once complete: a failed export
    # leaves an earlier file as it was.  Created first, so that a folder refusing writes is found now.
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as error:
        raise UsageError(f"--out {args.out!r} cannot be written: {error.strerror or error}") from None
    try:
        model, meta = load(args.weights)
        size = meta["image_size"]
        onnx.export(model, partial, (1, 3, size, size), metadata=meta)  # looked up now: tests replace it
        os.replace(partial, out)
    except (ModelFileError, ExportError, OnnxUnavailable, ImportError) as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"--out {args.out!r} cannot be written: {error.strerror or error}") from None
    finally:
        partial.unlink(missing_ok=True)
    log(f"wrote {args.out}: {meta['model']}, {len(meta['classes'])} classes, input (N, 3, {size}, {size}), "
        f"opset {OPSET}")


def main(argv=None, prog: str = "export_onnx.py", load=None) -> int:
    """``load``: what reads the weights (default :func:`tinynet.predict.load_model`; tests replace it).

    Errors are those of every tinynet command (:func:`tinynet.cli.run_command`): one line on stderr, exit
    status 2 for a bad option, path or file.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: export(args, load or load_model))
