"""IMP runs on a streamed dataset (`dataset=image_folder`, lottery.data.stream): a run trains
and records every level; it trains what the same images held in memory train (augmentation
off: the same examples in the same order); killed mid-level and rerun, it resumes to the
uninterrupted run's record.

The folder is generated here (small JPEGs made with PIL); the in-memory dataset is decoded
here with PIL and numpy, independently of the streamed path's readers.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import lottery.setup
from helpers import assert_same_records, run_config, two_processes
from lottery import imp
from lottery.config import ConfigError
from lottery.data import Dataset
from lottery.setup import build

CLASSES = ("n01440764", "n01443537", "n01484850")
MEAN = 255 * np.array([0.485, 0.456, 0.406], np.float32)
STD = 255 * np.array([0.229, 0.224, 0.225], np.float32)
SIDE = 16  # every image 16 x 16; resolution 16: the evaluation view resizes to 18, crops 16
# 2 members (ticket, reinit) on one device; 30 training images in batches of 10 (3 steps an epoch); chunks of
# 8 steps (gcd(eval_every, steps, rewind.step)), so 2 streamed calls of 4 steps each; a
# checkpoint inside level 1 at step 16
OPTIONS = {"dataset": "image_folder", "dataset.resolution": "16",
           "dataset.validation_size": "6", "dataset.augment": "false",
           "dataset.num_workers": "0", "model": "conv2", "optimizer": "sgd",
           "optimizer.lr": "0.01", "train.steps": "24",
           "train.eval_every": "8", "train.batch_size": "10", "train.eval_batch_size": "4",
           "train.checkpoint_every": "8", "prune.levels": "1", "rewind.step": "8",
           "branches": "[ticket,reinit]", "replicates": "1", "seed": "0"}


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 12 training JPEGs, 2 test JPEGs per class in class folders."""
    root = tmp_path_factory.mktemp("folder")
    for c, wnid in enumerate(CLASSES):
        for i in range(12):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", 100 * c + i)
        for i in range(2):
            write_image(root / "val" / wnid / f"val_{c}_{i}.JPEG", 1000 + 10 * c + i)
    return root


def config(folder: Path, *args: str):
    return run_config(f"dataset.path={folder}", *args, base=OPTIONS)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "record.jsonl").read_text().splitlines()]


