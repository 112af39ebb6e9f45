"""Data-parallel training: sampler, SyncBatchNorm, and N ranks against one process, under ``mpiexec -n 2``.

The multi-rank cases launch this very file under ``mpiexec -n 2`` (its
``__main__`` block is the worker) with a timeout, and compare what rank 0
wrote with a single process computed here.  They skip cleanly without mpi4py
or without ``mpiexec`` next to the Python executable.

Equivalence (float64): 2 ranks with per-rank batch 32 take the steps of one
process with batch 64 on the same images, because the average of the two
ranks' mean gradients is the mean gradient of the 64 images; for ResNet18
only with SyncBatchNorm (plain BatchNorm normalises each rank's 32 images
with their own statistics, and the weights differ).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the worker, started by mpiexec, imports tinynet from this checkout
    sys.path.insert(0, str(ROOT))

import tinynet  # noqa: E402
from tinynet import backend, distributed, nn, optim  # noqa: E402
from tinynet.data import ArrayDataset, DataLoader  # noqa: E402
from tinynet.gradcheck import gradcheck  # noqa: E402
from tinynet.models import resnet18, simple_cnn  # noqa: E402
from tinynet.train import evaluate, fit  # noqa: E402

MPIEXEC = pathlib.Path(sys.executable).with_name("mpiexec")
STEPS = 3
SIZE = 16


# ---------------------------------------------------------------------------
# What both sides run: the data, the models, the steps
# ---------------------------------------------------------------------------
def synthetic_dataset(n=192, size=SIZE, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[..., 0] = np.clip(images[..., 0] // 2 + 30 * labels[:, None, None], 0, 255)  # something to learn
    return ArrayDataset(images, labels, [f"c{k}" for k in range(classes)])


def make_model(kind, seed=0, width=64):
    tinynet.manual_seed(seed)
    if kind == "cnn":
        net = simple_cnn(4, image_size=SIZE)
    else:
        net = resnet18(4, head="linear", width=width)
    net.double()
    net.set_input_grad(False)
    return net


def train_steps(net, optimizer, loader, steps=STEPS):
    """``steps`` SGD steps on ``loader``'s batches (NumPy or CuPy), fed in the net's dtype; the state, on the host."""
    loss_fn = nn.CrossEntropyLoss()
    dtype = next(iter(net.parameters())).dtype
    for _, (x, y) in zip(range(steps), loader):
        optimizer.zero_grad()
        loss_fn(net(x.astype(dtype)), y)
        net.backward(loss_fn.backward())
        optimizer.step()
    return {k: np.array(backend.to_numpy(v)) for k, v in net.state_dict().items()}


@functools.lru_cache(maxsize=None)
def single_process(kind, batch=64, steps=STEPS):
    net = make_model(kind)
    optimizer = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(synthetic_dataset(), batch_size=batch, shuffle=True, seed=7, prefetch=0)
    return train_steps(net, optimizer, loader, steps)


def worker_equivalence(out):
    """Every model on 2 ranks; rank 0 writes the final states, and the SyncBatchNorm layer check."""
    comm = distributed.init()
    results = {}
    for name, kind, sync in (("cnn", "cnn", False), ("resnet_sync", "resnet", True), ("resnet_plain", "resnet", False)):
        net = make_model(kind)
        optimizer = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        net, optimizer = distributed.prepare(net, optimizer, comm, sync_batchnorm=sync)
        loader = DataLoader(synthetic_dataset(), batch_size=64, shuffle=True, seed=7, prefetch=0)
        state = train_steps(net, optimizer, distributed.DistributedLoader.wrap(loader, comm))
        results.update({f"{name}/{k}": v for k, v in state.items()})
        results[f"{name}/__replica_diff__"] = np.array(distributed.check_replicas_equal(net, comm))
    # One SyncBatchNorm layer against BatchNorm on the whole batch: rank r holds rows r::2 of x and of dy.
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(2, 10, 3, 4, 5))
    x = x * 3 + 2
    full = nn.BatchNorm2d(3, dtype="float64")
    full.weight.data[:] = rng.normal(size=3)
    y_full = full(x)
    dx_full = full.backward(dy)
    sync = distributed.SyncBatchNorm(3, dtype="float64", comm=comm)
    sync.weight.data[:] = full.weight.data
    part = slice(comm.rank, None, comm.size)
    y = sync(np.ascontiguousarray(x[part]))
    dx = sync.backward(np.ascontiguousarray(dy[part]))
    dgamma = comm.allreduce_(sync.weight.grad.copy())
    results["layer/y_err"] = np.array(np.abs(y - y_full[part]).max())
    results["layer/dx_err"] = np.array(np.abs(dx - dx_full[part]).max())
    results["layer/dgamma_err"] = np.array(np.abs(dgamma - full.weight.grad).max())
    results["layer/running_var_err"] = np.array(np.abs(sync.running_var - full.running_var).max())
    if comm.is_main:
        np.savez(out / "equivalence.npz", **results)


def worker_fit(out, epochs, kill=None, resume=False):
    """fit() on 2 ranks with checkpoints in ``out``; ``kill="E,B,R"`` SIGKILLs rank R at batch B of epoch E."""
    comm = distributed.init()
    net = make_model("cnn")
    optimizer = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net, optimizer = distributed.prepare(net, optimizer, comm)
    dataset = synthetic_dataset()
    train = distributed.DistributedLoader.wrap(DataLoader(dataset, np.arange(160), 64, shuffle=True, seed=5,
                                                          prefetch=0), comm)
    val = distributed.DistributedLoader.wrap(DataLoader(dataset, np.arange(160, 192), 64, prefetch=0), comm)
    if kill:
        e, b, r = (int(v) for v in kill.split(","))
        train_batches = train._batches

        def batches(epoch, start_batch=0):
            for i, batch in enumerate(train_batches(epoch, start_batch), start=start_batch):
                if (epoch, i, comm.rank) == (e, b, r):
                    os.kill(os.getpid(), 9)
                yield batch
        train._batches = batches

    def to64(loader):  # the loader serves float32; the model is float64
        class Wrapped:
            def __len__(self):
                return len(loader)

            def set_epoch(self, epoch):
                loader.set_epoch(epoch)

            def iter_from(self, start):
                return ((x.astype(np.float64), y) for x, y in loader.iter_from(start))

            def __iter__(self):
                return self.iter_from(0)
        return Wrapped()

    history = fit(net, optimizer, nn.CrossEntropyLoss(), to64(train), to64(val), epochs,
                  checkpoint_path=out / "checkpoint.npz", resume=resume, progress=False,
                  log=print if comm.is_main else None, distributed=distributed.FitHooks(comm))
    if comm.is_main:
        np.savez(out / "final.npz", **{k: np.array(v) for k, v in net.state_dict().items()})
        (out / "history.json").write_text(json.dumps(history.to_dict()))


def worker_fault(out, mode):
    """Rank 1 raises (or hangs) after two steps, while rank 0 goes on training."""
    comm = distributed.init(timeout=3.0 if mode == "hang" else None)
    net = make_model("cnn")
    optimizer = optim.SGD(net.parameters(), lr=0.05)
    net, optimizer = distributed.prepare(net, optimizer, comm)
    loader = DataLoader(synthetic_dataset(), batch_size=64, shuffle=True, seed=7, prefetch=0)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1000):
        for x, y in distributed.DistributedLoader.wrap(loader, comm):
            if comm.rank == 1 and step == 2:
                if mode == "raise":
                    raise RuntimeError("injected fault in rank 1")
                time.sleep(120)
            optimizer.zero_grad()
            loss_fn(net(x.astype(np.float64)), y)
            net.backward(loss_fn.backward())
            optimizer.step()


# ---------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------
def mpi_or_skip():
    pytest.importorskip("mpi4py", reason="mpi4py not installed: distributed tests skipped")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")


def launch(*args, ranks=2, timeout=60):
    """Run this file's worker under ``mpiexec -n ranks``; returns (CompletedProcess, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    done = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, __file__, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return done, time.perf_counter() - started


