"""The datasets beyond MNIST: Fashion-MNIST (real files from Debian's package when installed,
fake ones otherwise), MNIST-1D (generated once, then cached), CIFAR-10 on files written in
the exact format of the official python batches (folder and .tar.gz), and its random
crop-and-flip augmentation."""

import gzip
import hashlib
import pickle
import re
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery.data import DataError, cifar10, fashion_mnist, load_dataset
from lottery.data.augment import crop_and_flip
from lottery.data.fetch import sha256
from lottery.data.idx import write_idx


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty data cache ($LOTTERY_DATA) for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LOTTERY_DATA", str(root))
    return root


def quiet(message):
    pass


# ---------------------------------------------------------------- Fashion-MNIST


def debian_installed() -> bool:
    return all((fashion_mnist.DEBIAN_DIR / f"{name}.gz").exists() for name in fashion_mnist.FILES)


@pytest.mark.skipif(not debian_installed(),
                    reason="apt-get install dataset-fashion-mnist for the real Fashion-MNIST")
def test_real_fashion_mnist_from_the_debian_package(cache):
    logs = []
    data = load_dataset("fashion_mnist", log=logs.append)
    assert logs == [f"copied {name} from {fashion_mnist.DEBIAN_DIR}" for name in fashion_mnist.FILES]
    for name, expected in fashion_mnist.FILES.items():  # stored decompressed, verified
        assert sha256(cache / "fashion_mnist" / name) == expected
    assert data.name == "fashion_mnist" and data.num_classes == 10
    assert data.x_train.shape == (55000, 28, 28, 1) and data.x_val.shape == (5000, 28, 28, 1)
    assert data.x_test.shape == (10000, 28, 28, 1) and data.x_train.dtype == np.float32
    assert data.y_test.dtype == np.int32
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert (np.bincount(data.y_train) + np.bincount(data.y_val)).tolist() == [6000] * 10
    assert abs(float(data.x_train.mean())) < 0.01  # MEAN and STD are this training set's
    assert float(data.x_train.std()) == pytest.approx(1.0, abs=0.01)
    assert float(data.x_train.min()) == pytest.approx(-0.2860 / 0.3530, rel=1e-6)


def fake_fashion(folder: Path, monkeypatch) -> dict[str, np.ndarray]:
    """Small gzipped IDX files in a stand-in for Debian's folder, hashes patched to match."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)).astype(np.uint8),
              "train-labels-idx1-ubyte": np.arange(20, dtype=np.uint8) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28)).astype(np.uint8),
              "t10k-labels-idx1-ubyte": np.arange(6, dtype=np.uint8)}
    folder.mkdir()
    hashes = {}
    for name, array in arrays.items():
        write_idx(folder / name, array)
        raw = (folder / name).read_bytes()
        hashes[name] = hashlib.sha256(raw).hexdigest()
        (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        (folder / name).unlink()
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", folder)
    monkeypatch.setattr(fashion_mnist, "FILES", hashes)
    monkeypatch.setattr(fashion_mnist, "URLS", [])
    return arrays


def test_fashion_mnist_reads_gzipped_local_files_and_normalises(cache, tmp_path, monkeypatch):
    arrays = fake_fashion(tmp_path / "debian", monkeypatch)
    data = load_dataset("fashion_mnist", validation_size=4, log=quiet)
    assert data.x_train.shape == (16, 28, 28, 1) and data.x_val.shape == (4, 28, 28, 1)
    assert data.x_test.shape == (6, 28, 28, 1)
    expected = (arrays["t10k-images-idx3-ubyte"] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(data.x_test[..., 0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(data.y_test, np.arange(6))


def test_fashion_mnist_refuses_corrupted_files(cache, tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    fake_fashion(debian, monkeypatch)
    labels = debian / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] ^= 1  # one label changed: still a valid IDX file, not the original
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="could not get train-labels-idx1-ubyte;"):
        load_dataset("fashion_mnist", log=quiet)
    assert not (cache / "fashion_mnist" / "train-labels-idx1-ubyte").exists()
    # a corrupt file in the cache is reported, not used or replaced
    (cache / "fashion_mnist" / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte is corrupt \(sha256"):
        load_dataset("fashion_mnist", log=quiet)


def test_fashion_mnist_missing_files_say_where_to_put_them(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(fashion_mnist, "URLS", [])
    with pytest.raises(DataError) as error:
        load_dataset("fashion_mnist", log=quiet)
    message = str(error.value)
    for name in fashion_mnist.FILES:
        assert name in message
    assert f"in {cache / 'fashion_mnist'}" in message
    assert f"{tmp_path / 'nowhere'} (not there)" in message  # Debian's folder, looked in
    assert "apt-get install dataset-fashion-mnist" in message


def reasons(message: str) -> dict[str, str]:
    """{place: why it failed} of a failed fetch's message ('...; tried PLACE (WHY); ...')."""
    tried = message.split("; tried ", 1)[1].split(". Instead, ", 1)[0]
    return dict(re.fullmatch(r"(.*?) \((.*)\)", part).groups() for part in tried.split("; "))


