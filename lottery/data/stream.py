"""Datasets larger than memory: image folders decoded and augmented on the host by a Grain
pipeline, shipped to the device as uint8 batches (normalised there with `mean` and `std`).

The order is the in-memory path's: training step s of a member whose data key is `key`
takes the examples `batch_indices(key, s, train_size, batch_size)` (`lottery.data.order`),
computed on the host with JAX on the CPU (jitted; worker processes are kept off any
accelerator), one step at a time, where the step's batch is decoded. The augmentation of
the example at position t of step s's batch draws from a numpy Generator seeded by
(key, s, t). So a batch is a pure function of (keys, step): it does not depend on the number
of workers or processes, nor on what was asked for before, and a killed run resumes by
asking for batches from its saved step (`train_batches(keys, saved_step, ...)`); nothing
else about the stream needs saving.

Decoding runs in `num_workers` Grain worker processes (`mp_prefetch`, each decoding whole
batches, `AHEAD` of the trainer; 0: in this process, on `THREADS` threads). A training
pipeline stays up between calls and runs on into the next call's steps when that call
continues where the last ended; a call that starts elsewhere (a resumed run, another batch
size or set of members) starts a new one: a worker takes seconds to start (it imports JAX).
Evaluation and `sample` start a pipeline per call, with at most one worker per `PER_WORKER`
examples. Each worker holds about 2 * AHEAD + 2 of its batches in shared memory (/dev/shm).
"""

import functools
import os
from dataclasses import dataclass

import grain
import jax
import numpy as np

from lottery.data.dataset import DataError, hold_out
from lottery.data.folder import ImageFiles
from lottery.data.images import MEAN, STD, decode, eval_view, train_view
from lottery.data.order import batch_indices

AHEAD = 2  # batches each worker (or the in-process reader) prepares ahead
THREADS = 2  # decoding threads of the in-process reader (num_workers=0)
# a worker takes seconds to start (it imports JAX): an evaluation pipeline gets at most one
# worker per this many examples (a small evaluation set is decoded in this process)
PER_WORKER = 256
STEPS = 2**31 - 1  # training steps are int32, as the trainer's
SAMPLE_SEED = 0  # picks `sample`'s examples
SPLITS = ("val", "test")


def _path(root: str, paths: np.ndarray, index) -> str:
    return os.path.join(root, os.fsdecode(paths[index]))


@dataclass(frozen=True)
class _Examples:
    """The Grain source of an evaluation pipeline: element k is (path, label), path None
    for padding (`order[k]` = -1), else the split's example `order[k]`."""

    root: str
    paths: np.ndarray
    labels: np.ndarray
    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        index = int(self.order[k])
        if index < 0:
            return None, 0
        return _path(self.root, self.paths, index), int(self.labels[index])


@dataclass(frozen=True)
class _View:
    """(path, label) -> (uint8 image, int32 label, float32 weight) in the evaluation view;
    zeros of weight 0 for padding."""

    resolution: int

    def __call__(self, record):
        path, label = record
        if path is None:
            return (np.zeros((self.resolution, self.resolution, 3), np.uint8), np.int32(0),
                    np.float32(0))
        return eval_view(decode(path), self.resolution), np.int32(label), np.float32(1)


@dataclass(frozen=True)
class _Steps:
    """The Grain source of a training pipeline: element j is (member, step) =
    (j % members, first + j // members), every step from `first` on."""

    members: int
    first: int

    def __len__(self) -> int:
        return (STEPS - self.first) * self.members

    def __getitem__(self, j: int):
        step, member = divmod(j, self.members)
        return member, self.first + step


@dataclass(frozen=True)
class _TrainBatch:
    """(member, step) -> this process's share of the member's batch at that step: uint8
    images (local, R, R, 3) and int32 labels (local,), positions [offset, offset + local)."""

    root: str
    paths: np.ndarray
    labels: np.ndarray
    keys: np.ndarray
    batch_size: int
    offset: int
    local: int
    resolution: int
    augment: bool

    def __call__(self, element):
        member, step = element
        key = self.keys[member]
        order = example_order(key[None], np.array([step]), len(self.paths), self.batch_size)
        indices = order[0, 0, self.offset:self.offset + self.local]
        images = np.empty((self.local, self.resolution, self.resolution, 3), np.uint8)
        for t, index in enumerate(indices):
            image = decode(_path(self.root, self.paths, index))
            if self.augment:
                rng = np.random.default_rng((*key.tolist(), step, self.offset + t))
                images[t] = train_view(image, self.resolution, rng)
            else:
                images[t] = eval_view(image, self.resolution)
        return images, self.labels[indices]


