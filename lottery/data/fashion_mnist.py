"""Fashion-MNIST (Xiao et al. 2017): MNIST's format and sizes, clothing instead of digits.

A harder drop-in for MNIST. The four IDX files come from the cache, else Debian's
`dataset-fashion-mnist` package (gzipped in /usr/share/datasets/fashion-mnist/), else
Zalando's download location; each is verified by the sha256 of its decompressed content
(Debian recompressed the .gz files, so hashes of the .gz files would differ).
"""

from pathlib import Path

from lottery.data.dataset import Dataset
from lottery.data.fetch import ensure_files
from lottery.data.idx import idx_dataset

FILES = {  # sha256 of the raw (decompressed) canonical files
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ZALANDO = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
URLS = [ZALANDO]
MEAN, STD = 0.2860, 0.3530  # pixel statistics of the 60,000 training images (scaled to [0, 1])


def load_fashion_mnist(validation_size: int = 5000, log=print) -> Dataset:
    """The 60k/10k split, with a fixed random `validation_size` training images held out."""
    hint = (f"; or install Debian's copy, which is read from {DEBIAN_DIR}/, with "
            "`sudo apt-get install dataset-fashion-mnist`")
    folder = ensure_files("fashion_mnist", FILES, URLS, local_dirs=(DEBIAN_DIR,), log=log,
                          hint=hint)
    return idx_dataset("fashion_mnist", folder, validation_size, MEAN, STD)

