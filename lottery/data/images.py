"""Decoding one image file and the two standard ImageNet views of it, on the host (PIL and
numpy only: this runs in the input pipeline's worker processes).

- `train_view`: torchvision's `RandomResizedCrop(resolution)` (scale (0.08, 1), ratio
  (3/4, 4/3), bilinear) then `RandomHorizontalFlip()`, drawn from a numpy `Generator`.
- `eval_view`: torchvision's `Resize(round(resolution * 256 / 224))` (the shorter side)
  then `CenterCrop(resolution)`: 256 then 224 at the standard resolution.

Both give uint8 (resolution, resolution, 3) RGB: normalisation happens on the device.
"""

import math

import numpy as np
from PIL import Image

from lottery.data.dataset import DataError

# ImageNet's per-channel statistics (torchvision's), for uint8 input in 0..255
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * np.float32(255)
STD = np.array([0.229, 0.224, 0.225], np.float32) * np.float32(255)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10


def decode(path: str) -> Image.Image:
    """The image at `path` as RGB (greyscale, CMYK and palette images converted)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot decode the image ({error})") from None


def crop_box(height: int, width: int, rng, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's
    `RandomResizedCrop.get_params` (torchvision/transforms/transforms.py), ported draw for
    draw to a numpy Generator `rng`. Up to 10 tries of an area fraction uniform in `scale`
    and an aspect ratio (width / height) log-uniform in `ratio`, the first that fits placed
    uniformly; if none fits, the largest central crop whose ratio is within `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # the fallback: a central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(image: Image.Image, resolution: int, rng) -> np.ndarray:
    """A random resized crop of `image` to `resolution` px square, flipped left-right with
    probability 1/2; the crop's draws come first, then the flip's (one `rng.random()`)."""
    top, left, h, w = crop_box(image.height, image.width, rng)
    # crop, then resize: as torchvision's `resized_crop` (resizing a box of the whole image
    # instead would let the filter read pixels outside the crop)
    view = image.crop((left, top, left + w, top + h)).resize((resolution, resolution),
                                                           Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(view)


def eval_size(resolution: int) -> int:
    """The shorter side an evaluation image is resized to before its central crop."""
    return round(resolution * 256 / 224)


def eval_view(image: Image.Image, resolution: int) -> np.ndarray:
    """The shorter side resized to `eval_size(resolution)` (the longer one in proportion,
    truncated, as torchvision's `Resize`), then the central `resolution` px square (its
    offsets rounded, as torchvision's `CenterCrop`)."""
    short = eval_size(resolution)
    width, height = image.size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    top = int(round((size[1] - resolution) / 2.0))
    left = int(round((size[0] - resolution) / 2.0))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))
