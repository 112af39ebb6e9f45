"""Pretrain ResNet18 on Tiny-ImageNet-188 with tinynet, to fine-tune it afterwards like ImageNet weights.

    python examples/pretrain_resnet.py --time-budget 60             # the CPU run: as many epochs as fit an hour
    python examples/pretrain_resnet.py --device cuda --epochs 30 --size 64
    python examples/pretrain_resnet.py --resume                     # continue it, with the options it began with

The same program as ``tinynet pretrain``: the recipe, and why, are in tinynet/commands/pretrain.py.
"""
import sys
import time  # noqa: F401 (the tests replace time.perf_counter through this module)

from tinynet.commands import pretrain
from tinynet.commands.pretrain import (DeadlineCosine, UsageError, build_parser, check_args,  # noqa: F401
                                       measure_speed, plan_epochs, recipe)
from tinynet.train import fit


def main(argv=None) -> int:
    # This module's fit and measure_speed, looked up when called: the tests replace them here.
    return pretrain.main(argv, fit=lambda *a, **k: fit(*a, **k), measure_speed=lambda *a, **k: measure_speed(*a, **k))


if __name__ == "__main__":
    sys.exit(main())
