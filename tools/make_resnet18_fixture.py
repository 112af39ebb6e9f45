"""Write the PyTorch fixtures that prove ``tinynet.io`` reads ``torch.save`` files as PyTorch does.

Run from the repository root, with PyTorch installed (tinynet itself never imports it)::

    python tools/make_resnet18_fixture.py

It writes, into ``tests/fixtures/`` (about 1 MB in all; re-running gives the same values)::

    resnet18_w8.pth               torch.save(model.state_dict()) of tests/tests_torch_models.py's
                                  torch_resnet18(num_classes=10, head="linear", width=8): torchvision's
                                  exact keys at 1/8 of the channels.  BatchNorm weights and biases are
                                  randomised and three train-mode forwards move the running statistics
                                  away from (0, 1), so that every buffer matters.
    resnet18_w8_expected.npz      x: a (4, 3, 64, 64) float32 input batch; logits: the (4, 10) eval-mode
                                  output PyTorch computed for it.
    tensors_zoo.pth               one dict with a tensor of every dtype tinynet reads, a transpose
                                  (non-contiguous), two views of one storage at different offsets, a
                                  stride-0 expansion, an empty tensor, a 0-d tensor and an nn.Parameter.
    tensors_zoo_expected.npz      the same values as NumPy arrays (bfloat16 as the float32 it widens to).
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "tests"))

from tests_torch_models import torch_resnet18  # noqa: E402  (needs the sys.path entry above)


def make_resnet18() -> None:
    torch.manual_seed(0)
    model = torch_resnet18(num_classes=10, head="linear", width=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        model.train()
        for _ in range(3):  # running_mean/var move by momentum 0.1 towards each batch's statistics
            model(torch.randn(8, 3, 64, 64) * 2.0 + 0.5)
        model.eval()
        x = torch.randn(4, 3, 64, 64)
        logits = model(x)
    torch.save(model.state_dict(), FIXTURES / "resnet18_w8.pth")
    np.savez(FIXTURES / "resnet18_w8_expected.npz", x=x.numpy(), logits=logits.numpy())


def make_zoo() -> None:
    g = torch.Generator().manual_seed(1)
    shared = torch.arange(24, dtype=torch.float32) * 0.5 - 3.0
    zoo = {
        "float32": torch.randn(3, 4, generator=g),
        "float64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "float16": torch.randn(5, generator=g).half(),
        "bfloat16": torch.tensor([1 / 3, -2.5, 1e-3, 3e38, -0.0]).bfloat16(),
        "int64": torch.tensor([-(2 ** 62), -1, 0, 7, 2 ** 62]),
        "int32": torch.tensor([-(2 ** 31), 5, 2 ** 31 - 1], dtype=torch.int32),
        "int16": torch.tensor([-(2 ** 15), 3, 2 ** 15 - 1], dtype=torch.int16),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 1, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar_int64": torch.tensor(42),  # 0-d, like num_batches_tracked
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # stride (1, 4)
        "view_a": shared[2:8],  # offset 2 of the shared storage
        "view_b": shared[10:22].view(3, 4)[:, 1::2],  # offset 11, stride (4, 2), same storage
        "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(4, 3),  # stride (0, 1)
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),  # pickled by _rebuild_parameter
    }
    assert zoo["view_a"].untyped_storage().data_ptr() == zoo["view_b"].untyped_storage().data_ptr()
    assert not zoo["transposed"].is_contiguous() and zoo["expanded"].stride() == (0, 1)
    torch.save(zoo, FIXTURES / "tensors_zoo.pth")
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().contiguous().numpy()
                for k, v in zoo.items()}
    np.savez(FIXTURES / "tensors_zoo_expected.npz", **expected)


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    make_resnet18()
    make_zoo()
    for path in sorted(FIXTURES.iterdir()):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
