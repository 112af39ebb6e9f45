"""The benchmark cases, each defined once for tinynet and once for PyTorch.

A case builds, for one framework and device, a zero-argument function that runs
one iteration (a training step, an evaluation forward, or one layer's forward
plus backward), and says how many images and multiply-adds that iteration
processes.  :mod:`benchmarks.run` times them.

Multiply-adds (MACs) are counted for convolutions and linear layers, the only
work that is a matrix product:

* forward: ``N * OH * OW * C_out * C * KH * KW`` per convolution, ``N * F_in * F_out`` per linear layer;
* backward: the same count again for dL/dW, and again for dL/dx unless the layer is the first
  (the images need no gradient).

GFLOP/s = 2 * MACs / seconds.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import numpy as np

import tinynet
from tinynet import backend, nn
from tinynet.models import resnet18, simple_cnn
from tinynet.nn.layout import from_chwn

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Case:
    name: str
    kind: str  # "model" or "layer"
    images: int  # images processed per iteration
    macs: int  # multiply-adds per iteration
    tinynet: Callable  # (device) -> step function
    torch: Callable  # (device) -> step function


# ---------------------------------------------------------------------------
# MAC counting
# ---------------------------------------------------------------------------
def conv_macs(n, c, h, w, c_out, k, s, p):
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return n * oh * ow * c_out * c * k * k


def model_macs(model, x_shape, training: bool) -> int:
    """Forward MACs of every Conv2d/Linear of a tinynet model (run once on zeros), x3 for training minus the first dx."""
    counts = []

    def record(layer, x):
        if isinstance(layer, nn.Conv2d):
            n, c, h, w = x.shape
            kh, kw = layer.kernel_size
            (sh, sw), (ph, pw) = layer.stride, layer.padding
            oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            counts.append(n * oh * ow * layer.out_channels * c * kh * kw)
        else:
            counts.append(int(np.prod(x.shape[:-1])) * layer.in_features * layer.out_features)

    originals = {}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            originals[m] = m.forward

            def wrapped(x, m=m):
                record(m, x)
                return originals[m](x)

            object.__setattr__(m, "forward", wrapped)
    with tinynet.no_grad():
        model(np.zeros(x_shape, np.float32))
    for m in originals:
        del m.__dict__["forward"]
    forward = sum(counts)
    return 3 * forward - counts[0] if training else forward


# ---------------------------------------------------------------------------
# tinynet
# ---------------------------------------------------------------------------
def user_cnn(classes, size=64):
    """The assignment's CNN as a user writes it: a plain Sequential, conv -> ReLU -> max pool (issue 23)."""
    side = size // 16
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(128 * side * side, classes))


def _tn_model(name, classes, size=64):
    models = {"cnn": lambda: simple_cnn(classes, image_size=size), "user cnn": lambda: user_cnn(classes, size),
              "resnet18": lambda: resnet18(classes)}
    if name not in models:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(models)}")
    return models[name]()


def tinynet_train_step(name, batch, size=64, classes=10):
    def build(device):
        tinynet.manual_seed(0)
        model = _tn_model(name, classes, size).to(device)
        model.set_input_grad(False)
        opt = tinynet.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        rng = np.random.default_rng(0)
        x = backend.to_device(rng.standard_normal((batch, 3, size, size), dtype=np.float32), device)
        y = backend.to_device(rng.integers(0, classes, batch), device)

        def step():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            model.backward(loss_fn.backward())
            opt.step()
            return loss

        return step

    return build


def tinynet_eval_forward(name, batch, size=64, classes=10):
    def build(device):
        tinynet.manual_seed(0)
        model = _tn_model(name, classes, size).to(device).eval()
        x = backend.to_device(np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32), device)

        def step():
            with tinynet.no_grad():
                return model(x)

        return step

    return build


def _random(rng, shape, chwn):
    """Standard-normal float32 array of logical shape ``shape``, CHWN in memory when ``chwn`` (4-D only)."""
    if chwn and len(shape) == 4:
        n, c, h, w = shape
        return from_chwn(rng.standard_normal((c, h, w, n), dtype=np.float32))
    return rng.standard_normal(shape, dtype=np.float32)


def chwn_copy(a):
    """A copy of ``a`` (N, C, H, W) laid out CHWN in memory, as layers hand activations on."""
    return np.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


def to_device_keeping_layout(a, device):
    """``a`` on ``device`` with its memory order kept: the buffer moves, and the view is made there.

    ``cupy.asarray`` (like ``numpy.ascontiguousarray``) copies a non-contiguous view, such as
    the NCHW view of a CHWN buffer, into a plain C-contiguous (NCHW) array; a layer case timed
    on that would time layout copies the network never does.  So the axes are first permuted
    to memory order (outermost stride first: a C-contiguous array, no copy for a permuted
    view of a whole buffer), that array moves, and the inverse permutation rebuilds the view.
    """
    order = tuple(int(k) for k in np.argsort([-s for s in a.strides], kind="stable"))
    buffer = a.transpose(order)
    moved = backend.to_device(np.ascontiguousarray(buffer), device)
    return moved.transpose(tuple(int(k) for k in np.argsort(order)))


def tinynet_layer(make_layer, x_shape, chwn=True):
    """One layer's forward + backward.  Inside a network every layer receives CHWN arrays
    (tinynet.nn.layout), so the inputs and upstream gradients here are laid out the same way,
    except for the stem, which receives the images (NCHW)."""
    def build(device):
        tinynet.manual_seed(0)
        layer = make_layer().to(device)
        rng = np.random.default_rng(0)
        x = to_device_keeping_layout(_random(rng, x_shape, chwn), device)
        g = to_device_keeping_layout(_random(rng, layer(x).shape, True), device)
        layer.backward(g)

        def step():
            layer(x)
            return layer.backward(g)

        return step

    return build


