"""Image folders streamed by Grain (lottery.data.folder, images, stream, imagenet): the layouts
parse, broken folders fail in one line, and the streamed batches are the in-memory path's.

The folders are generated here: small JPEGs (and PNGs) made with PIL. Expected values come
from PIL and numpy in this file and from `batch_indices` (the in-memory path's order), never
from the code under test.
"""

import math

import jax
import numpy as np
import pytest
from PIL import Image

from lottery.data import DataError, describe, load_dataset
from lottery.data.folder import read_folder
from lottery.data.images import crop_box
from lottery.data.order import batch_indices

CLASSES = ("n01440764", "n01443537", "n01484850")
MEAN = 255 * np.array([0.485, 0.456, 0.406], np.float32)
STD = 255 * np.array([0.229, 0.224, 0.225], np.float32)


def write_image(path, height, width, seed, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)


def decoded(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def make_imagenet(root, label_file="LOC_val_solution.csv", flat_val=True, size=None):
    """3 classes x 8 training JPEGs of varied sizes (one a PNG), 6 validation images flat
    with `label_file` (or in class folders). Returns {val file stem: class}."""
    seed = 0
    for c, wnid in enumerate(CLASSES):
        for i in range(8):
            height, width = size or (18 + 3 * i, 40 - 2 * i - c)
            fmt, ext = ("PNG", "png") if (c, i) == (1, 7) else ("JPEG", "JPEG")
            write_image(root / "train" / wnid / f"{wnid}_{i}.{ext}", height, width, seed, fmt)
            seed += 1
    truth = {}
    for k in range(6):
        stem, wnid = f"ILSVRC2012_val_{k + 1:08d}", CLASSES[(2 * k + 1) % 3]
        folder = root / "val" if flat_val else root / "val" / wnid
        write_image(folder / f"{stem}.JPEG", *(size or (20 + k, 30 - k)), 100 + k)
        truth[stem] = wnid
    if flat_val and label_file == "LOC_val_solution.csv":
        rows = [f"{stem},{wnid} 1 2 30 40 {wnid} 5 6 7 8" for stem, wnid in truth.items()]
        (root / label_file).write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif flat_val:
        rows = [f"{stem}.JPEG {wnid}" for stem, wnid in truth.items()]
        (root / label_file).write_text("\n".join(rows) + "\n")
    return truth


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_imagenet(root)


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """Every image 16x16, val/ in class folders: at resolution 14 the evaluation view (resize
    the shorter side to round(14 * 256 / 224) = 16, then the central 14x14) is a plain crop."""
    root = tmp_path_factory.mktemp("square")
    make_imagenet(root, flat_val=False, size=(16, 16))
    return root


order = jax.jit(batch_indices, static_argnums=(2, 3))  # the in-memory path's order


def keys_of(*seeds):
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])


# -- layouts ------------------------------------------------------------------------------

def test_imagenet_layout_with_kaggles_label_file(imagenet):
    root, truth = imagenet
    files = read_folder(root, "imagenet")
    assert files.classes == CLASSES
    assert len(files.train_paths) == 24 and np.bincount(files.train_labels).tolist() == [8] * 3
    for path, label in zip(files.train_paths, files.train_labels):
        assert path.decode().split("/")[1] == CLASSES[label]
    stems = [path.decode().split("/")[-1].split(".")[0] for path in files.test_paths]
    assert stems == sorted(truth)
    assert [CLASSES[label] for label in files.test_labels] == [truth[s] for s in stems]


def test_val_labels_txt_and_class_folders(tmp_path):
    flat = tmp_path / "flat"
    truth = make_imagenet(flat, label_file="val_labels.txt")
    files = read_folder(flat, "image_folder")
    assert [CLASSES[label] for label in files.test_labels] == [truth[s] for s in sorted(truth)]
    folders = tmp_path / "folders"
    truth = make_imagenet(folders, flat_val=False)
    files = read_folder(folders, "image_folder")
    assert files.label_file is None  # sorted by class folder, then name
    stems = [path.decode().split("/")[-1].split(".")[0] for path in files.test_paths]
    assert sorted(stems) == sorted(truth)
    assert [CLASSES[label] for label in files.test_labels] == [truth[s] for s in stems]


