"""A learnable synthetic classification dataset of any shape, for tests and benchmarks.

Each class is a fixed random prototype image; examples are prototypes plus Gaussian noise.
"""

import numpy as np

from lottery.data.dataset import DataError, Dataset


def load_synthetic(shape=(28, 28, 1), num_classes: int = 10, train_size: int = 2000,
                   validation_size: int = 500, test_size: int = 500, noise: float = 3.0,
                   seed: int = 0) -> Dataset:
    sizes = {"train_size": train_size, "validation_size": validation_size, "test_size": test_size,
             "num_classes": num_classes}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise DataError(f"dataset.{name}={value!r} must be a positive integer")
    if not all(isinstance(n, int) and n > 0 for n in shape):
        raise DataError(f"dataset.shape={list(shape)} must be positive integers")
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(num_classes, *shape)).astype(np.float32)

    def draw(n):
        labels = rng.integers(0, num_classes, size=n).astype(np.int32)
        images = prototypes[labels] + noise * rng.normal(size=(n, *shape)).astype(np.float32)
        return images.astype(np.float32), labels

    x_train, y_train = draw(train_size)
    x_val, y_val = draw(validation_size)
    x_test, y_test = draw(test_size)
    return Dataset("synthetic", x_train, y_train, x_val, y_val, x_test, y_test, num_classes)
