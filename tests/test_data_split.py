import numpy as np
import pytest

from tinynet.data import stratified_split


def uneven_labels():
    """Seven classes of 12 to 114 images, shuffled: popular-animals-like imbalance."""
    counts = [12, 40, 73, 90, 101, 114, 33]
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(0).permutation(labels), np.array(counts)


def test_sizes_are_70_20_10_and_the_parts_partition_the_set():
    labels = np.repeat(np.arange(22), 90)
    train, val, test = stratified_split(labels, seed=42)
    assert (len(train), len(val), len(test)) == (1386, 396, 198)
    assert all(part.dtype == np.int64 for part in (train, val, test))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(labels)))


def test_every_class_keeps_its_share_in_every_part():
    labels, counts = uneven_labels()
    for part, share in zip(stratified_split(labels, seed=42), (0.7, 0.2, 0.1)):
        per_class = np.bincount(labels[part], minlength=len(counts))
        # Each stage rounds a class's count by less than one image; two stages, less than two.
        assert np.all(np.abs(per_class - share * counts) < 2), (share, per_class, share * counts)


def test_is_the_assignments_two_train_test_split_calls():
    from sklearn.model_selection import train_test_split

    labels, _ = uneven_labels()
    train, val, test = stratified_split(labels, seed=7)
    expected_train, rest = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=7, stratify=labels)
    expected_val, expected_test = train_test_split(rest, test_size=1 / 3, random_state=7, stratify=labels[rest])
    for got, expected in ((train, expected_train), (val, expected_val), (test, expected_test)):
        np.testing.assert_array_equal(got, expected)
    assert len(val) > len(test)  # validation is the larger two thirds of the rest


def test_seed_reproduces_and_changes_the_split():
    labels, _ = uneven_labels()
    first, again, other = (stratified_split(labels, seed=s) for s in (42, 42, 43))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_too_few_images_in_a_class_names_the_class():
    labels = np.array([0] * 20 + [1] * 1 + [2] * 20)
    with pytest.raises(ValueError, match="'bison' \\(label 1\\)"):
        stratified_split(labels, classes=["bear", "bison", "cat"])
    # 4 images: 2 reach the 30 % rest at best, so the second split fails there.
    with pytest.raises(ValueError, match="30 % rest.*label 1"):
        stratified_split(np.array([0] * 20 + [1] * 4 + [2] * 20))
    with pytest.raises(ValueError, match="too few for 20 classes"):
        stratified_split(np.repeat(np.arange(20), 3))
