"""Data augmentation and normalisation, with torchvision's semantics.

Two kinds of transform:

- **Per-image**, on PIL images, as torchvision applies them in a PyTorch
  pipeline: ``transform(image, rng) -> image``.  Every random choice is drawn
  from ``rng``, a :class:`numpy.random.Generator`, so one seed reproduces an
  epoch's augmentations.  :class:`RandomHorizontalFlip`,
  :class:`RandomRotation`, :class:`ColorJitter`, chained by :class:`Compose`.
- **Per-batch**, vectorised over a uint8 batch ``(N, H, W, C)``:
  :func:`random_crop_flip_batch` (the Tiny-ImageNet pretraining recipe) and
  :class:`Normalize` / :func:`to_float_chw`, which turn the batch into the
  float32 ``(N, C, H, W)`` a network takes.

torchvision draws its random numbers from PyTorch's generator, so the same
seed does not give the same augmentation here; the distributions and the
image operations are the same.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageEnhance

from .. import backend

__all__ = [
    "Compose", "RandomHorizontalFlip", "RandomRotation", "ColorJitter",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue",
    "Normalize", "to_float_chw", "random_crop_flip_batch",
]

PerImage = Callable[[Image.Image, np.random.Generator], Image.Image]


class Compose:
    """Apply ``transforms`` in order, each with the same generator: ``t_k(... t_1(image, rng) ..., rng)``."""

    def __init__(self, transforms: Sequence[PerImage]):
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for transform in self.transforms:
            image = transform(image, rng)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomRotation:
    """Rotate by an angle drawn uniformly from ``[-degrees, degrees]`` (or from ``degrees = (lo, hi)``).

    As torchvision's defaults: counter-clockwise for a positive angle, about
    the image centre, NEAREST resampling, the same size as the input
    (``expand=False``: the corners are cut off), and the area uncovered by the
    rotated image filled with ``fill`` (0, black).
    """

    def __init__(self, degrees=10.0, fill: int = 0):
        if np.isscalar(degrees):
            if degrees < 0:
                raise ValueError(f"RandomRotation: degrees must be non-negative, got {degrees}")
            degrees = (-degrees, degrees)
        self.degrees = (float(degrees[0]), float(degrees[1]))
        self.fill = fill

    def get_params(self, rng: np.random.Generator) -> float:
        """The angle in degrees, uniform in ``self.degrees``."""
        return float(rng.uniform(*self.degrees))

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        fill = (self.fill,) * len(image.getbands())
        return image.rotate(self.get_params(rng), Image.NEAREST, expand=False, fillcolor=fill)

    def __repr__(self) -> str:
        return f"RandomRotation(degrees={self.degrees}, fill={self.fill})"


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """Blend with black: ``out = factor * x``, clipped to 0..255 (PIL ``ImageEnhance.Brightness``)."""
    return ImageEnhance.Brightness(image).enhance(factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """Blend with the mean grey: ``out = m + factor * (x - m)``, m the rounded mean of the image's L channel.

    PIL's ``ImageEnhance.Contrast``; L is ITU-R 601 luma, 0.299 R + 0.587 G + 0.114 B.
    """
    return ImageEnhance.Contrast(image).enhance(factor)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    """Blend with the image's own greyscale: ``out = L + factor * (x - L)`` per pixel (``ImageEnhance.Color``)."""
    return ImageEnhance.Color(image).enhance(factor)


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """Turn the hue by ``hue_factor`` of a full turn, ``hue_factor`` in [-0.5, 0.5], as torchvision does.

    In PIL's HSV the hue is a byte, 256 steps a turn; it is shifted by
    ``trunc(hue_factor * 255)`` steps modulo 256, so hues wrap around the
    colour circle (torchvision adds the byte ``uint8(hue_factor * 255)``,
    which on x86 is that same value modulo 256).  Greyscale modes are
    returned unchanged.
    """
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"adjust_hue: hue_factor must lie in [-0.5, 0.5], got {hue_factor}")
    if image.mode in ("L", "1", "I", "F"):
        return image
    hue, saturation, value = image.convert("HSV").split()
    shifted = (np.asarray(hue, dtype=np.int64) + int(hue_factor * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8)), saturation, value)).convert(image.mode)


