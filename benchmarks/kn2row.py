"""im2col (or Winograd) against kn2row, per layer shape: time, and kn2row's float32 error.

    python benchmarks/kn2row.py                          # every shape, batch 64, forward + backward
    python benchmarks/kn2row.py --forward --batch 16 256
    python benchmarks/kn2row.py --only 512@2 --rounds 15
    python benchmarks/kn2row.py --models --size 64 32      # ResNet18's step and eval, rule with/without kn2row

kn2row (:mod:`tinynet.nn.fast.kn2row`) computes one product per kernel offset over only the output
positions whose pixel lies inside the image; im2col's products also multiply the padding's zeros.
The share of im2col's products that read a pixel is the "live" column
(:func:`~tinynet.nn.fast.kn2row.valid_fraction`); the rule
(:func:`tinynet.nn.fast.conv.choose_algorithm`) takes kn2row where it is at most
:data:`~tinynet.nn.fast.conv.KN2ROW_MAX_FRACTION`.

Timing: one ``Conv2d`` (no bias), forward + backward (dx and dW), or the forward under ``no_grad``
(``--forward``), float32, input and upstream gradient laid out CHWN as the layers hand them on,
each algorithm forced with :func:`tinynet.nn.fast.conv.algorithm`, alternating within every round;
medians over the rounds, ms.  "other" is im2col, or F(2x2, 3x3) where the rule would take it.

Models (``--models``): ResNet18's training step and eval forward at each ``--size``, the default
rule against the rule without kn2row (:data:`~tinynet.nn.fast.conv.KN2ROW_MAX_FRACTION` set below
0), alternating within every round (a first, untimed step after each switch), medians.

Accuracy (``--accuracy``): ``max |y32 - y64| / max |y64|`` for the output, dx and dW of each
algorithm against a float64 im2col result, and PyTorch's float32 ``conv2d`` where torch imports.
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

from benchmarks.cases import chwn_copy, tinynet_eval_forward, tinynet_train_step  # noqa: E402
from benchmarks.run import blas_summary, cpu_name, isa, matmul_peak  # noqa: E402
from tinynet import nn  # noqa: E402
from tinynet.nn.fast import conv  # noqa: E402
from tinynet.nn.fast.kn2row import valid_fraction  # noqa: E402

# (label, C, C_out, H, kernel, stride, padding): the small maps of ResNet18 at 64 and 32 px, their
# neighbours (3x3 and 4x4 maps), and a few channel counts
SHAPES = [
    ("resnet18-64 512@2", 512, 512, 2, 3, 1, 1),
    ("resnet18-64 256@4->512@2 /2", 256, 512, 4, 3, 2, 1),
    ("resnet18-64 256@4", 256, 256, 4, 3, 1, 1),
    ("resnet18-64 128@8->256@4 /2", 128, 256, 8, 3, 2, 1),
    ("resnet18-32 256@2", 256, 256, 2, 3, 1, 1),
    ("resnet18-32 128@4->256@2 /2", 128, 256, 4, 3, 2, 1),
    ("resnet18-32 512@1", 512, 512, 1, 3, 1, 1),
    ("resnet18-32 256@2->512@1 /2", 256, 512, 2, 3, 2, 1),
    ("512@3", 512, 512, 3, 3, 1, 1),
    ("256@3", 256, 256, 3, 3, 1, 1),
    ("128@3", 128, 128, 3, 3, 1, 1),
    ("64@2", 64, 64, 2, 3, 1, 1),
    ("128@2", 128, 128, 2, 3, 1, 1),
    ("64@4", 64, 64, 4, 3, 1, 1),
    ("7x7/2 64@4", 64, 64, 4, 7, 2, 3),
    ("cnn 3->32@64 (no col)", 3, 32, 64, 3, 1, 1),
]


def _other(x, layer):
    """What the rule would run if kn2row did not exist: im2col, or Winograd where it would take it."""
    saved = conv.KN2ROW_MAX_FRACTION
    conv.KN2ROW_MAX_FRACTION = -1.0
    try:
        return conv.choose_algorithm(x, layer.weight.shape, layer.stride, layer.padding)
    finally:
        conv.KN2ROW_MAX_FRACTION = saved


def time_shape(c, c_out, h, k, s, p, n, rounds, repeat, forward_only):
    """Median ms per algorithm (``other``, ``kn2row``), alternating within every round."""
    rng = np.random.default_rng(0)
    layer = nn.Conv2d(c, c_out, k, stride=s, padding=p, bias=False, rng=rng)
    x = chwn_copy(rng.standard_normal((n, c, h, h), dtype=np.float32))
    out = layer(x)
    dy = chwn_copy(rng.standard_normal(out.shape, dtype=np.float32))
    layer.release_saved()
    names = (_other(x, layer), "kn2row")

    def step():
        if forward_only:
            with nn.no_grad():
                layer(x)
        else:
            layer(x)
            layer.backward(dy)

    times = {name: [] for name in names}
    for name in names:  # warm the buffers
        with conv.algorithm(name):
            step()
    for _ in range(rounds):
        for name in names:
            with conv.algorithm(name):
                t = time.perf_counter()
                for _ in range(repeat):
                    step()
                times[name].append((time.perf_counter() - t) / repeat * 1e3)
    layer.zero_grad()
    return names[0], {name: statistics.median(v) for name, v in times.items()}


def errors(c, c_out, h, k, s, p, n=4):
    """float32 error of im2col, kn2row and PyTorch against float64, for out, dx, dW."""
    from tinynet.nn.fast.conv import conv2d_backward, conv2d_forward

    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, h, h))
    w = rng.standard_normal((c_out, c, k, k)) * np.sqrt(2.0 / (c * k * k))
    ref_out, cache = conv2d_forward(x, w, None, (s, s), (p, p), algorithm="im2col")
    dy = rng.standard_normal(ref_out.shape)
    ref = (ref_out,) + conv2d_backward(dy, cache)[:2]
    f32 = [a.astype(np.float32) for a in (x, w, dy)]
    rows = {}
    for name in ("im2col", "kn2row"):
        out, cache = conv2d_forward(f32[0], f32[1], None, (s, s), (p, p), algorithm=name)
        got = (out,) + conv2d_backward(f32[2], cache)[:2]
        rows[name] = [float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref)]
    try:
        import torch
    except ImportError:
        return rows
    xt = torch.tensor(f32[0], requires_grad=True)
    wt = torch.tensor(f32[1], requires_grad=True)
    out = torch.nn.functional.conv2d(xt, wt, stride=s, padding=p)
    out.backward(torch.tensor(f32[2]))
    got = (out.detach().numpy(), xt.grad.numpy(), wt.grad.numpy())
    rows["pytorch"] = [float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref)]
    return rows


def time_models(sizes, batch, rounds, repeat):
    """ResNet18's step and eval forward with the default rule and with kn2row switched off."""
    default = conv.KN2ROW_MAX_FRACTION
    settings = [("without kn2row", -1.0), ("rule", default)]
    print(f"\nResNet18, batch {batch}, the rule without kn2row -> the rule, medians of {rounds} rounds of "
          f"{repeat}, ms")
    for size in sizes:
        for what, make in (("training step", tinynet_train_step), ("eval forward", tinynet_eval_forward)):
            step = make("resnet18", batch, size=size)("cpu")
            times = {name: [] for name, _ in settings}
            for name, value in settings:  # warm both
                conv.KN2ROW_MAX_FRACTION = value
                step()
            for _ in range(rounds):
                for name, value in settings:
                    conv.KN2ROW_MAX_FRACTION = value
                    step()  # untimed: a switch of algorithm reallocates the layers' kept buffers
                    t = time.perf_counter()
                    for _ in range(repeat):
                        step()
                    times[name].append((time.perf_counter() - t) / repeat * 1e3)
            conv.KN2ROW_MAX_FRACTION = default
            a, b = (statistics.median(times[name]) for name, _ in settings)
            print(f"  {size:4d} px {what:14s} {a:9.2f} -> {b:9.2f}  ({b / a:.3f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=3, help="calls per algorithm per round")
    parser.add_argument("--forward", action="store_true", help="the forward under no_grad only")
    parser.add_argument("--only", default=None, help="shapes whose label contains this")
    parser.add_argument("--accuracy", action="store_true", help="also the float32 errors")
    parser.add_argument("--models", action="store_true", help="ResNet18's step and eval forward instead of layers")
    parser.add_argument("--size", type=int, nargs="+", default=[64, 32], help="image sizes for --models")
    args = parser.parse_args(argv)
    env = {name: os.environ.get(name) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    print(f"CPU {cpu_name()}, ISA {isa()}, float32 matmul peak {matmul_peak('cpu'):.0f} GFLOP/s")
    print(f"  NumPy BLAS: {blas_summary()}; " + " ".join(f"{name}={value}" for name, value in env.items()))
    if args.models:
        time_models(args.size, args.batch[0], args.rounds, args.repeat)
        return
    what = "forward under no_grad" if args.forward else "forward + backward"
    print(f"\n{what}, medians of {args.rounds} rounds of {args.repeat} calls, ms")
    print(f"{'layer':32s}{'batch':>6s}{'live':>7s}{'other':>14s}{'ms':>9s}{'kn2row':>9s}{'ratio':>8s}  rule")
    shapes = [s for s in SHAPES if args.only is None or args.only in s[0]]
    for label, c, c_out, h, k, s, p in shapes:
        for n in args.batch:
            other, t = time_shape(c, c_out, h, k, s, p, n, args.rounds, args.repeat, args.forward)
            live = valid_fraction((n, c, h, h), (k, k), (s, s), (p, p))
            rule = conv.choose_algorithm(np.empty((n, c, h, h), np.float32), (c_out, c, k, k), (s, s), (p, p))
            print(f"{label:32s}{n:6d}{live:7.2f}{other:>14s}{t[other]:9.2f}{t['kn2row']:9.2f}"
                  f"{t['kn2row'] / t[other]:8.2f}  {rule}")
    if args.accuracy:
        print("\nfloat32 error against float64, batch 4: out / dx / dW")
        for label, c, c_out, h, k, s, p in shapes:
            rows = errors(c, c_out, h, k, s, p)
            print(f"{label:32s}" + "   ".join(f"{name} " + " / ".join(f"{e:.1e}" for e in v)
                                             for name, v in rows.items()))


if __name__ == "__main__":
    main()
