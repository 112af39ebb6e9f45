import math

import numpy as np
import pytest

from tinynet import backend, nn, optim

from conftest import torch_or_skip


def param(values):
    p = nn.Parameter(np.array(values, dtype=np.float64))
    return p


def test_sgd_plain_step_is_the_assignment_rule():
    # W <- W - lr (dL/dW + 2 lambda W), lambda = weight_decay / 2
    p = param([1.0, -2.0])
    p.grad = np.array([0.5, 0.25])
    lam, lr = 0.01, 0.1
    optim.SGD([p], lr=lr, weight_decay=2 * lam).step()
    np.testing.assert_allclose(p.data, [1.0 - lr * (0.5 + 2 * lam * 1.0), -2.0 - lr * (0.25 + 2 * lam * -2.0)])


def test_sgd_momentum_and_nesterov_by_hand():
    p = param([1.0])
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    for g in (1.0, 2.0):
        p.grad = np.array([g])
        opt.step()
    # buf1 = 1, w1 = 1 - 0.1; buf2 = 0.9 * 1 + 2 = 2.9, w2 = w1 - 0.29
    assert p.data[0] == pytest.approx(1 - 0.1 - 0.29)
    q = param([1.0])
    opt = optim.SGD([q], lr=0.1, momentum=0.9, nesterov=True)
    for g in (1.0, 2.0):
        q.grad = np.array([g])
        opt.step()
    # step1: buf=1, g=1+0.9*1=1.9; step2: buf=2.9, g=2+0.9*2.9=4.61
    assert q.data[0] == pytest.approx(1 - 0.19 - 0.461)


def test_adam_first_steps_by_hand():
    p = param([0.5])
    opt = optim.Adam([p], lr=0.01)
    grads = [0.2, -0.1]
    m = v = 0.0
    w = 0.5
    for t, g in enumerate(grads, start=1):
        p.grad = np.array([g])
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= 0.01 * (m / (1 - 0.9 ** t)) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        assert p.data[0] == pytest.approx(w, rel=1e-12)
    assert opt.state[id(p)]["step"] == 2


def test_adamw_decays_before_the_adam_step():
    p = param([2.0])
    p.grad = np.array([0.0])
    optim.AdamW([p], lr=0.1, weight_decay=0.5).step()
    assert p.data[0] == pytest.approx(2.0 * (1 - 0.1 * 0.5))


def test_parameters_without_grad_are_skipped():
    p, q = param([1.0]), param([1.0])
    p.grad = np.array([1.0])
    optim.Adam([p, q]).step()
    assert q.data[0] == 1.0 and p.data[0] != 1.0


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "fast"])
def test_invalid_learning_rate(bad):
    with pytest.raises(ValueError, match="lr must be"):
        optim.SGD([param([1.0])], lr=bad)


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam(nn.ReLU().parameters())


def test_invalid_betas():
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        optim.Adam([param([1.0])], betas=(0.9, 1.0))


@pytest.mark.parametrize("make_opt, shapes, dtype, threads", [
    (lambda ps: optim.Adam(ps, lr=0.05, weight_decay=0.01), [(3,), (3,)], np.float64, None),
    # rows of a large parameter split over two threads (tinynet.optim.optimizer.split_updates)
    (lambda ps: optim.AdamW(ps, lr=0.01), [(600, 300), (5,)], np.float32, 2),
], ids=["adam-l2", "adamw-two-threads"])
def test_state_dict_roundtrip_continues_identically(rng, make_opt, shapes, dtype, threads):
    backend.set_num_threads(threads)
    try:
        ps = [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
        qs = [nn.Parameter(p.data.copy()) for p in ps]
        opt_a = make_opt(ps)
        grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(4)]
        for gs in grads[:2]:
            for p, g in zip(ps, gs):
                p.grad = g.copy()
            opt_a.step()
        opt_b = make_opt(qs)
        for p, q in zip(ps, qs):
            q.data = p.data.copy()
        opt_b.load_state_dict(opt_a.state_dict())
        for gs in grads[2:]:
            for p, q, g in zip(ps, qs, gs):
                p.grad, q.grad = g.copy(), g.copy()
            opt_a.step()
            opt_b.step()
        for p, q in zip(ps, qs):
            np.testing.assert_array_equal(p.data, q.data)
    finally:
        backend.set_num_threads(None)


def test_step_and_cosine_schedules():
    p = param([1.0])
    opt = optim.SGD([p], lr=0.1)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    opt = optim.SGD([p], lr=0.1)
    cos = optim.CosineAnnealingLR(opt, T_max=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        cos.step()
    assert lrs == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 - math.cos(math.pi / 4)) / 2, 0.0])
    restored = optim.CosineAnnealingLR(optim.SGD([p], lr=0.1), T_max=4)
    restored.load_state_dict({"last_epoch": 2, "base_lrs": [0.1]})
    assert restored.get_last_lr() == pytest.approx([0.05])


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "adam", "adamw"])
def test_pytorch_parity_over_several_steps(kind, rng):
    torch = torch_or_skip()
    w0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(5)]
    p = nn.Parameter(w0.copy())
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    if kind == "sgd":
        mine, ref = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01), torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=0.01)
    elif kind == "nesterov":
        mine, ref = (optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                     torch.optim.SGD([tp], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    elif kind == "adam":
        mine, ref = optim.Adam([p], lr=0.01, weight_decay=0.1), torch.optim.Adam([tp], lr=0.01, weight_decay=0.1)
    else:
        mine, ref = optim.AdamW([p], lr=0.01), torch.optim.AdamW([tp], lr=0.01)
    for g in grads:
        p.grad = g.copy()
        tp.grad = torch.from_numpy(g.copy())
        mine.step()
        ref.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda ps: optim.Adam(ps, lr=0.1), lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9)])
def test_state_follows_the_parameter_after_model_to(make):
    """State made before model.to(...) is moved to the parameter's device and dtype at the next step."""
    layer = nn.Linear(3, 2)
    opt = make(layer.parameters())
    layer.weight.grad, layer.bias.grad = np.ones((2, 3), np.float32), np.ones(2, np.float32)
    opt.step()
    layer.double()
    layer.weight.grad, layer.bias.grad = np.ones((2, 3)), np.ones(2)
    opt.step()
    for p in layer.parameters():
        for value in opt.state[id(p)].values():
            if hasattr(value, "dtype"):
                assert value.dtype == np.float64


def test_state_of_another_shape_names_the_parameter():
    layer = nn.Linear(3, 2)
    opt = optim.Adam(layer.parameters(), lr=0.1)
    layer.weight.grad, layer.bias.grad = np.ones((2, 3), np.float32), np.ones(2, np.float32)
    opt.step()
    layer.weight.data = np.zeros((4, 3), np.float32)
    layer.weight.grad = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"Adam: group 0, parameter 0 .*shape \(4, 3\).*exp_avg.*\(2, 3\)"):
        opt.step()
