"""im2col without gradients: the whole ``col`` then one product, against chunks of output rows.

    python benchmarks/conv_chunks.py                       # layers and eval forwards, batch 64
    python benchmarks/conv_chunks.py --rounds 9 --chunk-mb 2 4 8 --no-models

Without gradients, :func:`tinynet.nn.fast.conv.layer_forward` runs an im2col convolution whose
columns reach :data:`~tinynet.nn.fast.conv.CHUNKED_MIN_COL_BYTES` as
:func:`~tinynet.nn.fast.conv.forward_in_chunks`: each thread fills one chunk of output rows'
columns and multiplies it while it is in its core's cache.  This script times one ``Conv2d``
under ``no_grad`` (float32, input laid out as the layers hand it on: the 3-channel images NCHW,
the rest CHWN) with the whole product ("whole", the threshold set out of reach) and in chunks of
``--chunk-mb`` MB (the size threshold set to 0: every shape whose output row is a product of at
least ``SPLIT_MIN_MACS`` multiply-adds runs in chunks; the CNN's first conv is not one), alternating within
every round, and then the eval forwards of the models the same way.  Medians over the rounds, ms.
Each row says whether the chunked output had the bits of the whole one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.cases import tinynet_eval_forward  # noqa: E402
from benchmarks.run import blas_summary, cpu_name, isa, matmul_peak  # noqa: E402
from tinynet import nn  # noqa: E402
from tinynet.nn.fast import conv  # noqa: E402

# (label, C, C_out, H, kernel, stride, padding): the im2col convolutions of ResNet18 and the CNNs
SHAPES = [
    ("resnet18 stem 7x7/2", 3, 64, 64, 7, 2, 3),
    ("resnet18 64->128 3x3/2", 64, 128, 16, 3, 2, 1),
    ("resnet18 128->256 3x3/2", 128, 256, 8, 3, 2, 1),
    ("cnn 3->32 @64", 3, 32, 64, 3, 1, 1),
    ("cnn 32->64 @16", 32, 64, 16, 3, 1, 1),
    ("cnn 64->128 @8", 64, 128, 8, 3, 1, 1),
    ("resnet18-224 stem 7x7/2 (batch 16)", 3, 64, 224, 7, 2, 3),
]


def _timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _setting(threshold, chunk_bytes):
    conv.CHUNKED_MIN_COL_BYTES, conv.CHUNK_BYTES = threshold, chunk_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=5, help="calls per setting per round")
    parser.add_argument("--chunk-mb", type=float, nargs="+", default=[4.0])
    parser.add_argument("--no-models", action="store_true", help="skip the models' eval forwards")
    args = parser.parse_args(argv)
    env = {name: os.environ.get(name) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    print(f"CPU {cpu_name()}, ISA {isa()}, float32 matmul peak {matmul_peak('cpu'):.0f} GFLOP/s")
    print(f"  NumPy BLAS: {blas_summary()}; " + " ".join(f"{name}={value}" for name, value in env.items()))
    default = (conv.CHUNKED_MIN_COL_BYTES, conv.CHUNK_BYTES)
    settings = [("whole", (1 << 62, default[1]))] + [
        (f"chunks {mb:g} MB", (0, int(mb * (1 << 20)))) for mb in args.chunk_mb]
    rng = np.random.default_rng(0)
    print(f"\nOne Conv2d under no_grad, batch {args.batch} (16 for the 224 px stem), "
          f"medians of {args.rounds} rounds, ms")
    print(f"{'layer':38s}" + "".join(f"{name:>16s}" for name, _ in settings) + "   bits")
    for label, c, c_out, h, k, s, p in SHAPES:
        n = 16 if "224" in label else args.batch
        layer = nn.Conv2d(c, c_out, k, stride=s, padding=p, bias=False, rng=rng)
        x = rng.standard_normal((n, c, h, h), dtype=np.float32)
        if c > 3:
            x = np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)  # CHWN, as layers hand it on
        outputs, times = {}, {name: [] for name, _ in settings}
        with nn.no_grad():
            for name, value in settings:
                _setting(*value)
                outputs[name] = np.array(layer(x))
            for _ in range(args.rounds):
                for name, value in settings:
                    _setting(*value)
                    times[name].append(_timed(lambda: layer(x), args.repeat))
        _setting(*default)
        same = all(np.array_equal(outputs["whole"], o) for o in outputs.values())
        print(f"{label:38s}" + "".join(f"{statistics.median(times[name]):16.2f}" for name, _ in settings)
              + ("   same" if same else "   DIFFER"))
    if args.no_models:
        return
    model_settings = [("whole", (1 << 62, default[1])), ("default rule", default)]
    print(f"\nEval forward, batch {args.batch}, 64 px: the whole product everywhere, and the default rule "
          f"(chunks where col >= {default[0] >> 20} MB), medians of {args.rounds} rounds, ms")
    for model in ("resnet18", "cnn", "user cnn"):
        step = tinynet_eval_forward(model, args.batch)("cpu")
        times = {name: [] for name, _ in model_settings}
        for _ in range(2):
            step()
        for _ in range(args.rounds):
            for name, value in model_settings:
                _setting(*value)
                times[name].append(_timed(step, args.repeat))
        _setting(*default)
        print(f"{model:38s}"
              + "".join(f"{name}: {statistics.median(times[name]):8.2f}   " for name, _ in model_settings))


if __name__ == "__main__":
    main()