def evaluation_view(path: Path) -> np.ndarray:
    """By hand: the shorter side to round(16 * 256 / 224) = 18 (bilinear), the central 16."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((18, 18), Image.BILINEAR))[1:17, 1:17]


# Normalised as XLA computes it: dividing by a constant is multiplying by its reciprocal,
# up to 1 ulp from numpy's division, which 24 steps of training amplify to ~1e-3 relative.
normalise = jax.jit(lambda x: (x.astype(jnp.float32) - MEAN) / STD)


def in_memory(folder: Path, streamed) -> Dataset:
    """The streamed dataset's splits (its hold-out's membership and order) decoded here."""
    def split(paths):
        paths = [folder / os.fsdecode(p) for p in paths]
        x = np.stack([evaluation_view(p) for p in paths])
        y = np.array([CLASSES.index(p.parent.name) for p in paths], np.int32)
        return np.asarray(normalise(x)), y

    return Dataset("image_folder", *split(streamed.train_paths), *split(streamed.val_paths),
                   *split(streamed.files.test_paths), len(CLASSES))


@pytest.fixture(scope="module")
def streamed_run(folder, tmp_path_factory):
    cfg = config(folder)
    setup = build(cfg, devices=jax.devices()[:1])
    run_dir = tmp_path_factory.mktemp("streamed") / "run"
    imp.run(cfg, run_dir, log=lambda *_: None, setup=setup)
    return setup, run_dir


def test_a_streamed_run_trains_and_records_both_levels(streamed_run):
    setup, run_dir = streamed_run
    assert setup.trainer.streamed and setup.trainer.stream_steps == 4 and setup.chunk == 8
    x, _ = setup.trainer.train_data  # the resident sample: 10 batches capped at the 30
    assert x.shape == (30, 16, 16, 3)
    evaluations = [r for r in rows(run_dir) if r["kind"] == "eval"]
    assert {r["level"] for r in evaluations} == {0, 1}
    assert {r["branch"] for r in evaluations} == {"ticket", "reinit"}
    assert {(r["level"], r["step"]) for r in evaluations} == {
        (0, 0), (0, 8), (0, 16), (0, 24), (1, 8), (1, 16), (1, 24)}
    for r in evaluations:
        assert np.isfinite(r["val_loss"]) and 0 <= r["test_accuracy"] <= 1
    first = [r for r in evaluations if r["level"] == 0 and r["branch"] == "ticket"]
    assert first[-1]["train_loss"] is not None


def test_the_streamed_run_trains_what_the_images_in_memory_train(streamed_run, folder,
                                                                  tmp_path, monkeypatch):
    setup, run_dir = streamed_run
    data = in_memory(folder, setup.data)
    monkeypatch.setattr(lottery.setup, "load_dataset", lambda name, **options: data)
    cfg = config(folder)
    resident = build(cfg, devices=jax.devices()[:1])
    assert not resident.trainer.streamed
    imp.run(cfg, tmp_path / "run", log=lambda *_: None, setup=resident)
    assert_same_records(rows(run_dir), rows(tmp_path / "run"), "resident vs streamed")


def test_what_a_streamed_dataset_cannot_do_yet_is_refused(folder):
    cfg = config(folder, "branches=[ticket,instability]")
    with pytest.raises(ConfigError, match=r"branches=instability is not supported on the "
                                          r"streamed dataset image_folder"):
        build(cfg, devices=jax.devices()[:1])


def lottery_process(folder: Path, run_dir: Path, crash: str | None = None):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
    env.pop("LOTTERY_CRASH_AT", None)
    if crash:
        env["LOTTERY_CRASH_AT"] = crash
    args = [f"{k}={v}" for k, v in OPTIONS.items()] + [f"dataset.path={folder}"]
    return subprocess.run([sys.executable, "-m", "lottery.cli", *args,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          env=env, timeout=300)


def timeless(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows(run_dir)]


def test_a_streamed_run_killed_mid_level_resumes_to_the_same_record(streamed_run, folder,
                                                                   tmp_path):
    _, reference = streamed_run  # the uninterrupted run, on one device too
    run_dir = tmp_path / "crashed"
    # level 0 runs 3 chunks (0 -> 24), level 1 two (8 -> 24): chunk 5 ends level 1 at step
    # 24, before it is recorded; the rerun resumes from the checkpoint at step 16
    killed = lottery_process(folder, run_dir, "chunk:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = lottery_process(folder, run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "at step 16 of level 1" in resumed.stdout, \
        resumed.stdout
    assert timeless(run_dir) == timeless(reference)


def test_two_processes_each_decode_their_half_of_every_batch(streamed_run, folder, tmp_path):
    """The run as two processes of one CPU device each, every batch split over them
    (`train.mesh.data=2`): each process decodes its half, and the record is the one-process
    run's."""
    _, reference = streamed_run
    args = [f"{k}={v}" for k, v in OPTIONS.items()] + [f"dataset.path={folder}",
                                                      "train.mesh.data=2"]
    first, second = two_processes(tmp_path / "two", args)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr[-3000:] + second.stderr[-3000:]
    assert "in 2 processes (1 x 2" in first.stdout and "image_folder: 36 training" in first.stdout
    assert "image_folder" not in second.stdout  # process 0 speaks for the run
    assert_same_records(rows(reference), rows(tmp_path / "two"), "2 processes")


def test_a_run_that_loads_a_streamed_dataset_stops_its_workers(folder, tmp_path):
    """`imp.run` closes the data it loaded: its Grain worker processes stop (they, and their
    shared memory, lived until the interpreter's exit warned of leaked shared memory)."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    imp.run(config(folder, "dataset.num_workers=1"), tmp_path / "run", log=lambda *_: None)
    assert set(multiprocessing.active_children()) <= before
