import numpy as np
import pytest

from tinynet.data import ArrayDataset, digits_dataset


def test_array_dataset_serves_views_and_copies(rng):
    images = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    dataset = ArrayDataset(images, [0, 1, 1, 2, 2, 2], ["a", "b", "c"])
    assert len(dataset) == 6 and dataset.image_size == (4, 5) and dataset.labels.dtype == np.int64
    assert dataset.class_counts().tolist() == [1, 2, 3]
    with pytest.raises(ValueError):  # read-only: a transform cannot edit the dataset in place
        dataset.image(0)[0, 0, 0] = 1
    batch = dataset.images([5, 0])
    batch[:] = 0  # a copy: the dataset keeps its pixels
    np.testing.assert_array_equal(dataset.images([5, 0]), images[[5, 0]])
    assert "6 images, 3 classes, 4x5" in repr(dataset)


def test_array_dataset_says_what_it_expected(rng):
    images = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8 images of shape \\(N, H, W, 3\\), received float64"):
        ArrayDataset(images.astype(float), [0, 0, 0], ["a"])
    with pytest.raises(ValueError, match="expected 3 integer labels"):
        ArrayDataset(images, [0, 0], ["a"])
    with pytest.raises(ValueError, match="labels must lie in \\[0, 1\\)"):
        ArrayDataset(images, [0, 1, 0], ["a"])


def test_digits_are_grey_rgb_images_of_ten_classes():
    from sklearn.datasets import load_digits

    dataset = digits_dataset(size=32)
    assert dataset.array.shape == (1797, 32, 32, 3) and dataset.array.dtype == np.uint8
    assert dataset.classes == [str(d) for d in range(10)]
    np.testing.assert_array_equal(dataset.labels, load_digits().target)
    assert np.array_equal(dataset.array[..., 0], dataset.array[..., 1])
    assert np.array_equal(dataset.array[..., 0], dataset.array[..., 2])
    assert dataset.array.max() == 255 and dataset.array.min() == 0