def test_tiny_imagenet_and_kaggle_layouts(tmp_path):
    tiny = tmp_path / "tiny"  # train/<wnid>/images/*.JPEG, val/images + val_annotations.txt
    for c, wnid in enumerate(CLASSES[:2]):
        for i in range(3):
            write_image(tiny / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 8, 8, 3 * c + i)
    for k in range(4):
        write_image(tiny / "val" / "images" / f"val_{k}.JPEG", 8, 8, 50 + k)
    (tiny / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{k}.JPEG\t{CLASSES[k % 2]}\t0\t0\t7\t7\n" for k in range(4)))
    files = read_folder(tiny, "image_folder")
    assert files.classes == CLASSES[:2] and len(files.train_paths) == 6
    assert files.test_labels.tolist() == [0, 1, 0, 1]
    kaggle = tmp_path / "kaggle"
    truth = make_imagenet(kaggle / "ILSVRC" / "Data" / "CLS-LOC", label_file="none")
    (kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{stem},{wnid} 1 2 3 4\n" for stem, wnid in truth.items()))
    files = read_folder(kaggle, "imagenet")
    assert files.root == str(kaggle / "ILSVRC" / "Data" / "CLS-LOC")
    assert [CLASSES[label] for label in files.test_labels] == [truth[s] for s in sorted(truth)]


def broken(root, case):
    make_imagenet(root, flat_val=case not in ("val_class", "no_val_images"))
    if case == "no_train":
        for path in sorted((root / "train").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (root / "train").rmdir()
    elif case == "val_class":
        write_image(root / "val" / "n99999999" / "x.JPEG", 8, 8, 0)
    elif case == "empty_class":
        (root / "train" / "n02000000").mkdir()
        (root / "train" / "n02000000" / "notes.txt").write_text("no images")
    elif case == "bad_label_file":
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val\n")
    elif case == "unlabelled":
        write_image(root / "val" / "extra.JPEG", 8, 8, 0)
    elif case == "no_label_file":
        (root / "LOC_val_solution.csv").unlink()
    elif case == "no_val_images":
        for path in (root / "val").rglob("*.JPEG"):
            path.unlink()


@pytest.mark.parametrize("case, says", [
    ("missing", r"is not a folder"), ("no_train", r"has no train/ folder"),
    ("val_class", r"n99999999.*is not one of the 3 classes"),
    ("empty_class", r"n02000000 holds no images"),
    ("bad_label_file", r"LOC_val_solution.csv: entry 1 .* has no class"),
    ("unlabelled", r"extra.JPEG has no label in .*LOC_val_solution.csv"),
    ("no_label_file", r"has no class folders and there is no label file"),
    ("no_val_images", r"val holds no images"),
])
def test_a_broken_folder_is_one_line_naming_the_path_and_the_layout(tmp_path, case, says):
    root = tmp_path / "data"
    if case != "missing":
        broken(root, case)
    with pytest.raises(DataError, match=says) as error:
        load_dataset("image_folder", path=str(root), validation_size=2, log=lambda *_: None)
    message = str(error.value)
    assert "\n" not in message and str(root) in message and "expected DIR/train/" in message


def test_imagenet_cannot_be_fetched_and_says_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LOTTERY_DATA", str(tmp_path))
    with pytest.raises(DataError) as error:
        load_dataset("imagenet", log=lambda *_: None)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "imagenet") in message
    assert "https://image-net.org" in message and "DIR/train/<wnid>/*.JPEG" in message


@pytest.mark.parametrize("options, says", [
    ({}, r"dataset.path is required"), ({"path": "x", "resolution": 4}, r"resolution=4"),
    ({"path": "x", "augment": "yes"}, r"augment"), ({"path": "x", "num_workers": -1},
                                                     r"num_workers=-1"),
    ({"path": "x", "validation_size": 0}, r"validation_size=0"), ({"path": 5}, r"path=5"),
])
def test_describe_checks_folder_options_without_reading(options, says):
    with pytest.raises(DataError, match=says):
        describe("image_folder", **options)
    assert describe("image_folder", path="/nowhere") is None  # known once it loads
    assert describe("imagenet") is None


# -- the views ----------------------------------------------------------------------------

class Draws:
    """A stand-in for a numpy Generator that returns fixed draws, in order."""

    def __init__(self, uniforms, integers):
        self.uniforms, self.integers_ = list(uniforms), list(integers)

    def uniform(self, low, high):
        return low + self.uniforms.pop(0) * (high - low)

    def integers(self, low, high):
        value = low + self.integers_.pop(0)
        assert value < high
        return value


def test_random_resized_crop_box_by_hand():
    # 100 x 200 image, area 20000: scale draw 0.5 -> area fraction 0.08 + 0.5 * 0.92 = 0.54,
    # 10800 px; ratio draw 1 -> log-uniform at its top, 4/3. w = round(sqrt(10800 * 4/3)) =
    # round(120) = 120, h = round(sqrt(8100)) = 90: fits; top from [0, 11), left from [0, 81)
    assert crop_box(100, 200, Draws([0.5, 1.0], [7, 30])) == (7, 30, 90, 120)
    # a 100 x 50 (tall) image whose 10 tries never fit: area fraction 1 at ratio 4/3 gives
    # w = round(sqrt(5000 * 4/3)) = 82 > 50. The fallback: width/height = 0.5 < 3/4, so
    # w = 50, h = round(50 / 0.75) = 67, centred: top (100 - 67) // 2 = 16, left 0
    assert crop_box(100, 50, Draws([1.0, 1.0] * 10, [])) == (16, 0, 67, 50)
    # a wide 50 x 100 image: the fallback crop is h = 50, w = round(50 * 4/3) = 67, left 16
    assert crop_box(50, 100, Draws([1.0, 0.0] * 10, [])) == (0, 16, 50, 67)


def test_the_evaluation_view_resizes_the_shorter_side_and_crops_the_centre(imagenet):
    root, truth = imagenet
    data = load_dataset("imagenet", path=str(root), resolution=12, validation_size=4,
                        num_workers=0, log=lambda *_: None)
    stem = sorted(truth)[0]  # 20 x 30 (height x width)
    x, _, _ = next(data.eval_batches("test", 1))
    # resolution 12: the shorter side to round(12 * 256 / 224) = 14, the longer to
    # int(14 * 30 / 20) = 21; centre: left round(9 / 2) = 4 (to even), top round(1) = 1
    with Image.open(root / "val" / f"{stem}.JPEG") as image:
        expected = np.asarray(image.convert("RGB").resize((21, 14), Image.BILINEAR))[1:13, 4:16]
    np.testing.assert_array_equal(x[0], expected)


# -- the stream ---------------------------------------------------------------------------

def test_streamed_batches_are_the_in_memory_gather(square):
    data = load_dataset("image_folder", path=str(square), resolution=14, validation_size=5,
                        augment=False, num_workers=0, log=lambda *_: None)
    assert (data.train_size, data.num_classes, data.input_shape) == (19, 3, (14, 14, 3))
    train = [bytes(p) for p in data.train_paths]
    held = [bytes(p) for p in data.val_paths]
    everything = sorted(p.relative_to(square).as_posix().encode()
                        for p in (square / "train").rglob("*.*"))
    assert sorted(train + held) == everything and len(held) == 5 and not set(train) & set(held)
    x_all = np.stack([decoded(square / p.decode())[1:15, 1:15] for p in train])
    y_all = np.array([CLASSES.index(p.decode().split("/")[1]) for p in train])
    keys = keys_of(3, 4)
    x, y = data.train_batches(keys, 5, 4, 6)
    assert x.shape == (2, 4, 6, 14, 14, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    for member, key in enumerate(keys):
        index = np.asarray(order(jax.random.wrap_key_data(key), np.arange(5, 9), 19, 6))
        np.testing.assert_array_equal(x[member], x_all[index])
        np.testing.assert_array_equal(y[member], y_all[index])
    # the stream goes on where it stopped, and a fresh one started at step 7 (a resumed run)
    # gives the same batches: the position is a function of (keys, step)
    later, _ = data.train_batches(keys, 9, 3, 6)
    again = load_dataset("image_folder", path=str(square), resolution=14, validation_size=5,
                         augment=False, num_workers=0, log=lambda *_: None)
    resumed, _ = again.train_batches(keys, 7, 5, 6)
    np.testing.assert_array_equal(resumed, np.concatenate([x[:, 2:], later], axis=1))
    assert data.split_size("val") == 5 and data.split_size("test") == 6


def test_augmentation_depends_on_key_step_and_position_only(imagenet):
    root, _ = imagenet
    options = dict(path=str(root), resolution=12, validation_size=4, log=lambda *_: None)
    inline = load_dataset("imagenet", num_workers=0, **options)
    keys = keys_of(0, 1)
    x, y = inline.train_batches(keys, 3, 2, 6)
    with load_dataset("imagenet", num_workers=2, **options) as workers:
        np.testing.assert_array_equal(workers.train_batches(keys, 3, 2, 6)[0], x)
    halves = [load_dataset("imagenet", num_workers=0, **options).train_batches(
        keys, 3, 2, 6, process_index=p, process_count=2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves], axis=2), x)
    np.testing.assert_array_equal(np.concatenate([h[1] for h in halves], axis=2), y)
    # one example by hand: member 1, step 4, position 5 draws from the Generator seeded by
    # (its key, 4, 5): the crop box, then the flip
    index = np.asarray(order(jax.random.wrap_key_data(keys[1]), np.array([4]), 20, 6))
    path = root / inline.train_paths[index[0, 5]].decode()
    image = Image.open(path).convert("RGB")
    rng = np.random.default_rng([*keys[1].tolist(), 4, 5])
    top, left, h, w = crop_box(image.height, image.width, rng)
    view = image.crop((left, top, left + w, top + h)).resize((12, 12), Image.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    np.testing.assert_array_equal(x[1, 1, 5], np.asarray(view))
    assert not np.array_equal(x[0], x[1])  # members draw their own orders and crops


def test_a_batch_that_does_not_split_evenly_is_refused(imagenet):
    root, _ = imagenet
    data = load_dataset("imagenet", path=str(root), resolution=12, validation_size=4,
                        num_workers=0, log=lambda *_: None)
    with pytest.raises(DataError, match=r"batch_size=5 must be a multiple of the 2 processes"):
        data.train_batches(keys_of(0), 0, 1, 5, process_index=0, process_count=2)
    with pytest.raises(DataError, match=r"batch_size=5 must be a multiple"):
        data.eval_batches("test", 5, process_count=2)


def test_evaluation_batches_are_padded_with_weight_zero(square):
    data = load_dataset("image_folder", path=str(square), resolution=14, validation_size=5,
                        num_workers=0, log=lambda *_: None)
    batches = list(data.eval_batches("test", 4))  # 6 images: batches of 4 and 2 + 2 padding
    assert [b[0].shape for b in batches] == [(4, 14, 14, 3)] * 2
    np.testing.assert_array_equal(np.concatenate([w for _, _, w in batches]), [1] * 6 + [0] * 2)
    expected = [decoded(p)[1:15, 1:15] for p in sorted((square / "val").rglob("*.JPEG"))]
    x = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(x[:6], np.stack(expected))
    assert not x[6:].any() and not batches[1][1][2:].any()
    halves = [list(data.eval_batches("test", 4, p, 2)) for p in (0, 1)]
    for i, batch in enumerate(batches):
        for part in range(3):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][i][part], halves[1][i][part]]), batch[part])
    # the held-out validation set: 5 images, one batch of 5 (the batch is at most the split)
    (x_val, y_val, w_val), = data.eval_batches("val", 8)
    assert x_val.shape[0] == 5 and w_val.tolist() == [1] * 5
    np.testing.assert_array_equal(
        y_val, [CLASSES.index(p.decode().split("/")[1]) for p in data.val_paths])


