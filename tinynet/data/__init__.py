"""Image datasets, the assignment's split, augmentations and a background-threaded loader.

The path from files to a training batch::

    dataset = ImageFolder("data/animals", size=64)       # decoded once: uint8 (N, 64, 64, 3)
    train, val, test = stratified_split(dataset.labels, seed=42)
    augment = Compose([RandomHorizontalFlip(0.5), RandomRotation(10),
                       ColorJitter(0.1, 0.1, 0.1, 0.1)])
    loader = DataLoader(dataset, train, batch_size=64, shuffle=True, transform=augment, augment_copy=True)
    for x, y in loader:                                   # x float32 (64, 3, 64, 64), y int64 (64,)
        ...

Modules: :mod:`~tinynet.data.decode` (files to arrays),
:mod:`~tinynet.data.datasets` (the dataset interface, arrays, digits),
:mod:`~tinynet.data.folder` (folder per class), :mod:`~tinynet.data.archive`
(zip archives such as Tiny-ImageNet), :mod:`~tinynet.data.split`,
:mod:`~tinynet.data.transforms`, :mod:`~tinynet.data.loader`.
"""
from .archive import ZipImageDataset
from .datasets import ArrayDataset, Dataset, DecodedDataset, digits_dataset
from .decode import DecodeReport, SkippedFile
from .folder import ImageFolder
from .loader import DataLoader
from .split import stratified_split
from .transforms import (ColorJitter, Compose, Normalize, RandomHorizontalFlip, RandomRotation,
                         random_crop_flip_batch, to_float_chw)

__all__ = [
    "Dataset", "ArrayDataset", "DecodedDataset", "ImageFolder", "ZipImageDataset", "digits_dataset",
    "SkippedFile", "DecodeReport", "stratified_split", "DataLoader",
    "Compose", "RandomHorizontalFlip", "RandomRotation", "ColorJitter", "Normalize", "to_float_chw",
    "random_crop_flip_batch",
]