class ColorJitter:
    """Randomly change brightness, contrast, saturation and hue, in a random order (torchvision's ``ColorJitter``).

    Each factor is drawn uniformly: brightness, contrast and saturation from
    ``[max(0, 1 - b), 1 + b]``, the hue shift from ``[-h, h]`` (a fraction of
    a full turn, ``h <= 0.5``).  A pair ``(lo, hi)`` gives the range
    directly; 0 turns that adjustment off.  The four adjustments are then
    applied in a random permutation: :func:`adjust_brightness`,
    :func:`adjust_contrast`, :func:`adjust_saturation`, :func:`adjust_hue`.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        self.brightness = self._range(brightness, "brightness", center=1.0, bound=(0.0, np.inf))
        self.contrast = self._range(contrast, "contrast", center=1.0, bound=(0.0, np.inf))
        self.saturation = self._range(saturation, "saturation", center=1.0, bound=(0.0, np.inf))
        self.hue = self._range(hue, "hue", center=0.0, bound=(-0.5, 0.5))

    @staticmethod
    def _range(value, name: str, center: float, bound: tuple[float, float]):
        """``value`` as a ``(lo, hi)`` range, or None when it leaves the image unchanged."""
        if np.isscalar(value):
            if value < 0:
                raise ValueError(f"ColorJitter: {name} must be non-negative, got {value}")
            value = (max(center - value, bound[0]), center + value)
        lo, hi = float(value[0]), float(value[1])
        if not bound[0] <= lo <= hi <= bound[1]:
            raise ValueError(f"ColorJitter: {name} range must satisfy {bound[0]} <= lo <= hi <= {bound[1]}, "
                             f"got ({lo}, {hi})")
        return None if lo == hi == center else (lo, hi)

    def get_params(self, rng: np.random.Generator):
        """``(order, brightness, contrast, saturation, hue)``: a permutation of 0..3 and the four factors.

        A factor is None when its adjustment is off.  Drawn in torchvision's
        order: the permutation first, then the factors.
        """
        order = rng.permutation(4)
        factors = [None if span is None else float(rng.uniform(*span))
                   for span in (self.brightness, self.contrast, self.saturation, self.hue)]
        return (order, *factors)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        order, *factors = self.get_params(rng)
        adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for k in order:
            if factors[k] is not None:
                image = adjustments[k](image, factors[k])
        return image

    def __repr__(self) -> str:
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})")


def to_float_chw(images):
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)``, ``x / 255`` (torchvision's ``ToTensor``, batched).

    One pass: the cast, the transpose to channels-first and the division
    happen in a single ufunc call.  NumPy or CuPy in, the same out.
    """
    xp = backend.get_array_module(images)
    if images.dtype != xp.uint8 or images.ndim != 4:
        raise ValueError(f"to_float_chw: expected a uint8 batch of shape (N, H, W, C), "
                         f"received {images.dtype} {tuple(images.shape)}")
    n, h, w, c = images.shape
    out = xp.empty((n, c, h, w), dtype=xp.float32)
    xp.divide(images.transpose(0, 3, 1, 2), xp.float32(255), out=out, dtype=xp.float32)
    return out


class Normalize:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)``: ``(x / 255 - mean[c]) / std[c]``.

    torchvision's ``ToTensor()`` then ``Normalize(mean, std)``, batched, in
    the same float32 operations in the same order, so the values are
    bit-identical to PyTorch's.  ``mean`` and ``std`` are one number for all
    channels or one per channel.  With the defaults 0.5 / 0.5, 0 maps to -1
    and 255 to 1.  Three passes over the batch (the first one casts and
    transposes too); folding them into one multiply-add would save a pass
    but change the last bit of some values.
    """

    def __init__(self, mean=0.5, std=0.5):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=np.float32))
        self.std = np.atleast_1d(np.asarray(std, dtype=np.float32))
        if self.mean.ndim != 1 or self.std.ndim != 1 or np.any(self.std == 0):
            raise ValueError(f"Normalize: mean and std must be numbers or 1-D per-channel sequences, std nonzero; "
                             f"got mean={mean!r}, std={std!r}")

    def __call__(self, images):
        out = to_float_chw(images)
        channels = out.shape[1]
        for name, value in (("mean", self.mean), ("std", self.std)):
            if len(value) not in (1, channels):
                raise ValueError(f"Normalize: {name} has {len(value)} values for a batch with {channels} channels")
        xp = backend.get_array_module(out)
        out -= xp.asarray(self.mean).reshape(1, -1, 1, 1)
        out /= xp.asarray(self.std).reshape(1, -1, 1, 1)
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


def random_crop_flip_batch(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Random crop with zero padding, then a random horizontal flip, for a whole uint8 batch ``(N, H, W, C)``.

    torchvision's ``RandomCrop(H, padding)`` then ``RandomHorizontalFlip()``
    for every image: the image is padded with ``padding`` zero pixels on each
    side (RandomCrop's default ``fill=0``), an ``H x W`` window is cut at an
    offset drawn uniformly from ``0..2*padding`` in each direction, and the
    result is mirrored with probability 1/2.  Returns a new uint8 array
    ``(N, H, W, C)``; runs on the host (NumPy).

    No loop over images or pixels: all windows are gathered in one indexing
    operation on a sliding-window view of the padded batch.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"random_crop_flip_batch: expected a uint8 NumPy batch of shape (N, H, W, C), "
                         f"received {images.dtype} {tuple(images.shape)}")
    n, h, w, c = images.shape
    p = padding
    padded = np.zeros((n, h + 2 * p, w + 2 * p, c), dtype=np.uint8)
    padded[:, p:p + h, p:p + w] = images
    top = rng.integers(0, 2 * p + 1, size=n)
    left = rng.integers(0, 2 * p + 1, size=n)
    flip = rng.random(n) < 0.5
    # windows[i, y, x, 0] is the H x W x C crop of image i whose top-left corner is (y, x).
    windows = sliding_window_view(padded, (h, w, c), axis=(1, 2, 3))
    out = windows[np.arange(n), top, left, 0]
    out[flip] = out[flip, :, ::-1]
    return out
