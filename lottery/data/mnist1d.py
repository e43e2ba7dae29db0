"""MNIST-1D (Greydanus & Kobak 2024): ten classes of 1-D signals of length 40, a minimal
benchmark on which small MLPs and CNNs already differ, and a run takes seconds on a CPU.

Generated locally by the `mnist1d` package with the paper's defaults (5,000 samples split
4,000 train / 1,000 test, seed 42), nothing downloaded. The generated arrays are cached as
an .npz in `$LOTTERY_DATA/mnist1d/`, named by a hash of the generation arguments, so
later loads are fast. We hold `validation_size` of the 4,000 training examples out for
early stopping; the published numbers train on all 4,000.
"""

import hashlib
import json
import random
import zipfile
from importlib.metadata import version

import numpy as np

from lottery.atomic import write_atomically
from lottery.data.dataset import DataError, Dataset, hold_out
from lottery.data.fetch import data_root


def load_mnist1d(validation_size: int = 500, num_samples: int = 5000, seed: int = 42,
                 log=print) -> Dataset:
    """`num_samples` in all (a multiple of 10; split 80/20 train/test by the generator), drawn
    with `seed`; `validation_size` of the training examples are held out."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise DataError(f"dataset.num_samples={num_samples!r} must be an integer >= 10")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"dataset.seed={seed!r} must be an integer")
    arrays = _generated(num_samples, seed, log)
    x_train, y_train, x_val, y_val = hold_out(arrays["x"], arrays["y"], validation_size)
    return Dataset(
        name="mnist1d",
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
        x_test=arrays["x_test"], y_test=arrays["y_test"],
        num_classes=10,
    )


def _generated(num_samples: int, seed: int, log) -> dict[str, np.ndarray]:
    """The generator's train/test arrays (x float32 (N, 40), y int32), from the cache if there."""
    try:
        import mnist1d.data
    except ImportError:
        raise DataError("dataset mnist1d needs the mnist1d package: "
                        "pip install 'mnist1d>=0.0.2'") from None
    args = mnist1d.data.get_dataset_args(as_dict=True)
    args.update(num_samples=num_samples, seed=seed)
    args.pop("url", None)  # where the package would download a copy; not a generation argument
    key = json.dumps({"args": args, "mnist1d": version("mnist1d")}, sort_keys=True)
    path = data_root() / "mnist1d" / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        try:
            with np.load(path) as cached:
                return {name: cached[name] for name in ("x", "y", "x_test", "y_test")}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            log(f"{path} is unreadable; generating MNIST-1D again")
    log(f"generating MNIST-1D ({num_samples} samples, seed {seed}) into {path}")
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:  # the generator seeds the global random states; leave them as they were
        made = mnist1d.data.make_dataset(mnist1d.data.ObjectView(dict(args)))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = {"x": made["x"].astype(np.float32), "y": made["y"].astype(np.int32),
              "x_test": made["x_test"].astype(np.float32),
              "y_test": made["y_test"].astype(np.int32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: np.savez(f, **arrays))
    return arrays