def _flags_parsed() -> None:
    """Grain reads absl flags (mp_prefetch reads --grain_enable_multiprocess_worker_profiling)
    and absl refuses to read them before they are parsed, which a program not started by
    absl.app never does: let them keep their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _host_only(worker: int, workers: int) -> None:
    """In a worker process, before anything runs: JAX on the CPU only (the order's
    computation), never initialising an accelerator's backend."""
    jax.config.update("jax_platforms", "cpu")


def _pipeline(source, transform, workers: int, batch: int | None = None):
    """An iterator over `transform` of `source`'s elements (in batches of `batch`, if
    given), computed `AHEAD` elements ahead by `workers` worker processes (0: in this
    process, on `THREADS` threads)."""
    dataset = grain.MapDataset.source(source).map(transform)
    if batch is not None:
        dataset = dataset.batch(batch)
    # a worker computes one element at a time: it runs ahead of the trainer already
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0) if workers
        else grain.ReadOptions(num_threads=THREADS, prefetch_buffer_size=AHEAD))
    if workers:
        _flags_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=AHEAD), worker_init_fn=_host_only)
    return iter(dataset)


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


@functools.cache
def _order_program(n: int, batch_size: int):
    def order(keys, steps):
        return jax.vmap(lambda key: batch_indices(jax.random.wrap_key_data(key), steps, n,
                                                  batch_size))(keys)

    return jax.jit(order)


def example_order(keys: np.ndarray, steps: np.ndarray, n: int, batch_size: int) -> np.ndarray:
    """int32 (members, steps, batch_size): `batch_indices` of each member's key (a row of
    raw key data) at `steps`, computed by JAX on the CPU."""
    cpu = jax.local_devices(backend="cpu")[0]  # this process's: in a several-process run
    #                                             jax.devices' first may be another's
    order = _order_program(n, batch_size)(jax.device_put(np.asarray(keys), cpu),
                                          jax.device_put(np.asarray(steps, np.int32), cpu))
    return np.asarray(order)


class _TrainStream:
    """A running training pipeline of one set of members' keys at one batch size, this
    process's share of each batch; `next_step` is the first step not yet handed out."""

    def __init__(self, data: "StreamedDataset", keys: np.ndarray, first: int, batch_size: int,
                 offset: int, local: int):
        self.plan = (keys.tobytes(), keys.shape, batch_size, offset, local)
        self.next_step, self.members = first, len(keys)
        transform = _TrainBatch(data.files.root, data.train_paths, data.train_labels, keys,
                                batch_size, offset, local, data.resolution, data.augment)
        self.iterator = _pipeline(_Steps(len(keys), first), transform, data.num_workers)

    def fill(self, x: np.ndarray, y: np.ndarray) -> None:
        """The next `x.shape[1]` steps into x (members, steps, local, R, R, 3), y."""
        for step in range(x.shape[1]):
            for member in range(self.members):
                images, labels = next(self.iterator)
                x[member, step], y[member, step] = images, labels
                del images, labels  # a worker's shared memory, freed now
        self.next_step += x.shape[1]

    def close(self) -> None:
        _close(self.iterator)


