"""Dataset registry: `load_dataset(name, **options)` returns a verified, normalised `Dataset`."""

from lottery.data.dataset import DataError, Dataset
from lottery.data.mnist import load_mnist
from lottery.data.synthetic import load_synthetic

DATASETS = {"mnist": load_mnist, "synthetic": load_synthetic}


def load_dataset(name: str, **options) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    try:
        return DATASETS[name](**options)
    except (TypeError, ValueError) as error:  # an option the reader doesn't take, or a bad value
        raise DataError(f"dataset {name}: {error}") from None


__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset"]
