"""The gradient checker itself must catch wrong gradients, or every other test means nothing."""
import numpy as np
import pytest

import tinynet
from tinynet import nn
from tinynet.gradcheck import GradcheckError, gradcheck, numerical_gradient
from tinynet.nn.layout import channel_matrix, from_channel_matrix


class LeakyBackwardReLU(nn.ReLU):
    def backward(self, dout):  # wrong: ignores the mask
        self._saved_for_backward()
        return dout


class BatchNormWithoutMeanPath(nn.BatchNorm2d):
    """A classic bug: dx = gamma/sigma * dy, forgetting that mu and var depend on x."""

    def backward(self, dout):
        mode, path, (xhat, gamma, inv_std), _, _ = self._saved_for_backward()  # a fast-path cache
        dy2 = channel_matrix(dout)
        self.weight.accumulate_grad((dy2 * xhat).sum(1))
        self.bias.accumulate_grad(dy2.sum(1))
        return from_channel_matrix(dy2 * (gamma * inv_std)[:, None], dout.shape)


class WrongWeightGradLinear(nn.Linear):
    def backward(self, dout):
        dx = super().backward(dout)
        self.weight.grad = self.weight.grad * 1.01
        return dx


def test_catches_wrong_input_gradient(rng):
    report = gradcheck(LeakyBackwardReLU(), rng.standard_normal((3, 4)))
    assert not report.ok
    with pytest.raises(GradcheckError, match="input.*MISMATCH"):
        report.assert_ok()


def test_catches_batchnorm_backward_missing_statistics_paths(rng):
    layer = BatchNormWithoutMeanPath(3, dtype=np.float64)
    with tinynet.fast_path(True):  # the buggy backward reads the fast path's (C, M) cache
        report = gradcheck(layer, rng.standard_normal((4, 3, 3, 3)))
    assert not report.ok
    assert [r.name for r in report.results if not r.ok] == ["input"]


def test_catches_one_percent_error_in_a_parameter(rng):
    report = gradcheck(WrongWeightGradLinear(4, 3, dtype=np.float64), rng.standard_normal((5, 4)))
    assert [r.name for r in report.results if not r.ok] == ["weight"]


def test_leaves_the_original_layer_untouched(rng):
    layer = nn.BatchNorm2d(3)
    before = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    gradcheck(layer, rng.standard_normal((2, 3, 4, 4)))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
        assert v.dtype == before[k].dtype


def test_samples_entries_of_large_tensors(rng):
    report = gradcheck(nn.Linear(50, 40, dtype=np.float64), rng.standard_normal((3, 50)), max_checks=25)
    weight = [r for r in report.results if r.name == "weight"][0]
    assert weight.checked == 25 and weight.total == 2000


def test_numerical_gradient_of_a_quadratic():
    x = np.array([1.0, -2.0, 3.0])
    g = numerical_gradient(lambda: float(np.sum(x ** 2)), x, [0, 1, 2])
    np.testing.assert_allclose(g, 2 * x, rtol=1e-8)
    np.testing.assert_array_equal(x, [1.0, -2.0, 3.0])  # restored
