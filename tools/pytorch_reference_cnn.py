"""The assignment's CNN recipe in PyTorch, on the images and split tinynet uses (needs PyTorch; never imported by tinynet).

Two checks that tinynet trains like PyTorch:

    python tools/pytorch_reference_cnn.py trajectory --data ../shared/data/popular-animals
        Same initial weights, same batches, same order, float64: tinynet's and
        PyTorch's weights after every Adam step, compared (they agree to ~1e-14;
        in float32 rounding differences grow chaotically, as between any two
        implementations).

    python tools/pytorch_reference_cnn.py recipe --data ../shared/data/popular-animals --seeds 42 1 2
        The full recipe (10 epochs, Adam 1e-3, batch 64, shuffled) in PyTorch on
        the images tinynet.data decodes and the split tinynet.data makes: test
        accuracy and weighted F1 per seed, to compare with
        ``examples/train_cnn.py --data ... --seed S``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch
from sklearn.metrics import f1_score

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from tests_torch_models import torch_cnn  # noqa: E402

from tinynet import nn, optim  # noqa: E402
from tinynet.data import ImageFolder, stratified_split  # noqa: E402
from tinynet.models import simple_cnn  # noqa: E402


def arrays(dataset, indices, dtype=np.float32):
    """Images as the loader normalises them: (x / 255 - 0.5) / 0.5, NCHW."""
    x = dataset.images(indices).astype(dtype) / 255.0
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2)), dataset.labels[indices]


def trajectory(dataset, steps: int = 22) -> None:
    train, _, _ = stratified_split(dataset.labels, seed=42)
    x, y = arrays(dataset, train, np.float64)
    torch.manual_seed(0)
    ref = torch_cnn(len(dataset.classes)).double()
    ref_opt, ref_loss = torch.optim.Adam(ref.parameters(), 1e-3), torch.nn.CrossEntropyLoss()
    model = simple_cnn(len(dataset.classes)).double()
    model.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    opt, loss_fn = optim.Adam(model.parameters(), 1e-3), nn.CrossEntropyLoss()
    order = np.random.default_rng(0).permutation(len(x))
    for step in range(steps):
        b = order[step * 64 % len(x):][:64]
        ref_opt.zero_grad()
        ref_value = ref_loss(ref(torch.from_numpy(x[b])), torch.from_numpy(y[b]))
        ref_value.backward()
        ref_opt.step()
        opt.zero_grad()
        value = loss_fn(model(x[b]), y[b])
        model.backward(loss_fn.backward())
        opt.step()
        diff = max(float(np.abs(v - ref.state_dict()[k].numpy()).max()) for k, v in model.state_dict().items())
        print(f"step {step + 1:>3}  loss PyTorch {ref_value.item():.10f}  tinynet {float(value):.10f}  "
              f"max weight difference {diff:.1e}")


def recipe(dataset, seed: int, epochs: int = 10) -> tuple:
    train, _, test = stratified_split(dataset.labels, seed=42)
    x, y = (torch.from_numpy(a) for a in arrays(dataset, train))
    x_test, y_test = arrays(dataset, test)
    torch.manual_seed(seed)
    model = torch_cnn(len(dataset.classes))
    opt, loss_fn = torch.optim.Adam(model.parameters(), 1e-3), torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            opt.zero_grad()
            loss_fn(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    return float(np.mean(pred == y_test)), float(f1_score(y_test, pred, average="weighted"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("trajectory", "recipe"))
    parser.add_argument("--data", required=True, help="folder with one sub-folder of images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = ImageFolder(args.data, size=64)
    if args.mode == "trajectory":
        trajectory(dataset)
        return
    for seed in args.seeds:
        accuracy, f1 = recipe(dataset, seed)
        print(f"seed {seed}: test accuracy {100 * accuracy:.1f} %, weighted F1 {f1:.3f}")


if __name__ == "__main__":
    main()
