"""The ``tinynet`` command: one program for every job, as ``yolo`` or Lightning's CLI are.

    tinynet train --model resnet --data Cropped_final      # or --model cnn; as examples/train_*.py
    tinynet pretrain --time-budget 60                      # as examples/pretrain_resnet.py
    tinynet predict --weights runs/resnet/best.safetensors photo.jpg folder/
    tinynet evaluate --weights runs/resnet/best.safetensors labelled_folder/
    tinynet export --weights runs/resnet/best.safetensors --out model.onnx

Installed as a console script by ``pip install -e .`` (setup.cfg's
``[options.entry_points]``) and runnable as ``python -m tinynet``.  Each
subcommand is a module here with a ``main(argv, prog)``; the example scripts
call the same functions, so a script and its subcommand take the same options
and behave alike.  Errors a user can cause end with one line on stderr and
exit status 2.
"""
from __future__ import annotations

import importlib
import sys

__all__ = ["main", "SUBCOMMANDS"]

#: subcommand -> (module in tinynet.commands, what it does)
SUBCOMMANDS = {
    "train": ("train", "train the assignment's CNN or ResNet18 on a folder of photos (--model cnn|resnet)"),
    "pretrain": ("pretrain", "pretrain ResNet18 on Tiny-ImageNet-188, for train --pretrained"),
    "predict": ("predict", "top-k classes of photos, with trained weights or an exported .onnx"),
    "evaluate": ("evaluate", "accuracy, F1, per-class table, confusion matrix and report of weights on a "
                             "labelled folder"),
    "export": ("export", "export trained weights to ONNX"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: tinynet COMMAND [options]   (tinynet COMMAND --help lists a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``tinynet COMMAND ...``: runs the subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from tinynet import __version__
        print(f"tinynet {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"tinynet: error: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)} (see --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{SUBCOMMANDS[name][0]}")
    return module.main(rest, prog=f"tinynet {name}")
