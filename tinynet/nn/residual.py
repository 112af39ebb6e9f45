"""The residual block of ResNet18/34 (torchvision's ``BasicBlock``).

    out = relu( bn2(conv2( relu(bn1(conv1(x))) )) + shortcut(x) )

with ``shortcut = downsample`` (a 1x1 strided conv and a BatchNorm) when the
block changes resolution or width, and the identity otherwise.

Backward: the sum splits the incoming gradient ``g = dL/d(pre-ReLU sum)`` into
both branches unchanged, and ``x`` fans out into both, so their gradients add::

    dx = d(main branch)/dx^T g + d(shortcut)/dx^T g

This is why no backward may modify its ``dout`` argument: both branches read
the same ``g``.

On the fast path, in evaluation mode without gradients, the block runs its
epilogues in place (:mod:`tinynet.nn.fast.epilogues`): each BatchNorm's scale
and shift, the sum and the ReLUs on the convolutions' fresh outputs (bit for bit
the same numbers).
"""
from __future__ import annotations

from .. import backend
from . import fast
from .activation import ReLU
from .conv import Conv2d
from .fast import epilogues
from .fast.layout import add
from .module import Module, Sequential
from .norm import BatchNorm2d

__all__ = ["BasicBlock"]


def __getattr__(name):
    # kaiming_init_ lived here, then in tinynet.nn.init; its home is now the ResNet that uses it.
    if name == "kaiming_init_":
        from ..models.resnet import kaiming_init_

        return kaiming_init_
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BasicBlock(Module):
    """``BasicBlock(in_planes, planes, stride=1, downsample=None)``; parameter names as torchvision's."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, downsample=None, rng=None, dtype="float32"):
        super().__init__()
        self.conv1 = Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False, rng=rng, dtype=dtype)
        self.bn1 = BatchNorm2d(planes, dtype=dtype)
        self.conv2 = Conv2d(planes, planes, 3, stride=1, padding=1, bias=False, rng=rng, dtype=dtype)
        self.bn2 = BatchNorm2d(planes, dtype=dtype)
        # torchvision uses one ReLU module twice; each of ours keeps its own output for backward.
        # In place: BatchNorm's backward keeps xhat, not its output, and the sum below is ours.
        self.relu1 = ReLU(inplace=True)
        self.relu2 = ReLU(inplace=True)
        self.downsample = downsample
        if downsample is None and (stride != 1 or in_planes != planes):
            raise ValueError(
                f"BasicBlock({in_planes}, {planes}, stride={stride}) changes the shape of its input, so it "
                f"needs a downsample module (e.g. Sequential(Conv2d({in_planes}, {planes}, 1, stride={stride}, "
                f"bias=False), BatchNorm2d({planes})))"
            )
        self.stride = stride

    def forward(self, x):
        if (epilogues.can_run_in_place(self, self.conv1, self.bn1, self.relu1)
                and epilogues.can_run_in_place(self, self.conv2, self.bn2, self.relu2)):
            return self._forward_eval_in_place(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out = self._add(out, identity, out=out)  # out += identity: bn2's output is a fresh array nobody else holds
        return self.relu2(out)

    @staticmethod
    def _add(a, b, out=None):
        """``a + b`` (into ``out`` if given); on the fast path split over the threads, keeping a's layout."""
        if fast.enabled():
            return add(a, b, out=out)
        return a + b if out is None else backend.get_array_module(a).add(a, b, out=out)

    def _forward_eval_in_place(self, x):
        """The same block for evaluation without gradients: each BatchNorm, the sum and the ReLUs in
        place on the convolutions' outputs (:mod:`tinynet.nn.fast.epilogues`)."""
        ds = self.downsample
        if ds is None:
            identity = x
        elif type(ds) is Sequential and len(ds) == 2 and epilogues.can_run_in_place(self, ds[0], ds[1]):
            identity = epilogues.conv_bn_eval(ds[0], ds[1], x)
        else:
            identity = ds(x)
        out = epilogues.conv_bn_eval(self.conv1, self.bn1, x, relu=True)
        return epilogues.conv_bn_eval(self.conv2, self.bn2, out, relu=True, residual=identity)

    def backward(self, dout):
        g = self.relu2.backward(dout)  # gradient of the sum, shared by both branches
        dx = self.conv1.backward(self.bn1.backward(self.relu1.backward(self.conv2.backward(self.bn2.backward(g)))))
        return self._add(dx, g if self.downsample is None else self.downsample.backward(g))
