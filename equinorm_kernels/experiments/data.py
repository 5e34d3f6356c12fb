"""Datasets for the experiments: scikit-learn's bundled digits (offline) and CIFAR-10 from disk.

Images are float32 tensors (N, C, H, W) with pixels in [0, 1]: EquiNorm balances weights against
non-negative inputs, so the pixels are scaled but never centred.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIGITS_TEST_FRACTION = 0.2
SPLIT_SEED = 0
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_IMAGE_SHAPE = (3, 32, 32)


class DatasetError(ValueError):
    """A dataset directory that is missing or not in the expected format."""


@dataclass(frozen=True)
class Dataset:
    """A fixed train/test split of images in [0, 1] with integer labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one image, (C, H, W)."""
        return tuple(self.train_images.shape[1:])

    def describe(self) -> dict[str, object]:
        """Name, sizes and shapes, for the results file."""
        return {
            "name": self.name,
            "train_samples": len(self.train_labels),
            "test_samples": len(self.test_labels),
            "in_shape": list(self.in_shape),
            "num_classes": self.num_classes,
        }


def load_digits_dataset() -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits, pixels 0..16 scaled to [0, 1].

    The split is stratified, 80/20, with a fixed seed, so every run sees the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return _to_dataset("digits", 10, train_x, train_y, test_x, test_y)


def load_cifar10(path: str | Path) -> Dataset:
    """CIFAR-10 in the python pickle format, pixels / 255.

    Args:
        path: the ``cifar-10-batches-py`` directory (``data_batch_1`` .. ``data_batch_5`` and
            ``test_batch``) or its parent. The files are unpickled: load only files you trust.

    Raises:
        DatasetError: the directory or a batch file is missing, or a file is not a CIFAR-10 batch.
    """
    folder = find_cifar_folder(Path(path))
    train = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    test_x, test_y = _read_cifar_batch(folder / CIFAR_TEST_FILE)
    train_x = np.concatenate([images for images, _ in train])
    train_y = np.concatenate([labels for _, labels in train])
    return _to_dataset("cifar10", 10, train_x, train_y, test_x, test_y)


def find_cifar_folder(path: Path) -> Path:
    """The directory holding the CIFAR-10 batch files: ``path`` itself or ``path/cifar-10-batches-py``."""
    if not path.is_dir():
        raise DatasetError(f"CIFAR-10 directory not found: {path}")
    nested = path / CIFAR_FOLDER
    folder = nested if nested.is_dir() else path
    missing = [name for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"{folder} is not a CIFAR-10 directory: missing {', '.join(missing)} (expected the python "
            f"version, data_batch_1..5 and test_batch, directly or under {CIFAR_FOLDER}/)"
        )
    return folder


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with file.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except Exception as error:  # pickle raises many types on a corrupt file; all mean the same here
        raise DatasetError(f"{file} is not a readable CIFAR-10 batch: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"{file} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    pixels = int(np.prod(CIFAR_IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels or labels.shape != (data.shape[0],):
        raise DatasetError(
            f"{file}: expected uint8 data of shape (N, {pixels}) and N labels, "
            f"got {data.dtype} data of shape {data.shape} and labels of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{file}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    images = (data.reshape(-1, *CIFAR_IMAGE_SHAPE) / 255.0).astype(np.float32)
    return images, labels.astype(np.int64)


def take_train_subset(dataset: Dataset, samples: int | None, seed: int = SPLIT_SEED) -> Dataset:
    """The dataset with at most ``samples`` training samples, a fixed random choice; test set unchanged."""
    if samples is None or samples >= len(dataset.train_labels):
        return dataset
    if samples < 1:
        raise ValueError(f"the training subset needs at least 1 sample, got {samples}")
    chosen = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(seed))[:samples]
    chosen = chosen.sort().values  # keep the original order: only the choice is random
    return Dataset(
        dataset.name,
        dataset.train_images[chosen],
        dataset.train_labels[chosen],
        dataset.test_images,
        dataset.test_labels,
        dataset.num_classes,
    )


def _to_dataset(
    name: str, num_classes: int, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> Dataset:
    return Dataset(
        name,
        torch.from_numpy(np.ascontiguousarray(train_x)),
        torch.from_numpy(np.ascontiguousarray(train_y)),
        torch.from_numpy(np.ascontiguousarray(test_x)),
        torch.from_numpy(np.ascontiguousarray(test_y)),
        num_classes,
    )