class StreamedDataset:
    """An image folder (`lottery.data.folder`), read as it trains.

    Splits: "train" (the training folder less the validation set), "val" (a fixed random
    `validation_size` images held out of the training folder, as `hold_out` does for the
    in-memory datasets: the same every run) and "test" (the folder's val/ images). Images
    are `input_shape` = (resolution, resolution, 3) uint8; `mean` and `std` (float32 (3,),
    ImageNet's, scaled for 0..255) normalise them on the device: (x - mean) / std.
    """

    def __init__(self, name: str, files: ImageFiles, resolution: int, validation_size: int,
                 augment: bool = True, num_workers: int = 0):
        self.name, self.files, self.resolution = name, files, resolution
        self.augment, self.num_workers = augment, num_workers
        self.num_classes = len(files.classes)
        self.input_shape = (resolution, resolution, 3)
        self.mean, self.std = MEAN.copy(), STD.copy()
        self.train_paths, self.train_labels, self.val_paths, self.val_labels = hold_out(
            files.train_paths, files.train_labels, validation_size)
        self.train_size = len(self.train_paths)
        self._train: _TrainStream | None = None
        self._sample: tuple[np.ndarray, np.ndarray] | None = None

    def split_size(self, split: str) -> int:
        """Examples in split "train", "val" or "test"."""
        return {"train": self.train_size, "val": len(self.val_paths),
                "test": len(self.files.test_paths)}[split]

    def train_batches(self, keys, start_step: int, steps: int, batch_size: int,
                      process_index: int = 0, process_count: int = 1):
        """Training steps [start_step, start_step + steps) of every member: x uint8
        (members, steps, local_batch, R, R, 3) and y int32 (members, steps, local_batch).

        `keys`: the members' raw data keys (`jax.random.key_data`), one uint32 row each.
        Step s of member m takes `batch_indices(wrap_key_data(keys[m]), s, train_size,
        batch_size)`; this process takes positions [p * local, (p + 1) * local) of it,
        local_batch = batch_size // process_count. Asking for the steps after the last call's
        continues its pipeline (decoded ahead); any other start starts a new one."""
        keys = np.asarray(keys, np.uint32)
        if keys.ndim != 2 or not len(keys):
            raise DataError(f"keys must be raw key data, one row per member; got shape "
                            f"{keys.shape}")
        local = _local_batch(batch_size, process_index, process_count)
        if batch_size > self.train_size:
            raise DataError(f"batch_size={batch_size} exceeds the {self.train_size} training "
                            f"examples of {self.name}")
        for name, value in (("start_step", start_step), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise DataError(f"{name}={value!r} must be an integer >= 0")
        offset = process_index * local
        plan = (keys.tobytes(), keys.shape, batch_size, offset, local)
        if self._train is None or (self._train.plan, self._train.next_step) != (plan, start_step):
            self.close()
            self._train = _TrainStream(self, keys, int(start_step), batch_size, offset, local)
        x = np.empty((len(keys), steps, local, *self.input_shape), np.uint8)
        y = np.empty((len(keys), steps, local), np.int32)
        try:
            self._train.fill(x, y)
        except BaseException:  # an image that does not decode, an interrupt: start afresh
            self.close()
            raise
        return x, y

    def eval_batches(self, split: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1):
        """An iterator over split "val" or "test" in batches (x uint8 (local, R, R, 3),
        y int32 (local,), weight float32 (local,)), the last padded with zeros of weight 0.
        The global batch is min(batch_size, split size) (rounded up to a multiple of
        process_count); this process takes positions [p * local, (p + 1) * local) of each,
        local = batch // process_count. Images in the evaluation view."""
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {SPLITS}")
        paths, labels = ((self.val_paths, self.val_labels) if split == "val"
                         else (self.files.test_paths, self.files.test_labels))
        _local_batch(batch_size, process_index, process_count)
        batch = min(batch_size, -(-len(paths) // process_count) * process_count)
        local, count = batch // process_count, -(-len(paths) // batch)
        positions = np.arange(count * batch).reshape(count, batch)
        positions = positions[:, process_index * local:(process_index + 1) * local].reshape(-1)
        examples = _Examples(self.files.root, paths, labels,
                             np.where(positions < len(paths), positions, -1))
        return _eval_iterator(examples, self.resolution, local, count, self.num_workers)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A fixed `n` training examples, resident: x float32 (n, R, R, 3), normalised, in
        the evaluation view, and y int32 (n,). The same examples every call and run (the
        first n of a fixed permutation: a smaller n gives a prefix of a larger one), for
        the programs that need data on the device (data-dependent pruning scores,
        batch-norm statistics)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= self.train_size:
            raise DataError(f"sample size {n!r} must be an integer in [1, {self.train_size}]")
        if self._sample is None or len(self._sample[0]) < n:
            chosen = np.random.default_rng(SAMPLE_SEED).permutation(self.train_size)[:n]
            examples = _Examples(self.files.root, self.train_paths, self.train_labels, chosen)
            batch = min(n, 256)
            parts = list(_eval_iterator(examples, self.resolution, batch, -(-n // batch),
                                        self.num_workers))
            self._sample = (np.concatenate([x for x, _, _ in parts])[:n],
                            np.concatenate([y for _, y, _ in parts])[:n])
        x, y = self._sample
        return (x[:n].astype(np.float32) - self.mean) / self.std, y[:n].copy()

    def close(self) -> None:
        """Stop the training pipeline's workers (a later call starts new ones)."""
        if self._train is not None:
            self._train.close()
            self._train = None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def __repr__(self) -> str:
        return (f"StreamedDataset({self.name!r}, {self.num_classes} classes, "
                f"{self.train_size} train / {self.split_size('val')} val / "
                f"{self.split_size('test')} test images at {self.resolution} px, "
                f"root={self.files.root!r})")


def _local_batch(batch_size: int, process_index: int, process_count: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r} must be a positive integer")
    if batch_size % process_count:
        raise DataError(f"batch_size={batch_size} must be a multiple of the {process_count} "
                        "processes: each takes an equal share of every batch")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, {process_count})")
    return batch_size // process_count


def _eval_iterator(examples: _Examples, resolution: int, batch: int, count: int, workers: int):
    """The `count` batches of `examples` in the evaluation view, copied out of the workers'
    shared memory."""
    workers = min(workers, len(examples) // PER_WORKER)
    iterator = _pipeline(examples, _View(resolution), workers, batch)
    try:
        for _ in range(count):
            x, y, weight = next(iterator)
            yield np.array(x), np.array(y), np.array(weight)
    finally:
        _close(iterator)
