"""ResNet18 in torchvision's layout, so a torchvision state dict loads key for key.

    conv1 7x7/2 (3->64), bn1, relu, maxpool 3x3/2 pad 1
    layer1: 2 BasicBlocks,  64 planes
    layer2: 2 BasicBlocks, 128 planes, first with stride 2 and a 1x1 downsample
    layer3: 2 BasicBlocks, 256 planes, likewise
    layer4: 2 BasicBlocks, 512 planes, likewise
    avgpool (global), flatten, fc

``resnet18(num_classes, head="mlp")`` replaces torchvision's ``fc`` (512 ->
classes) by the assignment's head ``fc = Sequential(Linear(512, 512), ReLU(),
Linear(512, classes))`` (keys ``fc.0.*`` and ``fc.2.*``); ``head="linear"``
keeps torchvision's single layer.

``width`` (default 64) scales every stage's channel count (64, 128, 256, 512
become width, 2*width, 4*width, 8*width) without changing any key name; small
widths make test fixtures of the exact torchvision layout that fit in a few
hundred kilobytes.
"""
from __future__ import annotations

from ..nn import (AdaptiveAvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU,
                  Sequential)
from ..nn import fast
from ..nn.fast import epilogues
from ..nn.init import kaiming_normal_fan_out

__all__ = ["ResNet", "resnet18", "make_head", "kaiming_init_"]


def kaiming_init_(module, rng=None):
    """torchvision's ResNet initialisation, in place: He-normal (fan-out) convs, BatchNorm gamma 1 and beta 0.

    Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, Conv2d):
            m.weight.data = kaiming_normal_fan_out(m.weight.shape, rng, m.weight.dtype)
        elif isinstance(m, BatchNorm2d) and m.affine:
            m.weight.data[...] = 1
            m.bias.data[...] = 0
    return module


def make_head(num_classes: int, head: str = "mlp", in_features: int = 512, hidden: int = 512, rng=None) -> Module:
    if head == "mlp":
        return Sequential(Linear(in_features, hidden, rng=rng), ReLU(), Linear(hidden, num_classes, rng=rng))
    if head == "linear":
        return Linear(in_features, num_classes, rng=rng)
    raise ValueError(f"unknown head {head!r}: expected 'mlp' (512 -> 512 -> classes) or 'linear'")


class ResNet(Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, head: str = "linear", width: int = 64,
                 rng=None):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"ResNet: num_classes must be positive, got {num_classes}")
        self.conv1 = Conv2d(3, width, 7, stride=2, padding=3, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(width)
        self.relu = ReLU(inplace=True)
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        in_planes = width
        for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or in_planes != planes:
                downsample = Sequential(Conv2d(in_planes, planes, 1, stride=stride, bias=False, rng=rng),
                                        BatchNorm2d(planes))
            stage = [BasicBlock(in_planes, planes, stride, downsample, rng=rng)]
            stage += [BasicBlock(planes, planes, rng=rng) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", Sequential(*stage))
            in_planes = planes
        self.avgpool = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        kaiming_init_(self, rng)
        # The head keeps PyTorch's default Linear initialisation, as torchvision does.
        self.num_features = in_planes  # 512 for the standard width
        self.fc = make_head(num_classes, head, in_features=in_planes, hidden=in_planes, rng=rng)
        self.num_classes = num_classes

    def _stages(self):
        """The layers in the order they run (the backward runs them reversed).

        On the fast path the stem's ReLU runs after the max pool, on 4x fewer values: the two
        commute, outputs and gradients alike (:func:`tinynet.nn.fast.epilogues.reorder_relu_maxpool`).
        """
        layers = [self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3, self.layer4,
                  self.avgpool, self.flatten, self.fc]
        return epilogues.reorder_relu_maxpool(layers) if fast.enabled() else layers

    def features(self, x, stages=None):
        """The pooled features (N, 512), i.e. the input of ``fc`` (``stages``: :meth:`_stages`'s list)."""
        stages = (self._stages() if stages is None else stages)[:-1]
        if epilogues.can_run_in_place(self, self.conv1, self.bn1):
            # evaluation without gradients: bn1 in place on conv1's output (tinynet.nn.fast.epilogues)
            x = epilogues.conv_bn_eval(self.conv1, self.bn1, x)
            stages = stages[2:]
        for layer in stages:
            x = layer(x)
        return x

    def forward(self, x):
        stages = self._stages()
        out = self.fc(self.features(x, stages))
        self._save_for_backward(stages)  # the backward undoes this order, even if the fast-path switch moves
        return out

    def backward(self, dout):
        # (after features() and fc called by hand, no order was saved: the one _stages lists now)
        (stages,) = self._saved_for_backward() if self._saved else (self._stages(),)
        for layer in reversed(stages):
            dout = layer.backward(dout)
        return dout

    def set_input_grad(self, flag: bool) -> "ResNet":
        object.__setattr__(self, "input_grad", bool(flag))
        self.conv1.set_input_grad(flag)
        return self


def resnet18(num_classes: int = 1000, head: str = "mlp", width: int = 64, rng=None) -> ResNet:
    """ResNet18 with torchvision's parameter names and the assignment's MLP head by default."""
    return ResNet((2, 2, 2, 2), num_classes, head, width=width, rng=rng)
