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

import argparse
import os
import pathlib
import sys

from .. import onnx
from ..onnx import OPSET, ExportError, OnnxUnavailable
from ..predict import ModelFileError, load_model

__all__ = ["check_out", "main"]


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


def main(argv=None, prog: str = "export_onnx.py", load=None) -> int:
    """``load``: what reads the weights (default :func:`tinynet.predict.load_model`; tests replace it)."""
    load = load or load_model
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="best.safetensors or last.safetensors of a training run")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    args = parser.parse_args(argv)
    if args.weights.lower().endswith(".onnx"):
        print(f"{parser.prog}: error: --weights {args.weights!r} is an ONNX graph already; export reads the "
              f"best.safetensors or last.safetensors of a training run", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    problem = check_out(out)
    if problem:
        print(f"{parser.prog}: error: --out {args.out!r} {problem}", file=sys.stderr)
        return 2
    # The graph goes to a temporary file beside --out, renamed over it once complete: a failed export
    # leaves an earlier file as it was.  Created first, so that a folder refusing writes is found now.
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as error:
        print(f"{parser.prog}: error: --out {args.out!r} cannot be written: {error.strerror or error}",
              file=sys.stderr)
        return 2
    try:
        model, meta = load(args.weights)
        size = meta["image_size"]
        onnx.export(model, partial, (1, 3, size, size), metadata=meta)  # looked up now: tests replace it
        os.replace(partial, out)
    except (ModelFileError, ExportError, OnnxUnavailable, ImportError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{parser.prog}: error: --out {args.out!r} cannot be written: {error.strerror or error}",
              file=sys.stderr)
        return 2
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {args.out}: {meta['model']}, {len(meta['classes'])} classes, input (N, 3, {size}, {size}), "
          f"opset {OPSET}")
    return 0