# ---------------------------------------------------------------------------
# PyTorch (imported lazily: it is optional)
# ---------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def _torch_model(name, classes, size=64):
    sys.path.insert(0, str(ROOT / "tests"))
    from tests_torch_models import torch_cnn, torch_resnet18

    if name not in ("cnn", "user cnn", "resnet18"):
        raise ValueError(f"unknown model {name!r}")
    return torch_cnn(classes, size) if name in ("cnn", "user cnn") else torch_resnet18(classes)


def torch_train_step(name, batch, size=64, classes=10):
    def build(device):
        torch = _torch()
        torch.manual_seed(0)
        model = _torch_model(name, classes, size).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, classes, (batch,), device=device)

        def step():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return step

    return build


def torch_eval_forward(name, batch, size=64, classes=10):
    def build(device):
        torch = _torch()
        torch.manual_seed(0)
        model = _torch_model(name, classes, size).to(device).eval()
        x = torch.randn(batch, 3, size, size, device=device)

        def step():
            with torch.no_grad():
                return model(x)

        return step

    return build


def torch_layer(make_layer, x_shape):
    def build(device):
        torch = _torch()
        torch.manual_seed(0)
        layer = make_layer(torch.nn).to(device)
        x = torch.randn(*x_shape, device=device, requires_grad=True)
        g = torch.randn_like(layer(x))

        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(g)
            return x.grad

        return step

    return build


# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------
def all_cases(batch: int = 64, size: int = 64, classes: int = 10) -> list:
    cases = []
    for name in ("cnn", "user cnn", "resnet18"):
        tn_model = _tn_model(name, classes)
        shape = (batch, 3, size, size)
        cases.append(Case(f"{name} train step", "model", batch, model_macs(tn_model, shape, True),
                          tinynet_train_step(name, batch, size, classes), torch_train_step(name, batch, size, classes)))
        cases.append(Case(f"{name} eval forward", "model", batch, model_macs(tn_model, shape, False),
                          tinynet_eval_forward(name, batch, size, classes), torch_eval_forward(name, batch, size, classes)))

    n = batch
    s = size // 64  # the layer shapes below are ResNet18's at 64x64 input
    convs = [  # (label, C, C_out, k, stride, pad, H): ResNet18's convolutions at 64x64 input
        ("stem 7x7/2 3->64", 3, 64, 7, 2, 3, 64 * s),
        ("3x3/1 64->64 @16", 64, 64, 3, 1, 1, 16 * s),
        ("3x3/1 128->128 @8", 128, 128, 3, 1, 1, 8 * s),
        ("3x3/1 256->256 @4", 256, 256, 3, 1, 1, 4 * s),
        ("3x3/1 512->512 @2", 512, 512, 3, 1, 1, 2 * s),
        ("3x3/2 64->128 @16", 64, 128, 3, 2, 1, 16 * s),
        ("3x3/2 256->512 @4", 256, 512, 3, 2, 1, 4 * s),
        ("1x1/2 64->128 @16", 64, 128, 1, 2, 0, 16 * s),
        ("1x1/1 256->256 @4", 256, 256, 1, 1, 0, 4 * s),
    ]
    for label, c, co, k, st, p, h in convs:
        macs = 3 * conv_macs(n, c, h, h, co, k, st, p)  # forward, dW and dx
        cases.append(Case(f"Conv2d {label}", "layer", n, macs,
                          tinynet_layer(lambda c=c, co=co, k=k, st=st, p=p: nn.Conv2d(c, co, k, st, p, bias=False),
                                        (n, c, h, h), chwn=c != 3),
                          torch_layer(lambda tnn, c=c, co=co, k=k, st=st, p=p: tnn.Conv2d(c, co, k, st, p, bias=False),
                                      (n, c, h, h))))
    others = [
        ("BatchNorm2d 64 @32", lambda: nn.BatchNorm2d(64), lambda tnn: tnn.BatchNorm2d(64), (n, 64, 32 * s, 32 * s), 0),
        ("BatchNorm2d 256 @4", lambda: nn.BatchNorm2d(256), lambda tnn: tnn.BatchNorm2d(256), (n, 256, 4 * s, 4 * s), 0),
        ("MaxPool2d 3/2/1 64 @32", lambda: nn.MaxPool2d(3, 2, 1), lambda tnn: tnn.MaxPool2d(3, 2, 1),
         (n, 64, 32 * s, 32 * s), 0),
        ("MaxPool2d 4/4 32 @64", lambda: nn.MaxPool2d(4), lambda tnn: tnn.MaxPool2d(4), (n, 32, 64 * s, 64 * s), 0),
        ("ReLU 64 @32", lambda: nn.ReLU(), lambda tnn: tnn.ReLU(), (n, 64, 32 * s, 32 * s), 0),
        ("Linear 512->512", lambda: nn.Linear(512, 512), lambda tnn: tnn.Linear(512, 512), (n, 512), 3 * n * 512 * 512),
        ("Linear 2048->10", lambda: nn.Linear(2048, 10), lambda tnn: tnn.Linear(2048, 10), (n, 2048), 3 * n * 2048 * 10),
    ]
    for label, tn_make, torch_make, shape, macs in others:
        cases.append(Case(label, "layer", n, macs, tinynet_layer(tn_make, shape), torch_layer(torch_make, shape)))
    return cases
