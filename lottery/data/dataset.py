"""The in-memory dataset every reader returns: train / validation / test splits as numpy arrays."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class DataError(Exception):
    """Data that cannot be found, fetched or verified; the message says how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """Inputs as float32 (N, *input_shape), already normalised; labels as int32 (N,).

    `augment`, when set, is a traceable `(key, x_batch) -> x_batch` applied to every training
    batch inside the compiled loop (e.g. CIFAR-10's random crop and flip); never at evaluation.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augment: Callable | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def close(self) -> None:
        """Nothing to release (a `StreamedDataset` stops its decoding workers)."""


def hold_out(x: np.ndarray, y: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Split a random `size` examples off the training set as the validation set.

    The split is fixed by `seed` (not the run's seed), so every run sees the same split."""
    if not 0 < size < len(x):
        raise DataError(f"dataset.validation_size={size} must be in [1, {len(x)}): early "
                        "stopping needs a validation set")
    order = np.random.default_rng(seed).permutation(len(x))
    train, val = np.sort(order[size:]), np.sort(order[:size])
    return x[train], y[train], x[val], y[val]
