"""Transforms against their formulas (torchvision itself cannot be imported here to compare)."""
import numpy as np
import pytest
from PIL import Image

from tinynet.data import (ColorJitter, Compose, Normalize, RandomHorizontalFlip, RandomRotation,
                          random_crop_flip_batch, to_float_chw)
from tinynet.data.transforms import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation


def photo(rng, height=12, width=10):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def applied(transform, array, rng):
    return np.asarray(transform(Image.fromarray(array), rng))


def test_flip_mirrors_with_probability_p(rng):
    image = photo(rng)
    np.testing.assert_array_equal(applied(RandomHorizontalFlip(1.0), image, rng), image[:, ::-1])
    np.testing.assert_array_equal(applied(RandomHorizontalFlip(0.0), image, rng), image)
    flips = [not np.array_equal(applied(RandomHorizontalFlip(0.5), image, rng), image) for _ in range(2000)]
    assert abs(np.mean(flips) - 0.5) < 0.05


def test_rotation_keeps_the_size_fills_corners_with_zero_and_turns_counter_clockwise(rng):
    white = np.full((32, 32, 3), 255, np.uint8)
    turned = applied(RandomRotation(degrees=(10, 10)), white, rng)
    assert turned.shape == white.shape
    assert np.all(turned[[0, 0, -1, -1], [0, -1, 0, -1]] == 0)  # corners uncovered: fill 0
    assert np.all(turned[12:20, 12:20] == 255)
    square = photo(rng, 9, 9)
    np.testing.assert_array_equal(applied(RandomRotation(degrees=(90, 90)), square, rng), np.rot90(square))


def test_rotation_angles_are_uniform_in_the_range(rng):
    angles = np.array([RandomRotation(10).get_params(rng) for _ in range(4000)])
    assert angles.min() >= -10 and angles.max() <= 10
    assert angles.min() < -9.9 and angles.max() > 9.9 and abs(angles.mean()) < 0.3


def test_jitter_factors_lie_in_torchvisions_ranges(rng):
    jitter = ColorJitter(0.1, 0.2, 0.3, 0.1)
    draws = [jitter.get_params(rng) for _ in range(2000)]
    for order, *_ in draws:
        assert sorted(order) == [0, 1, 2, 3]
    factors = np.array([draw[1:] for draw in draws])
    for k, (lo, hi) in enumerate([(0.9, 1.1), (0.8, 1.2), (0.7, 1.3), (-0.1, 0.1)]):
        assert lo <= factors[:, k].min() < lo + 0.01 and hi - 0.01 < factors[:, k].max() <= hi
    assert ColorJitter(brightness=2.0).brightness == (0.0, 3.0)  # the lower end is clipped at 0
    assert ColorJitter().get_params(rng)[1:] == (None, None, None, None)


def test_jitter_without_any_adjustment_is_the_identity(rng):
    image = photo(rng)
    np.testing.assert_array_equal(applied(ColorJitter(), image, rng), image)


def test_jitter_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.6)
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=-0.1)


def luma(image):
    """ITU-R 601 luma, as PIL's convert("L")."""
    return np.asarray(Image.fromarray(image).convert("L")).astype(np.float64)


@pytest.mark.parametrize("factor", [0.9, 1.1, 1.7])
def test_brightness_contrast_saturation_follow_their_blend_formulas(factor, rng):
    x = photo(rng, 16, 16).astype(np.float64)
    image = Image.fromarray(x.astype(np.uint8))
    grey = luma(x.astype(np.uint8))[..., None]
    mean = np.floor(grey.mean() + 0.5)
    cases = [
        (adjust_brightness, factor * x),
        (adjust_contrast, mean + factor * (x - mean)),
        (adjust_saturation, grey + factor * (x - grey)),
    ]
    for adjust, formula in cases:
        expected = np.clip(formula, 0, 255)
        got = np.asarray(adjust(image, factor)).astype(np.float64)
        assert np.abs(got - expected).max() <= 1.0, adjust.__name__  # PIL truncates a float32 blend


def hue_of(image):
    return np.asarray(Image.fromarray(image).convert("HSV"))[..., 0].astype(np.int64)


