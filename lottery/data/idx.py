"""The IDX format of MNIST and Fashion-MNIST (raw or gzipped): reader, writer, and the
dataset made of the four standard files."""

import gzip
from pathlib import Path

import numpy as np

from lottery.data.dataset import Dataset, hold_out

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Return the array stored in an IDX file; magic number and size are checked."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path} holds {len(raw)} bytes, its header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (used to make test fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    Path(path).write_bytes(header + array.tobytes())


def idx_dataset(name: str, folder: Path, validation_size: int, mean: float,
                std: float) -> Dataset:
    """The 60k/10k split of the four standard IDX files in `folder` (`train-images-idx3-ubyte`
    ...), with a fixed random `validation_size` training images held out; uint8 pixels become
    float32 (N, 28, 28, 1) standardised with the pixel `mean` and `std` (in [0, 1] units)."""
    def images(split):
        pixels = read_idx(folder / f"{split}-images-idx3-ubyte").astype(np.float32) / 255.0
        return ((pixels - mean) / std)[..., None]

    def labels(split):
        return read_idx(folder / f"{split}-labels-idx1-ubyte").astype(np.int32)

    x_train, y_train, x_val, y_val = hold_out(images("train"), labels("train"), validation_size)
    return Dataset(name=name, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                   x_test=images("t10k"), y_test=labels("t10k"), num_classes=10)
