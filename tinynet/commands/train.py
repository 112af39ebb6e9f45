"""``tinynet train --model cnn|resnet``: the assignment's experiment (:mod:`tinynet.experiment`).

The options are those of ``examples/train_cnn.py`` and ``examples/train_resnet.py``;
``--model`` (default resnet) chooses which, and with it the model's own options
(``--pretrained`` and ``--no-tsne`` for ResNet18, ``--softmax-before-loss`` for the CNN).
"""
from __future__ import annotations

import argparse

from .. import backend, experiment

MODELS = ("cnn", "resnet")


class _Chooser(argparse.ArgumentParser):
    """Finds --model before the model's own parser is built; leaves every error to that parser."""

    def error(self, message):
        raise ValueError(message)


def main(argv=None, prog: str = "tinynet train") -> int:
    chooser = _Chooser(add_help=False)
    chooser.add_argument("--model", default="resnet")
    try:
        model = chooser.parse_known_args(argv)[0].model
    except ValueError:  # "--model" without a value: the full parser below says so in one line
        model = "resnet"
    model = model if model in MODELS else "resnet"  # any other value: refused by the full parser, in one line
    backend.keep_freed_host_memory()  # glibc keeps freed arrays for reuse: ~10 % of a step (see its docstring)
    return experiment.main(model, argv, prog=prog, choose_model=True)
