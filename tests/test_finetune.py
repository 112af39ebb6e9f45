"""Fine-tuning from a pretrained file, step by step against PyTorch (issue 26).

``train_resnet.py --pretrained`` loads a backbone with ``load_into(..., strict=False,
skip_prefixes="fc.")``, keeps the freshly initialised head and trains everything with Adam.
These tests take that exact path from a file on disk (weights, BatchNorm running statistics and
``num_batches_tracked`` that are not the defaults, a head of another size that must be ignored)
and compare every parameter and buffer, and the evaluation output, with PyTorch's fine-tune of
the same state dict, in float64 where the two must agree to rounding.
"""
import numpy as np
import pytest

from tinynet import nn, optim
from tinynet.io import load_into, save_weights
from tinynet.models import resnet18
from tinynet.nn.module import no_grad

torch = pytest.importorskip("torch", reason="PyTorch not installed: the fine-tune parity test is skipped")

from tests_torch_models import torch_resnet18  # noqa: E402  (tests/ is on sys.path; needs torch)


def pretrained_file(path, rng, classes=7):
    """A backbone file as pretrain_resnet.py writes it, with statistics a fresh model never has."""
    state = {}
    for key, value in resnet18(classes, head="linear").state_dict().items():
        value = np.asarray(value)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_mean":
            value = 0.3 * rng.standard_normal(value.shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 2.0, value.shape)
        elif leaf == "num_batches_tracked":
            value = np.array(1234)
        elif value.ndim == 1 and ".bn" in f".{key}" or key.startswith("bn1") or "downsample.1" in key:
            value = rng.uniform(0.5, 1.5, value.shape) if leaf == "weight" else 0.1 * rng.standard_normal(value.shape)
        state[key] = value.astype(np.int64 if leaf == "num_batches_tracked" else np.float32)
    save_weights(state, path)
    return state


def test_finetune_from_a_file_matches_pytorch_step_by_step_in_float64(tmp_path, rng, batch=4):
    file_state = pretrained_file(tmp_path / "backbone.npz", rng)
    model = resnet18(5, head="mlp")
    result = load_into(model, tmp_path / "backbone.npz", strict=False, skip_prefixes="fc.")
    assert not result.missing_keys and not result.mismatched_keys
    for key, value in file_state.items():  # the backbone is the file's, buffers included
        if not key.startswith("fc."):
            np.testing.assert_array_equal(np.asarray(model.state_dict()[key]), value, err_msg=key)
    model = model.double()
    reference = torch_resnet18(5, head="mlp").double()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})

    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    torch_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    reference.train()
    for _ in range(3):
        x = rng.standard_normal((batch, 3, 32, 32))
        y = rng.integers(0, 5, batch)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        model.backward(loss_fn.backward())
        optimizer.step()
        torch_optimizer.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(y))
        torch_loss.backward()
        torch_optimizer.step()
        assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-10)

    expected = reference.state_dict()
    for key, value in model.state_dict().items():  # parameters, running statistics and batch counts
        want = expected[key].numpy()
        got = np.asarray(value)
        if key.endswith("num_batches_tracked"):
            assert int(got) == int(want) == 1234 + 3, key
        else:
            # Adam divides by sqrt(v): where a gradient is near 0, rounding moves a step by ~1e-7 of
            # its size (lr).  A wrong step, a buffer not loaded or a statistic not updated is off by ~lr.
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8, err_msg=key)

    model.eval()
    reference.eval()
    x = rng.standard_normal((3, 3, 32, 32))
    with no_grad():
        out = model(x)
    with torch.no_grad():
        torch_out = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, torch_out, rtol=1e-9, atol=1e-10 * np.abs(torch_out).max())
