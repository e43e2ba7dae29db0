"""The streamed image datasets of the registry: `imagenet` (ILSVRC2012, 1.28M training
images in 1,000 classes, evaluated on its 50,000 validation images) and `image_folder` (any
folder in the same layout: Tiny-ImageNet, Imagenette, a subset of ImageNet). Both return a
`StreamedDataset` (`lottery.data.stream`); the layouts read are `lottery.data.folder`'s.

ImageNet cannot be downloaded automatically: its terms of access must be accepted first.
"""

import os

from lottery.data.dataset import DataError
from lottery.data.fetch import data_root
from lottery.data.folder import LAYOUT, read_folder
from lottery.data.stream import StreamedDataset
from lottery.terminal import plural

GET_IMAGENET = (
    "ImageNet cannot be downloaded automatically: get ILSVRC2012 (the training and "
    "validation images) from https://image-net.org after accepting its terms of access "
    "(or Kaggle's imagenet-object-localization-challenge, read as is), and put it as "
    "DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG (or DIR/val/*.JPEG with "
    "DIR/LOC_val_solution.csv or DIR/val_labels.txt)")


def default_workers() -> int:
    """One decoding worker per core this process may use, less one for the training loop."""
    return max(0, len(os.sched_getaffinity(0)) - 1)


def load_imagenet(path: str | None = None, resolution: int = 224, validation_size: int = 10000,
                  augment: bool = True, num_workers: int | None = None,
                  log=print) -> StreamedDataset:
    """ImageNet from `path` (default: `$LOTTERY_DATA/imagenet`), `validation_size` training
    images held out as the validation set (the 50,000 validation images are the test set).
    `augment`: random-resized crops and flips of the training images (else their central
    crop); `num_workers`: decoding processes (null: one per core less one)."""
    folder = os.path.expanduser(path) if path else str(data_root() / "imagenet")
    if not os.path.isdir(folder):
        raise DataError(f"imagenet: no folder {folder}. {GET_IMAGENET}, in {folder}/ (or set "
                        "dataset.path=DIR, or point $LOTTERY_DATA at a folder holding "
                        "imagenet/)")
    return _load("imagenet", folder, resolution, validation_size, augment, num_workers, log)


def load_image_folder(path: str | None = None, resolution: int = 64,
                      validation_size: int = 1000, augment: bool = True,
                      num_workers: int | None = None, log=print) -> StreamedDataset:
    """The image folder at `path` (required): classes the sorted subfolders of DIR/train,
    the test set DIR/val, `validation_size` training images held out as the validation set;
    images at `resolution` px; `augment`, `num_workers` as for ImageNet."""
    if path is None:
        raise DataError(f"dataset.path is required for image_folder: the folder holding train/ "
                        f"and val/ ({LAYOUT})")
    return _load("image_folder", os.path.expanduser(path), resolution, validation_size,
                 augment, num_workers, log)


def _load(name, folder, resolution, validation_size, augment, num_workers, log):
    files = read_folder(folder, name)
    data = StreamedDataset(name, files, resolution, validation_size, augment,
                           default_workers() if num_workers is None else num_workers)
    log(f"{name}: {len(files.train_paths)} training images in {data.num_classes} classes "
        f"({validation_size} held out for validation), {len(files.test_paths)} test images, "
        f"from {files.root}; decoded " + (f"by {plural(data.num_workers, 'worker process', 'worker processes')}"
                                          if data.num_workers else "in this process"))
    return data