def test_fashion_mnist_failed_fetch_names_every_place_tried(cache, tmp_path, offline,
                                                            monkeypatch):
    """Debian's folder holds one file, corrupt; the download location has none (404)."""
    debian = tmp_path / "debian"
    debian.mkdir()
    (debian / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not the labels"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    monkeypatch.setattr(fashion_mnist, "URLS", [offline.served + "zalando/"])
    with pytest.raises(DataError) as error:
        load_dataset("fashion_mnist", log=quiet)
    tried = reasons(str(error.value))
    assert list(tried) == [str(cache / "fashion_mnist"), str(debian), offline.served + "zalando/"]
    assert "not there" in tried[str(cache / "fashion_mnist")]
    for name in fashion_mnist.FILES:
        why = re.search(rf"{name}: ([^,]*)", tried[str(debian)]).group(1)
        assert ("sha256" if name == "train-labels-idx1-ubyte" else "not there") in why
    assert "404" in tried[offline.served + "zalando/"]  # every file: one reason
    assert "apt-get install dataset-fashion-mnist" in str(error.value)


# ---------------------------------------------------------------- MNIST-1D


@pytest.fixture(scope="module")
def mnist1d_loads(tmp_path_factory):
    """MNIST-1D with the paper's arguments, generated once into a fresh cache, then reloaded."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOTTERY_DATA", str(tmp_path_factory.mktemp("mnist1d-cache")))
        before = np.random.get_state()[1].copy()
        first_logs, second_logs = [], []
        first = load_dataset("mnist1d", log=first_logs.append)
        untouched = np.array_equal(np.random.get_state()[1], before)
        second = load_dataset("mnist1d", log=second_logs.append)
        other_split = load_dataset("mnist1d", validation_size=1000, log=second_logs.append)
        yield first, second, other_split, first_logs, second_logs, untouched


def test_mnist1d_shapes_and_labels(mnist1d_loads):
    data, _, other_split, logs, _, untouched = mnist1d_loads
    assert logs and logs[0].startswith("generating MNIST-1D (5000 samples, seed 42)")
    assert data.name == "mnist1d" and data.num_classes == 10 and data.input_shape == (40,)
    assert data.x_train.shape == (3500, 40) and data.x_val.shape == (500, 40)
    assert data.x_test.shape == (1000, 40)
    assert other_split.x_train.shape == (3000, 40) and other_split.x_val.shape == (1000, 40)
    for x in (data.x_train, data.x_val, data.x_test):
        assert x.dtype == np.float32 and np.isfinite(x).all()
    for y in (data.y_train, data.y_val, data.y_test):
        assert y.dtype == np.int32 and set(np.unique(y)) == set(range(10))
    assert untouched  # the generator's global seeding does not leak into the caller


def test_mnist1d_second_load_comes_from_the_cache(mnist1d_loads):
    first, second, _, _, second_logs, _ = mnist1d_loads
    assert second_logs == []  # nothing generated
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))


def test_mnist1d_options_reach_the_generator(cache):
    a = load_dataset("mnist1d", num_samples=200, seed=1, validation_size=20, log=quiet)
    b = load_dataset("mnist1d", num_samples=200, seed=2, validation_size=20, log=quiet)
    assert a.x_train.shape == (140, 40) and a.x_test.shape == (40, 40)
    assert not np.array_equal(a.x_test, b.x_test)
    assert len(list((cache / "mnist1d").glob("*.npz"))) == 2  # one cache file per argument set
    with pytest.raises(DataError, match="num_samples=5 must be an integer >= 10"):
        load_dataset("mnist1d", num_samples=5)


def test_mnist1d_without_its_package(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(DataError, match=r"needs the mnist1d package: pip install"):
        load_dataset("mnist1d", log=quiet)


# ---------------------------------------------------------------- CIFAR-10 on standard files


def write_cifar(folder: Path, per_batch: int = 20, test_size: int = 10) -> dict:
    """The six python batches in the official format: Python-2-style pickles (protocol 2) of
    dicts with bytes keys; b'data' uint8 (N, 3072), channel-major; labels a list of ints."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        n = test_size if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        label = (b"testing batch 1 of 1" if name == "test_batch"
                 else f"training batch {index + 1} of 5".encode())
        entry = {b"batch_label": label, b"labels": labels, b"data": data,
                 b"filenames": [f"image_{index}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    return written


def patch_cifar_hashes(monkeypatch, folder: Path) -> None:
    """Our generated files stand for the originals: their md5s replace the published ones."""
    monkeypatch.setattr(cifar10, "BATCH_MD5", {n: cifar10.md5(folder / n) for n in cifar10.BATCH_MD5})
    monkeypatch.setattr(cifar10, "URL", "file:///nonexistent/cifar-10-python.tar.gz")


def expected_images(data: np.ndarray) -> np.ndarray:
    chw = data.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0
    mean, std = np.array(cifar10.MEAN), np.array(cifar10.STD)
    return (chw.transpose(0, 2, 3, 1) - mean) / std


def check_cifar(data, written, validation_size=10):
    assert data.name == "cifar10" and data.num_classes == 10 and data.input_shape == (32, 32, 3)
    assert data.x_train.shape == (100 - validation_size, 32, 32, 3)
    assert data.x_val.shape == (validation_size, 32, 32, 3) and data.x_test.shape == (10, 32, 32, 3)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    test_data, test_labels = written["test_batch"]
    np.testing.assert_array_equal(data.y_test, test_labels)
    np.testing.assert_allclose(data.x_test, expected_images(test_data), rtol=1e-5, atol=1e-5)
    train_images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    assert sorted(data.y_train.tolist() + data.y_val.tolist()) == sorted(train_labels)
    every = np.concatenate([data.x_train, data.x_val])
    assert np.isclose(every.sum(), expected_images(train_images).sum(), rtol=1e-5)
    # channel c of a pixel is byte c * 1024 + row * 32 + column of the record
    np.testing.assert_allclose(
        data.x_test[3, 5, 7], (test_data[3, [5 * 32 + 7, 1024 + 5 * 32 + 7, 2048 + 5 * 32 + 7]]
                               / 255.0 - cifar10.MEAN) / cifar10.STD, rtol=1e-5)


@pytest.mark.parametrize("given", ["parent", "batches"])
def test_cifar10_from_an_extracted_folder(cache, tmp_path, monkeypatch, given):
    written = write_cifar(tmp_path / "downloads" / "cifar-10-batches-py")
    patch_cifar_hashes(monkeypatch, tmp_path / "downloads" / "cifar-10-batches-py")
    path = tmp_path / "downloads" if given == "parent" else tmp_path / "downloads" / "cifar-10-batches-py"
    data = load_dataset("cifar10", validation_size=10, path=str(path), log=quiet)
    check_cifar(data, written)
    assert data.augment.func is crop_and_flip  # bound to CIFAR's padding and black pixel
    assert data.augment.keywords == {"pad": 4, "fill": cifar10.BLACK}
    assert load_dataset("cifar10", validation_size=10, augment=False, path=str(path)).augment is None
    with pytest.raises(DataError, match=r"validation_size=100 must be in \[1, 100\)"):
        load_dataset("cifar10", validation_size=100, path=str(path))


def test_cifar10_from_the_archive_is_extracted_into_the_cache(cache, tmp_path, monkeypatch):
    batches = tmp_path / "build" / "cifar-10-batches-py"
    written = write_cifar(batches)
    patch_cifar_hashes(monkeypatch, batches)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    archive = downloads / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match=r"not the original cifar-10-python.tar.gz \(sha256"):
        load_dataset("cifar10", path=str(downloads), log=quiet)  # the real archive's hash
    monkeypatch.setattr(cifar10, "ARCHIVE_SHA256", sha256(archive))  # ours stands for it
    logs = []
    data = load_dataset("cifar10", validation_size=10, path=str(downloads), log=logs.append)
    check_cifar(data, written)
    assert logs == [f"extracting {archive} into {cache / 'cifar10' / 'cifar-10-batches-py'}"]
    assert sorted(p.name for p in (cache / "cifar10").iterdir()) == ["cifar-10-batches-py"]
    archive.unlink()  # from now on the cache serves
    again = load_dataset("cifar10", validation_size=10, log=logs.append)
    np.testing.assert_array_equal(again.x_val, data.x_val)
    assert len(logs) == 1


def test_cifar10_refuses_a_corrupted_batch(cache, tmp_path, monkeypatch):
    batches = tmp_path / "cifar-10-batches-py"
    write_cifar(batches)
    patch_cifar_hashes(monkeypatch, batches)
    with open(batches / "data_batch_3", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    with pytest.raises(DataError, match=r"data_batch_3 is corrupt \(md5 mismatch"):
        load_dataset("cifar10", path=str(batches), log=quiet)


def test_cifar10_missing_files_say_which_and_where(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "URL", "file:///nonexistent/cifar-10-python.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", path=str(tmp_path / "empty"), log=quiet)
    message = str(error.value)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "cifar-10-python.tar.gz",
                                                            "cifar-10-batches-py"]:
        assert name in message
    assert str(cache / "cifar10") in message and "dataset.path=" in message
    assert not any((cache / "cifar10").iterdir())  # no partial download left behind
    with pytest.raises(DataError, match="augment='yes' must be true or false"):
        load_dataset("cifar10", augment="yes")


@pytest.mark.parametrize("server", ["refused", "404", "sha256"])
def test_cifar10_failed_fetch_names_every_place_tried(cache, tmp_path, offline, monkeypatch,
                                                      server):
    """dataset.path is an empty folder; the download is refused, missing (404) or not the
    archive (sha256)."""
    (offline.root / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    url = {"refused": offline.refused + "cifar-10-python.tar.gz",
           "404": offline.served + "elsewhere.tar.gz",
           "sha256": offline.served + "cifar-10-python.tar.gz"}[server]
    monkeypatch.setattr(cifar10, "URL", url)
    given = tmp_path / "empty"
    given.mkdir()
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", path=str(given), log=quiet)
    message = str(error.value)
    tried = reasons(message)
    folder = cache / "cifar10"
    assert list(tried) == [str(place) for place in (
        folder / "cifar-10-batches-py", given, given / "cifar-10-batches-py",
        folder / "cifar-10-python.tar.gz", given / "cifar-10-python.tar.gz", url)]
    assert server in tried[url].lower()  # "Connection refused", "HTTP 404 ...", "sha256 ..."
    assert "batches" in tried[str(given)]  # it exists, without them
    assert f"in {folder}/" in message and "$LOTTERY_DATA" in message
    assert "dataset.path=" in message and "\n" not in message
    assert not any(folder.iterdir())  # no partial download left behind


# ---------------------------------------------------------------- crop-and-flip augmentation


def augment(key, x):
    return crop_and_flip(key, x, pad=4, fill=cifar10.BLACK)


# Every distinct program costs a compilation (threefry is slow to compile on a CPU): the
# tests share one jitted function on batches of 8, and build the inputs with numpy.
jitted = jax.jit(augment)


def test_black_is_a_normalised_black_pixel():
    np.testing.assert_allclose(cifar10.BLACK, cifar10.normalise(np.zeros((1, 1, 1, 3), np.uint8))[0, 0, 0],
                               rtol=1e-6)


def test_augmentation_is_deterministic_per_key_and_works_under_jit_and_vmap():
    x = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype(np.float32)
    out = jitted(jax.random.key(0), x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(jitted(jax.random.key(0), x), out)
    assert not np.array_equal(jitted(jax.random.key(1), x), out)
    keys = jnp.stack([jax.random.key(i) for i in (2, 3, 4)])
    stacked = np.stack([x, x + 1, x * 2])
    mapped = jax.jit(jax.vmap(augment))(keys, stacked)  # e.g. one batch per stacked member
    for i in range(3):
        np.testing.assert_array_equal(mapped[i], jitted(keys[i], stacked[i]))


def test_augmentation_really_crops_and_flips():
    """Each pixel of a crafted image holds its own coordinates, so every output tells from
    where it was cut and whether it was mirrored."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    coded = np.stack([rows * 32 + cols + 1000 * c + 1 for c in range(3)], -1).astype(np.float32)
    batch = jnp.broadcast_to(coded, (8, 32, 32, 3))
    out = np.concatenate([jitted(jax.random.key(seed), batch) for seed in range(10, 18)])
    black = np.asarray(cifar10.BLACK, np.float32)
    shifts, flips = set(), set()
    for image in out:
        filled = np.all(image == black, axis=-1)
        kept = ~filled
        code = image[..., 0][kept].astype(int) - 1
        src_row, src_col = code // 32, code % 32
        np.testing.assert_array_equal(image[..., 1][kept] - image[..., 0][kept], 1000)
        out_row, out_col = np.nonzero(kept)
        dy = np.unique(src_row - out_row)
        assert len(dy) == 1 and abs(dy[0]) <= 4  # a pure shift, at most 4 pixels
        straight, mirrored = np.unique(src_col - out_col), np.unique(src_col + out_col - 31)
        flipped = len(straight) != 1
        dx = mirrored if flipped else straight
        assert len(dx) == 1 and abs(dx[0]) <= 4
        assert filled.sum() == 32 * 32 - (32 - abs(dy[0])) * (32 - abs(dx[0]))  # the rest: black
        shifts.add((int(dy[0]), int(dx[0])))
        flips.add(flipped)
    assert flips == {True, False}
    assert len(shifts) > 10 and max(max(abs(dy), abs(dx)) for dy, dx in shifts) == 4
