"""Dataset registry: `load_dataset(name, **options)` returns a verified, normalised `Dataset`."""

from lottery.data.cifar10 import load_cifar10
from lottery.data.dataset import DataError, Dataset
from lottery.data.fashion_mnist import load_fashion_mnist
from lottery.data.mnist import load_mnist
from lottery.data.mnist1d import load_mnist1d
from lottery.data.synthetic import load_synthetic

DATASETS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "mnist1d": load_mnist1d,
            "cifar10": load_cifar10, "synthetic": load_synthetic}


def load_dataset(name: str, **options) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    try:
        return DATASETS[name](**options)
    except (TypeError, ValueError) as error:  # an option the reader doesn't take, or a bad value
        raise DataError(f"dataset {name}: {error}") from None


__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset"]
