"""Fault injection, API misuse: every mistake raises an error that says what was expected and where.

Already covered elsewhere: wrong input shapes, ranks and dtypes of each layer
(test_conv, test_pool, test_norm, test_layers), backward twice or after
no_grad (test_module), an empty parameter list, a negative or NaN learning
rate and bad betas at construction (test_optim), bad targets (test_loss), and
DataLoader arguments (test_data_loader).  This file adds the gradient handed
to backward, backward before forward for every kind of layer, the optimizer
at step time and given a model, fit's arguments, devices, and state dicts
with values that are not numbers.
"""
import numpy as np
import pytest

import tinynet
from tinynet import backend, nn, optim
from tinynet.data import ArrayDataset, DataLoader
from tinynet.models import resnet18, simple_cnn
from tinynet.nn.residual import BasicBlock
from tinynet.train import fit


@pytest.fixture
def cnn_and_batch(rng):
    model = simple_cnn(2, image_size=16)
    return model, rng.standard_normal((2, 3, 16, 16)).astype(np.float32)


def test_backward_given_the_loss_instead_of_its_gradient_names_the_layer(cnn_and_batch):
    model, x = cnn_and_batch
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(x), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"Linear '10': backward expected dL/d\(output\) of shape \(2, 2\) and "
                                         r"dtype float32.*received \(\) float32; pass loss_fn.backward\(\)"):
        model.backward(loss)


def test_backward_given_a_gradient_of_another_dtype_names_the_layer(cnn_and_batch):
    model, x = cnn_and_batch
    model(x)
    with pytest.raises(ValueError, match=r"Linear '10'.*dtype float32.*received \(2, 2\) float64"):
        model.backward(np.ones((2, 2)))


def test_a_one_output_head_does_not_broadcast_a_wrong_gradient(rng):
    head = nn.Linear(4, 1)  # (N, 1): a scalar or (N,) gradient would broadcast silently
    head(rng.standard_normal((3, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(3, 1\).*received \(3,\)"):
        head.backward(np.ones(3, np.float32))


# layer -> (its gradient's shape, or None for a loss; the start of the error: the layer that finds no cache)
LAYERS = {
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3), (1, 4, 2, 2), "Conv2d"),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3), (1, 3, 2, 2), "BatchNorm2d"),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), (1, 3, 2, 2), "MaxPool2d"),
    "ReLU": (lambda: nn.ReLU(), (1, 3), "ReLU"),
    "Softmax": (lambda: nn.Softmax(dim=1), (1, 3), "Softmax"),
    "Flatten": (lambda: nn.Flatten(), (1, 3), "Flatten"),
    "Dropout": (lambda: nn.Dropout(0.5), (1, 3), "Dropout"),
    "Linear": (lambda: nn.Linear(3, 2), (1, 2), "Linear"),
    "BasicBlock": (lambda: BasicBlock(4, 4), (1, 4, 2, 2), "ReLU 'relu2'"),  # its last layer, by its path
    "CrossEntropyLoss": (lambda: nn.CrossEntropyLoss(), None, "CrossEntropyLoss"),
    "BCEWithLogitsLoss": (lambda: nn.BCEWithLogitsLoss(), None, "BCEWithLogitsLoss"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_backward_before_forward_names_the_layer(name):
    make, shape, where = LAYERS[name]
    layer = make()
    with pytest.raises(RuntimeError, match=rf"^{where}: backward\(\) called before forward\(\)"):
        layer.backward() if shape is None else layer.backward(np.ones(shape, np.float32))


def test_backward_before_forward_in_a_model_names_the_layer_path():
    with pytest.raises(RuntimeError, match=r"Linear 'fc\.2': backward\(\) called before forward"):
        resnet18(3, head="mlp", width=8).backward(np.ones((1, 3), np.float32))


def test_loss_given_targets_and_logits_swapped_says_which_is_which():
    with pytest.raises(ValueError, match="CrossEntropyLoss: predictions must be a floating-point array.*int64"):
        nn.CrossEntropyLoss()(np.array([0, 1]), np.zeros((2, 2), np.float32))


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------
def test_optimizer_given_the_model_instead_of_its_parameters():
    with pytest.raises(TypeError, match=r"Adam: params must be an iterable of Parameters \(e\.g\. "
                                        r"model\.parameters\(\)\), got the SimpleCNN itself"):
        optim.Adam(simple_cnn(2, image_size=16))


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
@pytest.mark.parametrize("bad", [float("nan"), -0.1, float("inf"), None])
def test_learning_rate_broken_after_construction_is_refused_at_step(kind, bad):
    layer = nn.Linear(2, 2)
    opt = getattr(optim, kind)(layer.parameters(), lr=0.1)
    layer.weight.grad = np.ones((2, 2), np.float32)
    before = layer.weight.data.copy()
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ValueError, match=rf"{kind}\.step, group 0: lr must be a (finite )?number"):
        opt.step()
    np.testing.assert_array_equal(layer.weight.data, before)


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------
def _loader(n=8):
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8), np.arange(n) % 2, ["a", "b"])
    return DataLoader(data, batch_size=4)


