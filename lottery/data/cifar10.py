"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 colour images, ten classes;
the image benchmark of Frankle & Carbin's convolutional and ResNet tickets.

Read from the python version's batches (`data_batch_1`..`data_batch_5`, `test_batch`: pickled
dicts with b'data' uint8 (N, 3072), channel-major, and b'labels'), each verified by its
published md5 (the checksums torchvision uses). They are looked for in the cache
(`$LOTTERY_DATA/cifar10/`, as the extracted `cifar-10-batches-py/` folder or the archive
`cifar-10-python.tar.gz`), then under option `path`, else the archive is downloaded from the
authors' page, checked by sha256 and extracted into the cache.
"""

import hashlib
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from lottery.data.augment import random_crop_and_flip
from lottery.data.dataset import DataError, Dataset, hold_out
from lottery.data.fetch import Tried, data_root, fetch_url, sha256

FOLDER = "cifar-10-batches-py"
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics of the training images, in [0, 1]
STD = (0.2470, 0.2435, 0.2616)
BLACK = tuple(-m / s for m, s in zip(MEAN, STD))  # a black pixel once normalised


def load_cifar10(validation_size: int = 5000, augment: bool = True, path: str | None = None,
                 log=print) -> Dataset:
    """The 50k/10k split with a fixed random `validation_size` training images held out (5,000,
    as Frankle & Carbin). `augment`: a random crop (4-pixel padding) and horizontal flip of
    every training batch. `path`: a folder holding the batches, `cifar-10-batches-py/` or the
    archive."""
    if not isinstance(augment, bool):
        raise DataError(f"dataset.augment={augment!r} must be true or false")
    folder = find_batches(path, log)
    train = [read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read_batch(folder / "test_batch")
    x_train, y_train, x_val, y_val = hold_out(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
        validation_size)
    return Dataset(
        name="cifar10",
        x_train=normalise(x_train), y_train=y_train,
        x_val=normalise(x_val), y_val=y_val,
        x_test=normalise(x_test), y_test=y_test,
        num_classes=10,
        augment=random_crop_and_flip(pad=4, fill=BLACK) if augment else None,
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 images (N, 32, 32, 3) and int32 labels (N,)."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # written by Python 2: keys come as bytes
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(f"{path}: not a CIFAR-10 batch (data {data.shape}, labels "
                        f"{labels.shape})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> float32, standardised per channel."""
    x = images.astype(np.float32)
    x /= 255.0
    x -= np.asarray(MEAN, np.float32)
    x /= np.asarray(STD, np.float32)
    return x


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_batches(path: str | None, log=print) -> Path:
    """The folder holding the six verified batches, extracting or downloading them if needed."""
    cache = data_root() / "cifar10"
    given = Path(path).expanduser() if path else None
    folders = [cache / FOLDER] + ([given, given / FOLDER] if given else [])
    tried = Tried("cifar10")
    for folder in folders:
        absent = [name for name in BATCH_MD5 if not (folder / name).is_file()]
        if not absent:
            bad = _mismatch(folder)
            if bad is None:
                return folder
            fix = ("delete it and run again to re-fetch" if folder == cache / FOLDER
                   else "replace it with the original")
            raise DataError(f"{folder / bad} is corrupt (md5 mismatch with the original "
                            f"CIFAR-10 file): {fix}")
        if not folder.is_dir():
            tried.failed(folder, "not there")
        else:
            tried.failed(folder, "no batches" if len(absent) == len(BATCH_MD5)
                         else f"no {', '.join(absent)}")
    archives = [cache / ARCHIVE] + ([given / ARCHIVE, given] if given else [])
    for archive in archives:
        if archive.is_file():
            if sha256(archive) != ARCHIVE_SHA256:
                raise DataError(f"{archive} is not the original {ARCHIVE} (sha256 mismatch); "
                                "replace it with the original")
            log(f"extracting {archive} into {cache / FOLDER}")
            return _extract(archive, cache)
        tried.failed(archive, "not there")  # `given` was noted as a folder already
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log(f"downloading CIFAR-10 (163 MB) from {URL}")
        failure = fetch_url(URL, Path(tmp) / ARCHIVE, ARCHIVE_SHA256)
        if failure is None:
            return _extract(Path(tmp) / ARCHIVE, cache)
    tried.failed(URL, failure)
    raise tried.error(list(BATCH_MD5), f"download {URL} and put {ARCHIVE}, or the {FOLDER}/ "
                      "folder it holds,", ", or set the option dataset.path=DIR to the folder "
                      "holding either of them", what=f"the CIFAR-10 python batches "
                      f"({', '.join(BATCH_MD5)})")


def _mismatch(folder: Path) -> str | None:
    """The first batch in `folder` whose md5 is not the published one, if any."""
    return next((name for name, expected in BATCH_MD5.items()
                 if md5(folder / name) != expected), None)


def _extract(archive: Path, cache: Path) -> Path:
    """Unpack the batches of a verified archive into `cache/cifar-10-batches-py/`."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / FOLDER
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            with tarfile.open(archive) as tar:
                members = [tar.getmember(f"{FOLDER}/{name}") for name in BATCH_MD5]
                tar.extractall(tmp, members=members, filter="data")
        except (KeyError, OSError, tarfile.TarError) as error:
            raise DataError(f"{archive}: cannot extract the CIFAR-10 batches ({error})") from None
        bad = _mismatch(Path(tmp) / FOLDER)
        if bad is not None:
            raise DataError(f"{archive}: its {bad} does not match the original's md5")
        target.mkdir(exist_ok=True)
        for name in BATCH_MD5:
            shutil.move(Path(tmp) / FOLDER / name, target / name)
    return target
