"""Image folders in the layouts users have them: the files and labels of a training and an
evaluation set, read from the folder tree alone (no image is opened here).

    DIR/train/<class>/...  every image under a class folder (at any depth: Tiny-ImageNet's
                           train/<wnid>/images/*.JPEG too) is an example of that class; the
                           classes are the sorted names of train/'s subfolders
    DIR/val/               the evaluation images, either
                           - in class folders, DIR/val/<class>/..., each a class of train/, or
                           - anywhere under val/, flat, labelled by a label file (below)

A label file, looked for in DIR/ and then DIR/val/, labels val/'s images by file name (the
name without its extension is the key, so ILSVRC2012_val_00000001 and
ILSVRC2012_val_00000001.JPEG are the same image):
    LOC_val_solution.csv   Kaggle's ImageNet: a header `ImageId,PredictionString`, then one
                           row per image whose prediction string's first token is the class
    val_labels.txt         `filename class` per line (more whitespace-separated columns are
                           ignored)
    val_annotations.txt    Tiny-ImageNet's: `filename<TAB>class<TAB>box...`, the same form
Where a label file is found it is used; otherwise val/'s subfolders are the classes. Kaggle's
download, DIR/ILSVRC/Data/CLS-LOC/{train,val} with DIR/LOC_val_solution.csv, is read as is.
Images are files ending in .jpeg, .jpg or .png (any case). Every problem is one `DataError`
that names the path and the layout expected.
"""

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lottery.data.dataset import DataError

EXTENSIONS = (".jpeg", ".jpg", ".png")
LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "val_annotations.txt")
KAGGLE = Path("ILSVRC", "Data", "CLS-LOC")  # where Kaggle's download keeps train/ and val/
LAYOUT = ("expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg, or val/'s images flat "
          "with a label file DIR/LOC_val_solution.csv (Kaggle: ImageId,PredictionString whose "
          "first token is the class) or DIR/val_labels.txt ('filename class' per line)")


@dataclass(frozen=True)
class ImageFiles:
    """The images of a folder: paths relative to `root` (bytes, `os.fsencode`d: compact for
    a million files, and cheap to send to worker processes) and int32 labels, indices into
    the sorted `classes`."""

    root: str
    classes: tuple[str, ...]
    train_paths: np.ndarray  # bytes (N,), sorted by class then path
    train_labels: np.ndarray  # int32 (N,)
    test_paths: np.ndarray  # the val/ folder's images, sorted by path
    test_labels: np.ndarray
    label_file: str | None = None  # where val/'s labels came from, if from a file


def read_folder(path, dataset: str) -> ImageFiles:
    """The training and evaluation images of the folder at `path` (the layouts above)."""
    given = Path(path).expanduser()
    if not given.is_dir():
        raise DataError(f"{dataset}: {given} is not a folder; {LAYOUT}")
    root = given / KAGGLE if (given / KAGGLE / "train").is_dir() else given
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{dataset}: {given} has no train/ folder; {LAYOUT}")
    classes = tuple(sorted(entry.name for entry in os.scandir(train) if entry.is_dir()))
    if not classes:
        raise DataError(f"{dataset}: {train} has no class folders; {LAYOUT}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _images(train / name, root)
        if not found:
            raise DataError(f"{dataset}: {train / name} holds no images "
                            f"({', '.join(EXTENSIONS)}); {LAYOUT}")
        paths += found
        labels += [label] * len(found)
    val = root / "val"
    if not val.is_dir():
        raise DataError(f"{dataset}: {root} has no val/ folder (the evaluation images); {LAYOUT}")
    label_file = next((folder / name for folder in dict.fromkeys((given, root, val))
                       for name in LABEL_FILES if (folder / name).is_file()), None)
    if label_file is None:
        test_paths, test_labels = _class_folders(val, root, classes, dataset)
    else:
        test_paths, test_labels = _labelled(val, root, label_file, classes, dataset)
    return ImageFiles(str(root), classes, np.array(paths, dtype=bytes),
                      np.array(labels, np.int32), np.array(test_paths, dtype=bytes),
                      np.array(test_labels, np.int32),
                      None if label_file is None else str(label_file))


def _images(folder: Path, root: Path) -> list[bytes]:
    """The image files under `folder` (at any depth), sorted, relative to `root`."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.join(parent, name) for name in names
                  if name.lower().endswith(EXTENSIONS)]
    return sorted(os.fsencode(os.path.relpath(p, root)) for p in found)


def _class_folders(val: Path, root: Path, classes, dataset: str):
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    folders = sorted(entry.name for entry in os.scandir(val) if entry.is_dir())
    if not folders:
        raise DataError(f"{dataset}: {val} has no class folders and there is no label file "
                        f"({', '.join(LABEL_FILES)}) in {root} or {val}; {LAYOUT}")
    for name in folders:
        if name not in index:
            raise DataError(f"{dataset}: {val / name}: class {name!r} is not one of the "
                            f"{len(classes)} classes of {root / 'train'}; {LAYOUT}")
        found = _images(val / name, root)
        paths += found
        labels += [index[name]] * len(found)
    if not paths:
        raise DataError(f"{dataset}: {val} holds no images ({', '.join(EXTENSIONS)}); {LAYOUT}")
    return paths, labels


def _labelled(val: Path, root: Path, label_file: Path, classes, dataset: str):
    """val/'s images (at any depth) labelled by `label_file`."""
    names = read_labels(label_file, dataset)
    index = {name: i for i, name in enumerate(classes)}
    paths = _images(val, root)
    if not paths:
        raise DataError(f"{dataset}: {val} holds no images ({', '.join(EXTENSIONS)}); {LAYOUT}")
    labels = []
    for path in paths:
        key = Path(os.fsdecode(path)).stem
        if key not in names:
            raise DataError(f"{dataset}: {root / os.fsdecode(path)} has no label in "
                            f"{label_file}; {LAYOUT}")
        if names[key] not in index:
            raise DataError(f"{dataset}: {label_file} labels {key} {names[key]!r}, not one "
                            f"of the {len(classes)} classes of {root / 'train'}")
        labels.append(index[names[key]])
    return paths, labels


def read_labels(path: Path, dataset: str) -> dict[str, str]:
    """A label file's {image name without extension: class}."""
    try:
        with open(path, newline="") as f:
            if path.suffix == ".csv":
                rows = [(row[0], row[1].split()[0] if len(row) > 1 and row[1].split() else "")
                        for row in csv.reader(f) if row]
                if rows and rows[0][0] == "ImageId":
                    rows = rows[1:]
            else:
                rows = [tuple(line.split()[:2]) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{dataset}: cannot read the label file {path} ({error}); "
                        f"{LAYOUT}") from None
    for number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[1]:
            raise DataError(f"{dataset}: {path}: entry {number} ({' '.join(row)!r}) has no "
                            f"class; {LAYOUT}")
    if not rows:
        raise DataError(f"{dataset}: the label file {path} is empty; {LAYOUT}")
    return {Path(name).stem: label for name, label in rows}