class _Untouchable:
    """A loader that fails the test if fit asks it for a batch."""

    def __len__(self):
        return 2

    def __iter__(self):
        raise AssertionError("fit asked for a batch before checking its arguments")


def test_fit_refuses_an_optimizer_built_for_another_model():
    model = simple_cnn(2, image_size=16)
    other = optim.Adam(simple_cnn(2, image_size=16).parameters())
    with pytest.raises(ValueError, match="the optimizer holds none of the model's parameters"):
        fit(model, other, nn.CrossEntropyLoss(), _Untouchable(), epochs=1, progress=False, log=None)


def test_fit_refuses_a_training_loader_without_batches():
    model = simple_cnn(2, image_size=16)
    empty = DataLoader(_loader(3).dataset, batch_size=4, drop_last=True)  # 3 images, batches of 4
    with pytest.raises(ValueError, match="training loader yields no batches"):
        fit(model, optim.Adam(model.parameters()), nn.CrossEntropyLoss(), empty, epochs=1, progress=False, log=None)


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is present")
def test_fit_on_cuda_without_a_gpu_fails_before_any_batch():
    model = simple_cnn(2, image_size=16)
    with pytest.raises(RuntimeError, match="cuda"):
        fit(model, optim.Adam(model.parameters()), nn.CrossEntropyLoss(), _Untouchable(), epochs=1,
            device="cuda", progress=False, log=None)


def test_fit_on_an_unknown_device_says_which_are_known():
    model = simple_cnn(2, image_size=16)
    with pytest.raises(ValueError, match="unknown device 'gpu0': expected 'cpu' or 'cuda'"):
        fit(model, optim.Adam(model.parameters()), nn.CrossEntropyLoss(), _Untouchable(), epochs=1, device="gpu0")


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="needs a GPU")
def test_fit_with_the_model_left_on_the_cpu_says_to_move_it():
    model = simple_cnn(2, image_size=16)
    with pytest.raises(ValueError, match=r"the model is on cpu; call model\.to\('cuda'\) first"):
        fit(model, optim.Adam(model.parameters()), nn.CrossEntropyLoss(), _Untouchable(), epochs=1,
            device="cuda", progress=False, log=None)


# ---------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------
def test_state_dict_with_values_that_are_not_numbers_names_the_key_and_loads_nothing():
    tinynet.manual_seed(0)
    layer = nn.Linear(2, 2)
    before = layer.weight.data.copy(), layer.bias.data.copy()
    with pytest.raises(ValueError, match=r"'bias' holds <U1 values that cannot become float32.*nothing was loaded"):
        layer.load_state_dict({"weight": np.zeros((2, 2)), "bias": np.array(["a", "b"])})
    np.testing.assert_array_equal(layer.weight.data, before[0])  # the weight, which did fit, is unchanged too
    np.testing.assert_array_equal(layer.bias.data, before[1])


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    (lambda: nn.MaxPool2d(2), (2, 3, 6, 6)),
    (lambda: nn.AvgPool2d(2), (2, 3, 6, 6)),
    (lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 6, 6)),
    (lambda: nn.BatchNorm2d(3), (2, 3, 6, 6)),
    (lambda: nn.ReLU(), (2, 3)),
    (lambda: nn.Softmax(1), (2, 3)),
])
def test_every_layer_refuses_the_loss_in_place_of_its_gradient(make, shape):
    layer = make()
    layer(np.ones(shape, np.float32))
    with pytest.raises(ValueError, match=r"backward expected dL/d\(output\) of shape .*pass loss_fn.backward\(\)"):
        layer.backward(np.float32(1.0))
