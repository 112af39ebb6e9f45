"""im2col + GEMM vs Winograd F(2x2,3x3) and F(4x4,3x3): time and float32 error, per layer shape.

    python benchmarks/winograd.py                    # every shape, batch 16 and 64
    python benchmarks/winograd.py --batch 64 --only 64@16 --rounds 9
    python benchmarks/winograd.py --no-accuracy

Timing: a ``Conv2d`` (no bias) run forward + backward (dx, dW; no dx for the
3-channel first layer, whose input needs no gradient, as in a model) under
:func:`tinynet.nn.fast.conv.algorithm`, float32, input and upstream gradient laid
out CHWN as the layers hand them on (the 3-channel images NCHW).  The
algorithms alternate within every round, so that the load of the shared
machine touches each alike; the table gives medians over the rounds in ms,
and the speed-up of the best Winograd over im2col.

Accuracy: on ResNet18's stride-1 3x3 layers (batch 4), the float32 error of
each algorithm, and of PyTorch's float32 ``conv2d`` when torch imports,
against a float64 result: ``max |y32 - y64| / max |y64|`` for the output, dx
and dW, with He-initialised weights and unit-normal input and gradient.

These numbers set :func:`tinynet.nn.fast.conv.choose_algorithm`'s rule.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.cases import chwn_copy  # noqa: E402
from tinynet import nn  # noqa: E402
from tinynet.nn.fast import conv  # noqa: E402  (the fast convolution: its algorithms)

# (label, C, C_out, H): the stride-1 3x3 convolutions of ResNet18 (64 px and 224 px input) and the CNN
SHAPES = [
    ("resnet18-64 64@16", 64, 64, 16),
    ("resnet18-64 128@8", 128, 128, 8),
    ("resnet18-64 256@4", 256, 256, 4),
    ("resnet18-64 512@2", 512, 512, 2),
    ("resnet18-224 64@56", 64, 64, 56),
    ("resnet18-224 128@28", 128, 128, 28),
    ("resnet18-224 256@14", 256, 256, 14),
    ("resnet18-224 512@7", 512, 512, 7),
    ("cnn 3->32@64", 3, 32, 64),
    ("cnn 32->64@16", 32, 64, 16),
    ("cnn 64->128@8", 64, 128, 8),
]


def time_shape(c, c_out, h, n, rounds, algorithms, forward_only=False):
    """Median ms of forward + backward (or the forward under ``no_grad``) per algorithm, alternating."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    x = x if c == 3 else chwn_copy(x)
    dout = chwn_copy(rng.standard_normal((n, c_out, h, h)).astype(np.float32))
    layer = nn.Conv2d(c, c_out, 3, padding=1, bias=False, rng=rng)
    layer.set_input_grad(c != 3)

    def step():
        if forward_only:
            with nn.no_grad():
                layer(x)
            return
        layer(x)
        layer.backward(dout)
        layer.weight.grad = None

    times = {a: [] for a in algorithms}
    for name in algorithms:  # warm-up: buffers allocated, pages touched
        with conv.algorithm(name):
            step()
    for _ in range(rounds):
        for name in algorithms:
            with conv.algorithm(name):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return {a: 1e3 * statistics.median(v) for a, v in times.items()}


def _rel(a, ref):
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def accuracy(c, h, n=4, seed=0):
    """{algorithm: (out, dx, dW) float32 errors relative to the output scale}, torch's included if it imports."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, h))
    w = rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (9 * c))
    dout = rng.standard_normal((n, c, h, h))
    ref, cache = conv.conv2d_forward(x, w, None, (1, 1), (1, 1), algorithm="im2col")
    rdx, rdw, _ = conv.conv2d_backward(dout, cache)
    x32, w32, d32 = (a.astype(np.float32) for a in (x, w, dout))
    errors = {}
    for name in conv.ALGORITHMS:
        out, cache = conv.conv2d_forward(x32, w32, None, (1, 1), (1, 1), algorithm=name)
        dx, dw, _ = conv.conv2d_backward(d32, cache)
        errors[name] = (_rel(out, ref), _rel(dx, rdx), _rel(dw, rdw))
    try:
        import torch
    except ImportError:
        return errors
    tx, tw = torch.tensor(x32, requires_grad=True), torch.tensor(w32, requires_grad=True)
    out = torch.nn.functional.conv2d(tx, tw, padding=1)
    out.backward(torch.tensor(d32))
    errors["torch"] = (_rel(out.detach().numpy(), ref), _rel(tx.grad.numpy(), rdx), _rel(tw.grad.numpy(), rdw))
    return errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", default=None, help="substring of the shape labels to run")
    p.add_argument("--algorithms", nargs="+", default=list(conv.ALGORITHMS))
    p.add_argument("--forward", action="store_true", help="time the forward alone, under no_grad (inference)")
    p.add_argument("--no-accuracy", action="store_true")
    args = p.parse_args(argv)
    shapes = [s for s in SHAPES if args.only is None or args.only in s[0]]

    what = "forward (no_grad)" if args.forward else "forward + backward"
    print(f"{what}, float32, median of {args.rounds} alternating rounds, ms")
    head = f"{'layer':24} {'N':>4} " + " ".join(f"{a:>12}" for a in args.algorithms) + "   best/im2col"
    print(head)
    for n in args.batch:
        for label, c, c_out, h in shapes:
            ms = time_shape(c, c_out, h, n, args.rounds, args.algorithms, args.forward)
            best = min((a for a in ms if a != "im2col"), key=ms.get, default=None)
            gain = f"   {best} {ms['im2col'] / ms[best]:.2f}x" if best and "im2col" in ms else ""
            print(f"{label:24} {n:>4} " + " ".join(f"{ms[a]:12.2f}" for a in args.algorithms) + gain, flush=True)
    if args.no_accuracy:
        return
    print("\nfloat32 error vs float64, max|y32 - y64| / max|y64|, batch 4: out / dx / dW")
    for label, c, c_out, h in SHAPES:
        if not label.startswith("resnet18-224"):
            continue
        errors = accuracy(c, h)
        cells = [f"{k} {e[0]:.1e}/{e[1]:.1e}/{e[2]:.1e}" for k, e in errors.items()]
        print(f"{label:24} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
