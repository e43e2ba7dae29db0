"""Dataset registry: `load_dataset(name, **options)` returns a verified, normalised `Dataset`;
`describe(name, **options)` checks the options and gives the shapes and sizes it will have,
without reading, generating or fetching anything.

`imagenet` and `image_folder` are streamed: they return a `StreamedDataset`
(`lottery.data.stream`), read from disk as it trains, and `describe` gives None for them
(their sizes are known once the folder is read) after checking their options."""

import inspect
from dataclasses import dataclass

from lottery.data.cifar10 import load_cifar10
from lottery.data.dataset import DataError, Dataset
from lottery.data.fashion_mnist import load_fashion_mnist
from lottery.data.imagenet import load_image_folder, load_imagenet
from lottery.data.mnist import load_mnist
from lottery.data.mnist1d import load_mnist1d
from lottery.data.stream import StreamedDataset
from lottery.data.synthetic import load_synthetic

DATASETS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "mnist1d": load_mnist1d,
            "cifar10": load_cifar10, "synthetic": load_synthetic, "imagenet": load_imagenet,
            "image_folder": load_image_folder}
STREAMED = ("imagenet", "image_folder")
# input shape, classes and training examples (before the validation split) of the datasets
# whose size is fixed; MNIST-1D's inputs have the generator's default length, 40
FIXED = {"mnist": ((28, 28, 1), 10, 60000), "fashion_mnist": ((28, 28, 1), 10, 60000),
         "cifar10": ((32, 32, 3), 10, 50000)}
MNIST1D_LENGTH, MNIST1D_TRAIN_SPLIT = 40, 0.8


@dataclass(frozen=True)
class DataShape:
    """What `load_dataset` returns, in shapes and sizes."""

    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int  # training examples, after the validation set is held out


def _integer(options: dict, key: str, low: int) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"dataset.{key}={value!r} must be an integer >= {low}")
    return value


def _validation(options: dict, total: int) -> int:
    size = _integer(options, "validation_size", 1)
    if size >= total:
        raise DataError(f"dataset.validation_size={size} must be below the {total} training "
                        "examples it is held out of")
    return total - size


def describe(name: str, **options) -> DataShape | None:
    """Check `options` for dataset `name` (an option it does not take, a value of the wrong
    type or out of range) and give the shapes and sizes of what `load_dataset` would return
    (None for a dataset registered without a description here: known once it loads)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    parameters = {key: parameter.default for key, parameter
                  in inspect.signature(DATASETS[name]).parameters.items() if key != "log"}
    for key in options:
        if key not in parameters:
            raise DataError(f"dataset.{key} is not an option of dataset {name}; its options "
                            f"are {', '.join(parameters)}")
    options = {**parameters, **options}
    if name in STREAMED:
        _check_folder_options(name, options)
        return None
    if name in FIXED:
        shape, classes, total = FIXED[name]
        if name == "cifar10":
            if not isinstance(options["augment"], bool):
                raise DataError(f"dataset.augment={options['augment']!r} must be true or false")
            if options["path"] is not None and not isinstance(options["path"], str):
                raise DataError(f"dataset.path={options['path']!r} must be a folder (a string), "
                                "or null to use the cache")
        return DataShape(shape, classes, _validation(options, total))
    if name == "mnist1d":
        samples = _integer(options, "num_samples", 10)
        if _integer(options, "seed", 0) >= 2**32:
            raise DataError(f"dataset.seed={options['seed']} must be below 2**32")
        total = int(samples // 10 * 10 * MNIST1D_TRAIN_SPLIT)
        return DataShape((MNIST1D_LENGTH,), 10, _validation(options, total))
    if name != "synthetic":
        return None
    shape = options["shape"]
    if (isinstance(shape, str) or not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise DataError(f"dataset.shape={shape!r} must be a list of positive integers, the "
                        "shape of one input, e.g. [28,28,1]")
    classes = _integer(options, "num_classes", 2)
    for key in ("train_size", "validation_size", "test_size"):
        _integer(options, key, 1)
    noise = options["noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise DataError(f"dataset.noise={noise!r} must be a number of at least 0")
    _integer(options, "seed", 0)
    return DataShape(tuple(shape), classes, options["train_size"])


def _check_folder_options(name: str, options: dict) -> None:
    path = options["path"]
    if path is not None and not isinstance(path, str):
        raise DataError(f"dataset.path={path!r} must be a folder (a string)"
                        + (", or null for $LOTTERY_DATA/imagenet" if name == "imagenet" else ""))
    if path is None and name == "image_folder":
        raise DataError("dataset.path is required for image_folder: set dataset.path=DIR, the "
                        "folder holding train/ and val/")
    _integer(options, "resolution", 8)
    _integer(options, "validation_size", 1)
    if not isinstance(options["augment"], bool):
        raise DataError(f"dataset.augment={options['augment']!r} must be true or false")
    if options["num_workers"] is not None:
        _integer(options, "num_workers", 0)


def load_dataset(name: str, **options) -> Dataset | StreamedDataset:
    describe(name, **{key: value for key, value in options.items() if key != "log"})
    try:
        return DATASETS[name](**options)
    except (TypeError, ValueError) as error:  # an option the reader doesn't take, or a bad value
        raise DataError(f"dataset {name}: {error}") from None


__all__ = ["DATASETS", "DataError", "DataShape", "Dataset", "StreamedDataset", "describe",
           "load_dataset"]
