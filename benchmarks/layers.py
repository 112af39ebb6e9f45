"""Where a training step's time goes: ms and GFLOP/s per layer, inside the real model.

    python benchmarks/layers.py                        # ResNet18 and the CNN, batch 64, 64x64
    python benchmarks/layers.py --model resnet18 --batch 16 --size 128 --eval

Every leaf layer's ``forward`` and ``backward`` (and the loss, ``zero_grad``
and the optimizer step) is wrapped by a timer for the duration of the run;
the times are medians over ``--repeat`` steps after ``--warmup``.  Layers of
the same kind and shape are grouped (ResNet18's four 64->64 3x3 convolutions
are one row, "x4").  "other" is the step's time not spent inside a timed
leaf: the residual sums and Python's own overhead.

GFLOP/s counts *direct* convolution FLOPs (2 * N*OH*OW*C_out*C*KH*KW per
forward, the same again for dL/dW and for dL/dx when computed), whatever the
algorithm, so a layer that computes fewer multiplications (Winograd) can
exceed 100 % of the measured matrix-product peak.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import tinynet  # noqa: E402
from benchmarks.cases import _tn_model  # noqa: E402
from benchmarks.run import blas_info, cpu_name, isa, matmul_peak  # noqa: E402
from tinynet import backend, nn  # noqa: E402


def _flops(layer, x_shape) -> float:
    """Direct forward FLOPs of a Conv2d or Linear for an input of ``x_shape`` (0 for other layers)."""
    if isinstance(layer, nn.Conv2d):
        n, c, h, w = x_shape
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return 2.0 * n * oh * ow * layer.out_channels * (c // layer.groups) * kh * kw
    if isinstance(layer, nn.Linear):
        return 2.0 * int(np.prod(x_shape[:-1])) * layer.in_features * layer.out_features
    return 0.0


def _label(layer, x_shape) -> str:
    return f"{layer.__class__.__name__}({layer.extra_repr()}) @{'x'.join(map(str, x_shape[1:]))}"


class Timers:
    """Per-leaf forward/backward timers, installed as instance attributes and removed by :meth:`remove`."""

    def __init__(self, model):
        self.model = model
        self.current = collections.defaultdict(float)  # (name, phase) -> seconds in this step
        self.steps = collections.defaultdict(list)  # (name, phase) -> seconds per step
        self.info = {}  # name -> (label, flops, needs dx)
        self.wrapped = []
        for name, m in model.named_modules():
            if name and not any(True for _ in m.children()):
                self._wrap(name, m)

    def _wrap(self, name, m):
        forward, backward = m.forward, m.backward

        def timed_forward(x, *args, **kwargs):
            if name not in self.info:
                self.info[name] = (_label(m, x.shape), _flops(m, x.shape), bool(getattr(m, "input_grad", True)))
            start = time.perf_counter()
            out = forward(x, *args, **kwargs)
            self.current[(name, "forward")] += time.perf_counter() - start
            return out

        def timed_backward(dout):
            start = time.perf_counter()
            dx = backward(dout)
            self.current[(name, "backward")] += time.perf_counter() - start
            return dx

        object.__setattr__(m, "forward", timed_forward)
        object.__setattr__(m, "backward", timed_backward)
        self.wrapped.append(m)

    def end_step(self):
        for key, seconds in self.current.items():
            self.steps[key].append(seconds)
        self.current.clear()

    def remove(self):
        for m in self.wrapped:
            del m.__dict__["forward"], m.__dict__["backward"]


def profile(model_name: str, batch: int, size: int, train: bool, warmup: int, repeat: int, peak: float):
    tinynet.manual_seed(0)
    model = _tn_model(model_name, 10, size)
    model.set_input_grad(False)
    if not train:
        model.eval()
    opt = tinynet.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    timers = Timers(model)
    totals, extra = [], collections.defaultdict(list)

    def timed(key, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        extra[key].append(time.perf_counter() - start)
        return out

    for i in range(warmup + repeat):
        start = time.perf_counter()
        if train:
            timed("zero_grad", opt.zero_grad)
            logits = model(x)
            timed("loss forward", loss_fn, logits, y)
            model.backward(timed("loss backward", loss_fn.backward))
            timed("optimizer step", opt.step)
        else:
            with tinynet.no_grad():
                model(x)
        totals.append(time.perf_counter() - start)
        timers.end_step()
        if i < warmup:
            totals.clear(), extra.clear(), timers.steps.clear()
    timers.remove()

    # Group identical layers: same label and same dx need.
    groups = collections.OrderedDict()
    for name, (label, flops, needs_dx) in timers.info.items():
        g = groups.setdefault((label, needs_dx), {"count": 0, "forward": 0.0, "backward": 0.0, "flops": 0.0})
        g["count"] += 1
        fwd = statistics.median(timers.steps[(name, "forward")])
        bwd = statistics.median(timers.steps[(name, "backward")]) if train else 0.0
        g["forward"] += fwd
        g["backward"] += bwd
        g["flops_fwd"] = g.get("flops_fwd", 0.0) + flops
        g["flops_bwd"] = g.get("flops_bwd", 0.0) + (flops * (2 if needs_dx else 1) if train else 0.0)
    total = statistics.median(totals)
    print(f"\n{model_name} {'training step' if train else 'eval forward'}, batch {batch}, {size}x{size}: "
          f"{1000 * total:.1f} ms (median of {repeat})")
    print(f"{'layer':<64}{'n':>3}{'fwd ms':>9}{'bwd ms':>9}{'fwd GF/s':>10}{'bwd GF/s':>10}{'% step':>8}")
    accounted = 0.0
    for (label, needs_dx), g in groups.items():
        ms_f, ms_b = 1000 * g["forward"], 1000 * g["backward"]
        accounted += g["forward"] + g["backward"]

        def rate(flops, seconds):
            return f"{flops / seconds / 1e9:10.0f}" if flops and seconds else f"{'':>10}"

        name = label if len(label) <= 62 else label[:59] + "..."
        print(f"{name:<64}{g['count']:>3}{ms_f:9.2f}{ms_b:9.2f}{rate(g['flops_fwd'], g['forward'])}"
              f"{rate(g['flops_bwd'], g['backward'])}{100 * (g['forward'] + g['backward']) / total:8.1f}")
    for key, values in extra.items():
        seconds = statistics.median(values)
        accounted += seconds
        print(f"{key:<64}{'':>3}{1000 * seconds:9.2f}{'':>9}{'':>10}{'':>10}{100 * seconds / total:8.1f}")
    print(f"{'other (residual sums, Python)':<64}{'':>3}{1000 * (total - accounted):9.2f}{'':>9}{'':>10}{'':>10}"
          f"{100 * (total - accounted) / total:8.1f}")
    conv_flops = sum(g["flops_fwd"] + g["flops_bwd"] for g in groups.values())
    print(f"direct-conv/linear GFLOP {conv_flops / 1e9:.1f}: {conv_flops / total / 1e9:.0f} GFLOP/s over the step, "
          f"{100 * conv_flops / total / 1e9 / peak:.0f} % of the {peak:.0f} GFLOP/s matmul peak")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet18", "cnn", "user cnn", "both"), default="both")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--eval", action="store_true", help="time the eval forward instead of a training step")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    backend.keep_freed_host_memory()
    peak = matmul_peak("cpu")
    print(f"CPU {cpu_name()}, ISA {isa()}, float32 matmul peak {peak:.0f} GFLOP/s")
    for info in blas_info():
        print(f"  NumPy BLAS: {info['internal_api']} {info['version']}, kernel {info['architecture']}, "
              f"{info['num_threads']} threads")
    for name in (("resnet18", "cnn") if args.model == "both" else (args.model,)):
        profile(name, args.batch, args.size, not args.eval, args.warmup, args.repeat, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
