"""The assignment's small CNN.

    conv 3->32 (3x3, pad 1), ReLU, max pool 4      64x64 -> 16x16
    conv 32->64 (3x3, pad 1), ReLU, max pool 2     16x16 -> 8x8
    conv 64->128 (3x3, pad 1), ReLU, max pool 2    8x8   -> 4x4
    flatten, linear 128*4*4 = 2048 -> classes

For other input sizes the linear layer's width follows: 128 * (size/16)^2.

Each ReLU runs after the max pool that follows it, on 16x (then 4x) fewer
values: the two commute, outputs and gradients alike
(on the fast path, as in every Sequential: :func:`tinynet.nn.fast.epilogues.reorder_relu_maxpool`).
"""
from __future__ import annotations

from ..nn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, Softmax

__all__ = ["SimpleCNN", "simple_cnn"]


class SimpleCNN(Sequential):
    """The assignment's CNN as a Sequential (keys ``0.weight`` ... ``10.bias``, like PyTorch's nn.Sequential).

    ``softmax_before_loss=True`` appends a Softmax layer, reproducing the
    original notebook's bug (CrossEntropyLoss then applies a second softmax,
    which flattens the gradients and slows learning); off by default.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 64, softmax_before_loss: bool = False, rng=None):
        if image_size % 16:
            raise ValueError(f"SimpleCNN: image_size must be a multiple of 16 (pools of 4, 2 and 2), got {image_size}")
        side = image_size // 16
        layers = [
            # In-place ReLUs: a convolution's backward keeps its input's columns, not its output.
            Conv2d(3, 32, 3, padding=1, rng=rng), ReLU(inplace=True), MaxPool2d(4),
            Conv2d(32, 64, 3, padding=1, rng=rng), ReLU(inplace=True), MaxPool2d(2),
            Conv2d(64, 128, 3, padding=1, rng=rng), ReLU(inplace=True), MaxPool2d(2),
            Flatten(), Linear(128 * side * side, num_classes, rng=rng),
        ]
        if softmax_before_loss:
            layers.append(Softmax(dim=1))
        super().__init__(*layers)
        self.num_classes = num_classes


def simple_cnn(num_classes: int = 10, **kwargs) -> SimpleCNN:
    return SimpleCNN(num_classes, **kwargs)