def test_a_sample_is_resident_normalised_and_fixed(square):
    data = load_dataset("image_folder", path=str(square), resolution=14, validation_size=5,
                        num_workers=0, log=lambda *_: None)
    x, y = data.sample(7)
    assert x.shape == (7, 14, 14, 3) and x.dtype == np.float32 and y.shape == (7,)
    paths = [bytes(p) for p in data.train_paths]
    for image, label in zip(x, y):
        raw = image * STD + MEAN  # undo the normalisation: a training image's central crop
        match = [p for p in paths if np.allclose(decoded(square / p.decode())[1:15, 1:15], raw,
                                                 atol=1e-3)]
        assert len(match) == 1 and CLASSES.index(match[0].decode().split("/")[1]) == label
    assert len({image.tobytes() for image in x}) == 7
    x3, _ = data.sample(3)
    np.testing.assert_array_equal(x3, x[:3])
    np.testing.assert_allclose(data.mean / 255, [0.485, 0.456, 0.406], rtol=1e-6)
    assert math.isclose(float(data.std[0]), 0.229 * 255, rel_tol=1e-6)


def test_an_image_that_does_not_decode_names_its_file(tmp_path):
    make_imagenet(tmp_path)
    bad = tmp_path / "train" / CLASSES[0] / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    data = load_dataset("imagenet", path=str(tmp_path), resolution=12, validation_size=1,
                        num_workers=0, log=lambda *_: None)
    with pytest.raises(DataError, match=r"broken.JPEG: cannot decode the image"):
        data.train_batches(keys_of(0), 0, 8, 3)  # 8 steps of 3: every example of the epoch
