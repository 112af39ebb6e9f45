"""The fast Adam step (fewer passes, threads over the parameters) against a plain reference of PyTorch's formula."""
import math

import numpy as np
import pytest

from tinynet import backend, nn, optim
from tinynet.optim import adam, optimizer


@pytest.fixture
def two_threads():
    """Split every large pass over two threads, even on a one-CPU machine."""
    backend.set_num_threads(2)
    yield
    backend.set_num_threads(None)


def reference_adam(params, grads_per_step, lr, betas, eps, wd, decoupled, dtype):
    """PyTorch's Adam/AdamW, written out in float64 with a step count per parameter.

    ``grads_per_step[s][i]`` is parameter i's gradient at step s, or None (no gradient that step).
    """
    b1, b2 = betas
    w = [np.array(p, dtype=np.float64) for p in params]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    t = [0] * len(w)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = np.array(g, dtype=np.float64)
            t[i] += 1
            if decoupled:
                w[i] = w[i] * (1 - lr[i] * wd)
            elif wd:
                g = g + wd * w[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t[i]), v[i] / (1 - b2 ** t[i])
            w[i] = w[i] - lr[i] * m_hat / (np.sqrt(v_hat) + eps)
    return w, m, v, t


# The last shape spans several blocks of optimizer.CHUNK_ELEMENTS (rows of one parameter in several blocks).
SHAPES = [(600, 300), (3, 70000), (64, 32, 3, 3), (17,), (), (0, 4), (1, 200000),
          (7, (5 * optimizer.CHUNK_ELEMENTS) // 14 + 3)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind, wd", [("adam", 0.0), ("adam", 0.01), ("adamw", 0.01), ("adamw", 0.0)])
def test_adam_equals_the_reference_formula(kind, wd, dtype, rng, two_threads):
    w0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    params = [nn.Parameter(w.copy()) for w in w0]
    # two groups with their own learning rates; parameter 3 gets no gradient at step 1
    groups = [{"params": params[:4], "lr": 0.01}, {"params": params[4:], "lr": 0.003}]
    lr = [0.01] * 4 + [0.003] * (len(SHAPES) - 4)
    cls = optim.AdamW if kind == "adamw" else optim.Adam
    opt = cls(groups, weight_decay=wd, eps=1e-6)
    grads_per_step = []
    for step in range(5):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        if step == 1:
            grads[3] = None
        grads_per_step.append(grads)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.copy()
        opt.step()
    w, m, v, t = reference_adam(w0, grads_per_step, lr, (0.9, 0.999), 1e-6, wd, kind == "adamw", dtype)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    for i, p in enumerate(params):
        state = opt.state[id(p)]
        assert state["step"] == t[i]
        assert p.data.dtype == np.dtype(dtype) and state["exp_avg"].dtype == np.dtype(dtype)
        np.testing.assert_allclose(p.data, w[i], rtol=rtol, atol=rtol * 1e-2)
        np.testing.assert_allclose(state["exp_avg"], m[i], rtol=rtol, atol=rtol * 1e-2)
        np.testing.assert_allclose(state["exp_avg_sq"], v[i], rtol=rtol, atol=rtol * 1e-4)


@pytest.mark.parametrize("wd, decay", [(0.0, 1.0), (0.02, 1.0), (0.0, 0.999)])
def test_fast_step_equals_the_plain_step(wd, decay, rng):
    p, g, m = (rng.standard_normal((40, 50)).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal((40, 50))).astype(np.float32)
    args = (0.9, 0.999, 0.01 / (1 - 0.9 ** 3), math.sqrt(1 - 0.999 ** 3), 1e-8, wd, decay)
    plain = [a.copy() for a in (p, g, m, v)]
    g_before = g.copy()
    adam._adam_step(p, g, m, v, *args)
    adam._adam_step_plain(*plain, *args)
    np.testing.assert_array_equal(g, g_before)  # the gradient is only read
    for fast, slow in zip((p, m, v), (plain[0], plain[2], plain[3])):
        np.testing.assert_allclose(fast, slow, rtol=2e-6, atol=1e-7)


def test_threaded_step_equals_one_thread_bit_for_bit(rng):
    def run(threads):
        backend.set_num_threads(threads)
        try:
            r = np.random.default_rng(7)
            params = [nn.Parameter(r.standard_normal(s).astype(np.float32)) for s in SHAPES]
            opt = optim.AdamW(params, lr=0.01)
            for _ in range(3):
                for p in params:
                    p.grad = r.standard_normal(p.shape).astype(np.float32)
                opt.step()
            return [p.data for p in params] + [opt.state[id(p)]["exp_avg_sq"] for p in params]
        finally:
            backend.set_num_threads(None)

    for a, b in zip(run(1), run(2)):
        np.testing.assert_array_equal(a, b)


def test_rows_of_partition_every_array():
    sizes = [(7, 3), (1, 5), (4, 1), (10, 10)]  # (rows, elements per row)
    offsets = np.cumsum([0] + [r * e for r, e in sizes])
    total = int(offsets[-1])
    for cuts in ([0, total], [0, 1, total], [0, 20, 21, 22, 60, total], list(range(total + 1))):
        for k, (rows, per_row) in enumerate(sizes):
            covered = []
            for start, stop in zip(cuts[:-1], cuts[1:]):
                a, b = optimizer._rows_of(rows * per_row, int(offsets[k]), rows, start, stop)
                covered.extend(range(a, b))
            assert covered == list(range(rows)), (cuts, k)


def test_parameters_sharing_memory_update_as_one_after_the_other(rng, two_threads):
    """Two Parameters over one array (or views of one buffer) must not be updated by two threads."""
    flat = rng.standard_normal(400000).astype(np.float32)
    a, b = nn.Parameter(flat[:200000]), nn.Parameter(flat[200000:].reshape(1000, 200))
    c = nn.Parameter(a.data)  # the same memory as a
    expected = flat.copy()
    ea, eb = nn.Parameter(expected[:200000]), nn.Parameter(expected[200000:].reshape(1000, 200))
    ec = nn.Parameter(ea.data)
    opt, ref = optim.Adam([a, b, c], lr=0.1), optim.Adam([ea, eb, ec], lr=0.1)
    assert optimizer._may_overlap(
        [(p.data, p.data, np.zeros(p.shape), np.zeros(p.shape)) for p in (a, b, c)], 4, (0, 2, 3))
    for _ in range(2):
        for p, q in ((a, ea), (b, eb), (c, ec)):
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
            q.grad = p.grad.copy()
        opt.step()
        for p, group, state in [(q, ref.param_groups[0], ref.state.setdefault(id(q), {})) for q in (ea, eb, ec)]:
            ref._update(p, group, state)  # the plain loop: one parameter after the other
    np.testing.assert_array_equal(flat, expected)


def test_separate_parameters_do_not_look_shared(rng):
    params = [nn.Parameter(rng.standard_normal((300, 300)).astype(np.float32)) for _ in range(3)]
    steps = [(p.data, rng.standard_normal(p.shape), np.zeros(p.shape), np.zeros(p.shape)) for p in params]
    assert not optimizer._may_overlap(steps, 4, (0, 2, 3))
    grad = rng.standard_normal((300, 300))  # one gradient array read by two steps is fine
    assert not optimizer._may_overlap([(s[0], grad) + s[2:] for s in steps], 4, (0, 2, 3))


def test_a_step_that_raises_changes_nothing(rng):
    p, q = nn.Parameter(rng.standard_normal(5)), nn.Parameter(rng.standard_normal(3))
    opt = optim.Adam([p, q], lr=0.1)
    p.grad, q.grad = np.ones(5), np.ones(3)
    opt.step()
    opt.state[id(q)]["exp_avg"] = np.zeros(4)  # state of another shape: the next step must refuse
    before = p.data.copy(), opt.state[id(p)]["exp_avg"].copy(), opt.state[id(p)]["step"]
    with pytest.raises(ValueError, match="group 0, parameter 1"):
        opt.step()
    np.testing.assert_array_equal(p.data, before[0])
    np.testing.assert_array_equal(opt.state[id(p)]["exp_avg"], before[1])
    assert opt.state[id(p)]["step"] == before[2]


@pytest.mark.parametrize("momentum, dampening, wd, nesterov",
                         [(0.0, 0.0, 0.0, False), (0.0, 0.0, 1e-3, False), (0.9, 0.0, 5e-4, False),
                          (0.9, 0.1, 0.0, False), (0.9, 0.0, 5e-4, True)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sgd_equals_the_plain_rule_bit_for_bit(momentum, dampening, wd, nesterov, dtype, rng, two_threads):
    from tinynet.optim import sgd

    w0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    params = [nn.Parameter(w.copy()) for w in w0]
    opt = optim.SGD(params, lr=0.05, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov)
    w, bufs = [x.copy() for x in w0], [None] * len(w0)
    for step in range(4):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        if step == 1:
            grads[3] = None  # no gradient this step: neither the parameter nor its buffer moves
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if g is None else g.copy()
            if g is None:
                continue
            first = momentum and bufs[i] is None
            if first:
                bufs[i] = np.empty_like(w[i])
            sgd._sgd_step_plain(w[i], g, bufs[i], 0.05, momentum, dampening, wd, nesterov, first)
        opt.step()
    for i, p in enumerate(params):
        np.testing.assert_array_equal(p.data, w[i])
        if momentum:
            np.testing.assert_array_equal(opt.state[id(p)]["momentum_buffer"], bufs[i])
        else:
            assert "momentum_buffer" not in opt.state[id(p)]


def test_a_gradient_of_another_shape_is_refused_before_any_update(rng):
    p, q = nn.Parameter(rng.standard_normal((4, 3))), nn.Parameter(rng.standard_normal((4, 3)))
    before = p.data.copy()
    p.grad, q.grad = np.ones((4, 3)), np.ones(3)  # (3,) would broadcast over q's rows
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(3,\)"):
        optim.Adam([p, q]).step()
    np.testing.assert_array_equal(p.data, before)
