import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from tinynet.data import ArrayDataset, DataLoader, RandomHorizontalFlip, random_crop_flip_batch


@pytest.fixture
def dataset():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8)
    return ArrayDataset(images, np.arange(50) % 5, list("abcde"))


def paint(image, rng):
    """A stand-in augmentation whose result shows which random number it drew: a flat random colour."""
    return Image.new("RGB", image.size, tuple(int(v) for v in rng.integers(0, 256, 3)))


def pixels(x):
    """Undo Normalize(0.5, 0.5): float32 (B, 3, H, W) back to uint8 (B, H, W, 3)."""
    return np.rint((x * 0.5 + 0.5) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def loader_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("tinynet-loader")]


def collect(loader):
    batches = list(loader)
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def test_batches_have_the_networks_shapes_and_dtypes(dataset):
    indices = np.arange(3, 48)
    loader = DataLoader(dataset, indices, batch_size=16)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [16, 16, 13]
    x, y = batches[0]
    assert x.dtype == np.float32 and x.shape == (16, 3, 6, 6) and y.dtype == np.int64
    np.testing.assert_array_equal(pixels(x), dataset.images(indices[:16]))
    np.testing.assert_array_equal(y, dataset.labels[indices[:16]])
    assert len(DataLoader(dataset, indices, batch_size=16, drop_last=True)) == 2
    assert [len(y) for _, y in DataLoader(dataset, indices, batch_size=16, drop_last=True)] == [16, 16]


def test_shuffle_is_reproducible_per_seed_and_epoch(dataset):
    loader = DataLoader(dataset, batch_size=8, shuffle=True, seed=3)
    first, second = collect(loader), collect(loader)  # two loops: epochs 0 and 1
    assert loader.epoch == 2
    assert sorted(first[1]) == sorted(dataset.labels) and not np.array_equal(first[0], second[0])
    loader.set_epoch(1)
    np.testing.assert_array_equal(collect(loader)[0], second[0])
    again = DataLoader(dataset, batch_size=8, shuffle=True, seed=3)
    np.testing.assert_array_equal(collect(again)[0], first[0])
    other_seed = DataLoader(dataset, batch_size=8, shuffle=True, seed=4)
    assert not np.array_equal(collect(other_seed)[0], first[0])
    sources, augmented = loader.epoch_order(1)
    np.testing.assert_array_equal(pixels(second[0]), dataset.images(sources))
    assert not augmented.any()


def test_augment_copy_serves_plain_and_freshly_augmented_copies(dataset):
    indices = np.arange(20)
    loader = DataLoader(dataset, indices, batch_size=8, shuffle=True, transform=paint, augment_copy=True)
    assert loader.num_items == 40 and len(loader) == 5
    epochs = []
    for epoch in range(2):
        x, y = collect(loader)
        sources, augmented = loader.epoch_order(epoch)
        assert sorted(sources) == sorted([*indices, *indices]) and augmented.sum() == 20
        for k in np.flatnonzero(augmented):
            assert len(np.unique(pixels(x[k:k + 1]).reshape(-1, 3), axis=0)) == 1  # painted flat
        np.testing.assert_array_equal(pixels(x[~augmented]), dataset.images(sources[~augmented]))
        np.testing.assert_array_equal(y, dataset.labels[sources])
        epochs.append(x[augmented][np.argsort(sources[augmented])])
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch augments again


def test_augmentations_do_not_depend_on_threads_or_prefetch(dataset):
    options = dict(batch_size=7, shuffle=True, seed=1, transform=RandomHorizontalFlip(), augment_copy=True,
                   batch_transform=lambda images, rng: random_crop_flip_batch(images, rng, padding=2))
    reference = collect(DataLoader(dataset, prefetch=0, **options))
    for prefetch, workers in [(1, 1), (4, 3)]:
        got = collect(DataLoader(dataset, prefetch=prefetch, workers=workers, **options))
        np.testing.assert_array_equal(got[0], reference[0])
        np.testing.assert_array_equal(got[1], reference[1])


def test_breaking_out_early_leaves_no_thread_running(dataset):
    loader = DataLoader(dataset, batch_size=4, transform=paint, prefetch=3, workers=2)
    for _ in loader:
        break
    assert loader_threads() == []
    iterator = iter(loader)
    next(iterator)
    assert loader_threads()
    del iterator  # dropped without finishing: its threads stop too
    assert loader_threads() == []


def test_a_worker_exception_is_raised_in_the_caller_with_its_traceback(dataset):
    def broken(image, rng):
        raise RuntimeError("augmentation failed")

    with pytest.raises(RuntimeError, match="augmentation failed") as error:
        for _ in DataLoader(dataset, batch_size=4, transform=broken):
            pass
    assert any(entry.name == "broken" for entry in error.traceback)
    assert loader_threads() == []


def test_a_transform_that_changes_the_size_is_named(dataset):
    def shrink(image, rng):
        return image.resize((3, 3))

    with pytest.raises(ValueError, match="shape \\(6, 6, 3\\) into shape \\(3, 3, 3\\), in batch 0"):
        next(iter(DataLoader(dataset, transform=shrink)))


def test_an_unfinished_loader_does_not_hang_interpreter_exit(dataset):
    script = textwrap.dedent("""
        import numpy as np
        from tinynet.data import ArrayDataset, DataLoader, RandomHorizontalFlip
        images = np.zeros((500, 16, 16, 3), np.uint8)
        loader = DataLoader(ArrayDataset(images, np.zeros(500, int), ["a"]), batch_size=4,
                            transform=RandomHorizontalFlip(), prefetch=8, workers=2)
        iterator = iter(loader)
        next(iterator)
        print("exiting")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr


def test_invalid_arguments_say_what_was_expected(dataset):
    with pytest.raises(ValueError, match="indices must lie in \\[0, 50\\)"):
        DataLoader(dataset, [0, 50])
    with pytest.raises(ValueError, match="non-empty 1-D integer array"):
        DataLoader(dataset, [])
    with pytest.raises(ValueError, match="augment_copy=True needs a transform"):
        DataLoader(dataset, augment_copy=True)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        DataLoader(dataset, batch_size=0)


def test_throughput_counts_images_per_second_and_leaves_the_epoch_and_no_thread(dataset):
    loader = DataLoader(dataset, batch_size=8, shuffle=True, batch_transform=random_crop_flip_batch, prefetch=2)
    loader.set_epoch(3)
    assert loader.throughput(batches=4) > 0
    assert loader.epoch == 3 and loader_threads() == []
    assert loader.throughput(batches=100) > 0  # more batches than an epoch has: the whole epoch
    with pytest.raises(ValueError, match="at least 1"):
        loader.throughput(batches=0)