@pytest.mark.parametrize("hue_factor", [0.1, -0.1, 0.5, -0.5])
def test_hue_shift_turns_the_hue_byte_and_wraps_around(hue_factor):
    # Saturated, bright colours: their hue survives the RGB -> HSV -> RGB round trip.
    hsv = np.stack(np.broadcast_arrays(np.arange(0, 256, 8)[None, :], 255, 255), axis=-1).astype(np.uint8)
    image = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    shifted = hue_of(np.asarray(adjust_hue(Image.fromarray(image), hue_factor)))
    expected = (hue_of(image) + int(hue_factor * 255)) % 256
    circular = np.minimum((shifted - expected) % 256, (expected - shifted) % 256)
    assert circular.max() <= 1
    assert np.any(hue_of(image) + int(hue_factor * 255) != expected)  # some hues did wrap around


def test_hue_factor_out_of_range_raises(rng):
    with pytest.raises(ValueError, match="hue_factor"):
        adjust_hue(Image.fromarray(photo(rng)), 0.7)


def test_compose_applies_in_order_with_one_generator(rng):
    seen = []

    def record(tag):
        def transform(image, generator):
            seen.append((tag, generator))
            return image
        return transform

    Compose([record("a"), record("b")])(Image.fromarray(photo(rng)), rng)
    assert seen == [("a", rng), ("b", rng)]


def test_normalize_maps_0_to_minus_1_and_255_to_1_channels_first(rng):
    batch = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    batch[0, 0, 0] = 0
    batch[0, 0, 1] = 255
    x = Normalize(0.5, 0.5)(batch)
    assert x.dtype == np.float32 and x.shape == (4, 3, 5, 6)
    assert np.all(x[0, :, 0, 0] == -1) and np.all(x[0, :, 0, 1] == 1)
    np.testing.assert_allclose(x, (batch.transpose(0, 3, 1, 2) / 255 - 0.5) / 0.5, atol=1e-6)


def test_normalize_per_channel_is_torchvisions_float32_arithmetic(rng):
    batch = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    chw = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)  # ToTensor
    expected = (chw - np.float32(mean).reshape(1, 3, 1, 1)) / np.float32(std).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(Normalize(mean, std)(batch), expected)
    np.testing.assert_array_equal(to_float_chw(batch), chw)
    with pytest.raises(ValueError, match="2 values for a batch with 3 channels"):
        Normalize((0.5, 0.5), 0.5)(batch)


def crop_flip_reference(image, padding, top, left, flip):
    """The obviously correct version: pad with zeros, cut the window, mirror it."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    window = padded[top:top + h, left:left + w]
    return window[:, ::-1] if flip else window


def test_crop_flip_batch_is_some_zero_padded_crop_mirrored_or_not(rng):
    images = rng.integers(1, 256, (300, 8, 8, 3), dtype=np.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip_batch(images, rng, padding=4)
    assert out.shape == images.shape and out.dtype == np.uint8
    found = []
    for image, result in zip(images, out):
        matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if np.array_equal(crop_flip_reference(image, 4, top, left, flip), result)]
        assert matches, "output is no zero-padded crop of its input"
        found.append(matches[0])
    tops, lefts, flips = map(np.array, zip(*found))
    assert set(tops) == set(lefts) == set(range(9))  # every offset 0..2*padding drawn
    assert 0.4 < flips.mean() < 0.6
    assert np.any(out == 0) and np.all(out[(tops == 4) & (lefts == 4)] > 0)


def test_crop_flip_batch_without_padding_only_flips(rng):
    images = rng.integers(0, 256, (50, 5, 7, 3), dtype=np.uint8)
    out = random_crop_flip_batch(images, rng, padding=0)
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    assert np.all(flipped | kept) and flipped.any() and kept.any()


@pytest.mark.gpu
def test_normalize_on_the_gpu_equals_the_host(rng):
    from tinynet import backend

    if not backend.gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    batch = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    normalize = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    on_gpu = normalize(backend.to_device(batch, "cuda"))
    assert backend.is_cupy_array(on_gpu)
    np.testing.assert_array_equal(backend.to_numpy(on_gpu), normalize(batch))