def check_ok(done):
    assert done.returncode == 0, f"mpiexec failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    mpi_or_skip()
    out = tmp_path_factory.mktemp("equivalence")
    done, _ = launch("equivalence", out, timeout=120)
    check_ok(done)
    with np.load(out / "equivalence.npz") as data:
        return {k: data[k] for k in data.files}


def part(results, name):
    return {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(name + "/") and "__" not in k}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


# ---------------------------------------------------------------------------
# Tests without MPI
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,size,batch,drop_last", [(192, 2, 64, False), (100, 2, 32, False), (101, 3, 30, False),
                                                    (100, 2, 32, True), (7, 4, 4, False)])
def test_shards_are_disjoint_and_cover_the_epoch(n, size, batch, drop_last):
    order = np.random.default_rng(0).permutation(n)
    shards = [distributed.shard_order(order, r, size, batch, drop_last=drop_last) for r in range(size)]
    assert len({len(s) for s in shards}) == 1, "every rank must serve as many items"
    served = np.concatenate(shards)
    if drop_last:
        assert len(served) == (n // batch) * batch and len(set(served)) == len(served)
        assert set(served) == set(order[:len(served)])
    else:
        assert set(served) == set(order), "every item is served"
        assert len(served) - len(set(served)) == (-n) % size, "only the padding repeats"
    # Per step, the ranks' batches together are the single process's batch (of the padded order).
    padded = order[:(n // batch) * batch] if drop_last else np.concatenate([order, order[:(-n) % size]])
    per = batch // size
    for b in range(0, -(-len(padded) // batch)):
        chunk = padded[b * batch:(b + 1) * batch]
        k = len(chunk) // size
        assert np.array_equal(np.concatenate([s[b * per:b * per + k] for s in shards]), chunk)


def test_evaluation_shards_hold_each_item_once():
    order = np.arange(103)
    shards = [distributed.shard_order(order, r, 4, 64, even=False) for r in range(4)]
    assert np.array_equal(np.concatenate(shards), order)


class FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_loader_is_deterministic_per_seed_and_epoch_and_matches_the_single_process():
    dataset = synthetic_dataset(n=200)
    single = DataLoader(dataset, batch_size=64, shuffle=True, seed=3, prefetch=0)
    ranks = [distributed.DistributedLoader.wrap(single, FakeComm(r, 2)) for r in range(2)]
    assert [len(r) for r in ranks] == [len(single)] * 2 == [4] * 2
    for epoch in (0, 1):
        single.set_epoch(epoch)
        whole = list(single)
        parts = []
        for r in ranks:
            r.set_epoch(epoch)
            parts.append(list(r))
        again = ranks[1].iter_from(2)  # resuming inside the epoch serves the same batches
        ranks[1].set_epoch(epoch)
        for b in range(3):
            x0, y0 = parts[0][b]
            x1, y1 = parts[1][b]
            assert np.array_equal(np.concatenate([x0, x1]), whole[b][0])
            assert np.array_equal(np.concatenate([y0, y1]), whole[b][1])
        x_again, _ = next(ranks[1].iter_from(2))
        assert np.array_equal(x_again, parts[1][2][0])
        again.close()
    # The last, short global batch (200 = 3 * 64 + 8) is split evenly: 4 images per rank.
    assert [len(p[3][1]) for p in parts] == [4, 4]
    # Another epoch, another order; another seed, another order.
    assert not np.array_equal(ranks[0].epoch_order(0)[0], ranks[0].epoch_order(1)[0])
    other = distributed.DistributedLoader.wrap(DataLoader(dataset, batch_size=64, shuffle=True, seed=4), FakeComm(0, 2))
    assert not np.array_equal(other.epoch_order(0)[0], ranks[0].epoch_order(0)[0])


def test_loader_refuses_a_batch_that_does_not_divide():
    loader = DataLoader(synthetic_dataset(n=20), batch_size=10, shuffle=True)
    with pytest.raises(ValueError, match="global batch 10 does not divide among 3 ranks"):
        distributed.DistributedLoader.wrap(loader, FakeComm(0, 3))


def test_sync_batchnorm_gradcheck_in_a_world_of_one():
    x = np.random.default_rng(0).normal(size=(6, 3, 4, 5)) * 2 + 1
    gradcheck(distributed.SyncBatchNorm(3, dtype="float64"), x).assert_ok()
    gradcheck(distributed.SyncBatchNorm(3, dtype="float64"), x[:, :, 0, 0]).assert_ok()


def test_sync_batchnorm_equals_batchnorm_in_a_world_of_one():
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(2, 8, 5, 3, 3))
    bn, sync = nn.BatchNorm2d(5, dtype="float64"), distributed.SyncBatchNorm(5, dtype="float64")
    for layer in (bn, sync):
        layer.weight.data[:] = np.arange(1, 6)
    np.testing.assert_allclose(sync(x), bn(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sync.backward(dy), bn.backward(dy), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sync.weight.grad, bn.weight.grad, rtol=1e-12)
    np.testing.assert_allclose(sync.running_var, bn.running_var, rtol=1e-12)


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_keys():
    net = resnet18(4, width=8)
    net.bn1.running_mean[:] = 3.0
    before = {k: np.array(v) for k, v in net.state_dict().items()}
    weight = net.layer1[0].bn1.weight
    optimizer = optim.SGD(net.parameters(), lr=0.1)
    net.eval()
    converted = distributed.convert_sync_batchnorm(net)
    kinds = [type(m).__name__ for m in converted.modules()]
    assert "BatchNorm2d" not in kinds and kinds.count("SyncBatchNorm") == 20
    assert converted.layer1[0].bn1.weight is weight, "the optimizer's parameters are kept"
    assert not converted.layer1[0].bn1.training
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert {id(p) for p in converted.parameters()} == {id(p) for g in optimizer.param_groups for p in g["params"]}


class TwinComm(distributed.LocalCommunicator):
    """Two ranks that compute the same gradients: an allreduce doubles every value."""

    size = 2

    def allreduce_(self, buf, timeout=None):
        buf *= 2
        return buf


def test_averaging_identical_gradients_changes_nothing():
    """Packing into the buckets and back, the flags of parameters without a gradient, the division by N."""
    a, b = make_model("resnet", width=8), make_model("resnet", width=8)
    a.fc.bias.data[:] = b.fc.bias.data[:] = 0.5
    frozen_a, frozen_b = a.fc.bias, b.fc.bias
    opt_a = optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    opt_b = distributed.DistributedOptimizer(optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
                                             TwinComm(), bucket_bytes=4_000)
    assert len(opt_b.buckets()) > 3
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(synthetic_dataset(n=64), batch_size=32, shuffle=True, seed=1, prefetch=0)
    for net, opt, frozen in ((a, opt_a, frozen_a), (b, opt_b, frozen_b)):
        loader.set_epoch(0)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(net(x.astype(np.float64)), y)
            net.backward(loss_fn.backward())
            frozen.grad = None  # a parameter no backward reached: no update, no weight decay
            opt.step()
    assert opt_b.allreduces == 2 * len(opt_b.buckets())
    assert float(b.fc.bias.data[0]) == 0.5
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value, err_msg=key)


def test_buckets_hold_at_most_their_size_and_every_parameter_once():
    net = resnet18(10)
    opt = distributed.DistributedOptimizer(optim.SGD(net.parameters(), lr=0.1), FakeComm(0, 2))
    buckets = opt.buckets()
    params = [p for bucket in buckets for p in bucket.params]
    assert sorted(map(id, params)) == sorted(id(p) for p in net.parameters())
    assert len(buckets) == 2  # 46.8 MB of float32 in buckets of at most 25 MiB
    for bucket in buckets:
        assert sum(p.data.nbytes for p in bucket.params) <= opt.bucket_bytes or len(bucket.params) == 1


def test_setup_explains_a_missing_mpi4py(monkeypatch):
    import argparse
    import builtins

    real_import = builtins.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    args = argparse.Namespace(distributed=True, device="cpu", batch_size=64)
    with pytest.raises(ValueError, match=r"needs mpi4py .*pip install -e \"\.\[mpi\]\".*mpiexec -n N"):
        distributed.setup(args)


def test_tinynet_imports_without_mpi4py():
    code = ("import sys; import tinynet, tinynet.distributed, tinynet.train, tinynet.experiment; "
            "assert 'mpi4py' not in sys.modules, 'imported mpi4py'")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)


# ---------------------------------------------------------------------------
# Tests under mpiexec -n 2
# ---------------------------------------------------------------------------
def test_two_ranks_train_the_cnn_exactly_as_one_process(equivalence):
    reference = single_process("cnn")
    assert max_diff(part(equivalence, "cnn"), reference) < 1e-12
    assert float(equivalence["cnn/__replica_diff__"]) == 0.0, "the two ranks' copies must stay equal"


def test_two_ranks_with_sync_batchnorm_train_resnet18_as_one_process(equivalence):
    reference = single_process("resnet")
    assert max_diff(part(equivalence, "resnet_sync"), reference) < 1e-9
    assert float(equivalence["resnet_sync/__replica_diff__"]) == 0.0


def test_two_ranks_with_plain_batchnorm_train_a_different_resnet18(equivalence):
    reference = single_process("resnet")
    plain, sync = part(equivalence, "resnet_plain"), part(equivalence, "resnet_sync")
    assert max_diff(plain, reference) > 1e3 * max(max_diff(sync, reference), 1e-12)
    assert max_diff(plain, reference) > 1e-6
    # Each rank's running statistics come from its own images; rank 0's are broadcast after every step.
    assert float(equivalence["resnet_plain/__replica_diff__"]) == 0.0


def test_sync_batchnorm_layer_on_two_ranks_is_batchnorm_on_the_whole_batch(equivalence):
    for key in ("y_err", "dx_err", "dgamma_err", "running_var_err"):
        assert float(equivalence[f"layer/{key}"]) < 1e-12, key


def test_a_rank_that_raises_stops_every_rank(tmp_path):
    mpi_or_skip()
    done, seconds = launch("fault", tmp_path, "raise", timeout=60)
    assert done.returncode != 0
    assert seconds < 30, f"took {seconds:.0f} s to stop"
    lines = [line for line in done.stderr.splitlines() if "injected fault" in line]
    assert lines == ["rank 1 of 2: RuntimeError: injected fault in rank 1; stopping every rank"], done.stderr


def test_a_rank_that_hangs_is_stopped_by_the_collective_timeout(tmp_path):
    mpi_or_skip()
    done, seconds = launch("fault", tmp_path, "hang", timeout=60)
    assert done.returncode != 0
    assert seconds < 30, f"took {seconds:.0f} s to stop"
    assert "rank 0 of 2: allreduce of" in done.stderr and "timeout 3 s" in done.stderr, done.stderr


def test_kill_and_resume_under_mpiexec_is_bit_identical(tmp_path):
    mpi_or_skip()
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    check_ok(launch("fit", whole, 3)[0])
    done, seconds = launch("fit", broken, 3, "1,1,1")  # rank 1 dies in epoch 2
    assert done.returncode != 0 and not (broken / "final.npz").exists()
    assert seconds < 30
    done = launch("fit", broken, 3, "", "resume")[0]
    check_ok(done)
    assert "resumed from" in done.stdout and "epoch 2" in done.stdout
    with np.load(whole / "final.npz") as a, np.load(broken / "final.npz") as b:
        assert a.files == b.files
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    history = json.loads((whole / "history.json").read_text())
    assert len(history["epochs"]) == 3
    assert all(e["val_acc"] is not None for e in history["epochs"])
    assert json.loads((broken / "history.json").read_text()) != {}


def test_reduced_validation_equals_the_single_process_evaluation(tmp_path):
    mpi_or_skip()
    check_ok(launch("fit", tmp_path, 1)[0])
    with np.load(tmp_path / "final.npz") as data:
        net = make_model("cnn")
        net.load_state_dict({k: data[k] for k in data.files})
    val = DataLoader(synthetic_dataset(), np.arange(160, 192), 64, prefetch=0)
    x, y = next(iter(val))
    single = evaluate(net, [(x.astype(np.float64), y)], nn.CrossEntropyLoss())
    epoch = json.loads((tmp_path / "history.json").read_text())["epochs"][0]
    assert epoch["val_acc"] == pytest.approx(single["accuracy"], abs=1e-12)
    assert epoch["val_loss"] == pytest.approx(single["loss"], rel=1e-10)


def test_train_resnet_script_runs_under_mpiexec_with_distributed(tmp_path):
    """examples/train_resnet.py --distributed --sync-batchnorm under mpiexec -n 2: rank 0 alone logs and
    writes every file, its t-SNE of all the validation images included."""
    mpi_or_skip()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(ROOT / "examples" / "train_resnet.py"),
                           "--distributed", "--sync-batchnorm", "--out", str(tmp_path), "--epochs", "1", "--limit",
                           "12", "--image-size", "16", "--batch-size", "32", "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=env)
    check_ok(done)
    assert done.stdout.count("Test accuracy:") == 1 and done.stdout.count("epoch   1/1") == 1, "only rank 0 logs"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "tsne_validation_2d.png" in metrics["figures"] and "tsne_test_3d.png" in metrics["figures"]
    assert all((tmp_path / name).exists() for name in metrics["figures"])
    assert metrics["split"]["validation"] == 24 and metrics["history"]["epochs"][0]["val_acc"] is not None
    assert metrics["world_size"] == 2


@pytest.mark.parametrize("differ, named", [("classes", "its classes"), ("images", "its images (--data)")])
def test_ranks_started_with_different_data_refuse_to_train_together(tmp_path, differ, named):
    """Two ranks, two --data folders (other class names, or other images under the same names), as many
    images each: before the fix they trained together and reported success."""
    mpi_or_skip()
    from fault_inject import image_folder

    first = image_folder(tmp_path / "first")
    second = image_folder(tmp_path / "second")
    if differ == "classes":
        for old, new in (("dark", "night"), ("bright", "day")):
            (second / old).rename(second / new)
    else:
        (second / "dark" / "0.png").write_bytes((second / "bright" / "0.png").read_bytes())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    rank = [sys.executable, str(ROOT / "examples" / "train_cnn.py"), "--distributed", "--out", str(tmp_path / "out"),
            "--epochs", "1", "--image-size", "16", "--batch-size", "8", "--no-progress"]
    done = subprocess.run([str(MPIEXEC), "-n", "1", *rank, "--data", str(first), ":", "-n", "1", *rank, "--data",
                           str(second)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    # one line from each rank (counted in the text: mpiexec forwards the ranks' streams as they come)
    assert done.stderr.count("train_cnn.py: error:") == 2, done.stderr
    assert done.stderr.count(f"rank 1 differs from rank 0 in {named} (1 of 2 ranks differ)") == 2, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "metrics.json").exists()


if __name__ == "__main__":  # the worker, under mpiexec
    scenario, out = sys.argv[1], pathlib.Path(sys.argv[2])
    if scenario == "equivalence":
        worker_equivalence(out)
    elif scenario == "fit":
        worker_fit(out, int(sys.argv[3]), kill=sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None,
                   resume=len(sys.argv) > 5)
    elif scenario == "fault":
        worker_fault(out, sys.argv[3])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


def test_an_error_in_a_world_of_one_exits_with_its_status_without_aborting():
    """finish() aborts the MPI job only when other ranks could be waiting: alone, the status is returned.

    (An in-process command after distributed.init() ended the whole test session with MPI_Abort.)
    """
    pytest.importorskip("mpi4py", reason="mpi4py not installed")
    code = ("import sys\nfrom tinynet import distributed\n"
            "world = distributed.init()\nassert world.size == 1\nsys.exit(world.finish(2))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "stopping every rank" not in result.stderr
