"""Crash-proof runs: killed with SIGKILL at several points and resumed by the same command,
a run's record, masks and rewind weights equal an uninterrupted run's; a corrupt or
half-written checkpoint is detected and an older one used; a finished run is not redone;
one device gives the same numbers as two. Every run is a `lottery` process, as a user or a
cluster scheduler would start it; crashes are injected with `$LOTTERY_CRASH_AT`
(`lottery/faults.py`)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import load_npz

# 3 members (3 branches x 1 replicate) on the 2 test devices: a padded stack. 600 examples in
# batches of 20 are 30 steps per epoch, so chunks of 10 steps end mid-epoch. 8x8 images: a
# LeNet of 50,200 weights instead of 266,200 (what is checked does not depend on the size;
# each of the seven processes trains, evaluates and writes its compressed checkpoints
# faster).
CONFIG = ["dataset=synthetic", "dataset.shape=[8,8,1]", "dataset.train_size=600",
          "dataset.validation_size=100", "dataset.test_size=100", "train.steps=40",
          "train.eval_every=10",
          "train.batch_size=20", "prune.levels=2", "replicates=1", "rewind.step=10",
          "train.checkpoint_every=20"]


def lottery(run_dir: Path, crash: str | None = None, devices: int = 2, config=CONFIG):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}
    env.pop("LOTTERY_CRASH_AT", None)
    if crash:
        env["LOTTERY_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "lottery.cli", *config,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          env=env, timeout=300)


def rows(run_dir: Path) -> list[dict]:
    """The record's rows, less the wall-clock `seconds`."""
    lines = (run_dir / "record.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def saved_arrays(run_dir: Path) -> dict[str, dict]:
    files = sorted(run_dir.glob("levels/*.npz")) + [run_dir / "rewind.npz"]
    return {path.name: load_npz(path) for path in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = lottery(run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """One run killed three times (mid-epoch, between levels, inside a checkpoint write),
    with its newest checkpoint corrupted before one resume, then resumed to the end."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"
    outputs = {}
    # level 0 runs 4 chunks (0 -> 40), level 1 runs 3 (10 -> 40): chunk 5 ends at step 20 of
    # level 1, mid-epoch, before that evaluation is recorded
    for name, crash in (("mid_epoch", "chunk:5"), ("between_levels", "level:1")):
        outputs[name] = lottery(run_dir, crash)
    checkpoints = run_dir / "checkpoints"
    newest = sorted(checkpoints.glob("*.npz"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    outputs["corrupt_then_in_checkpoint_write"] = lottery(run_dir, "checkpoint:2")
    half_written = sorted(checkpoints.glob("*.npz"))[-1]
    manifest_written = half_written.with_suffix(".json").exists()
    outputs["to_the_end"] = lottery(run_dir)
    return run_dir, outputs, newest.name, (half_written.name, manifest_written)


def test_each_crash_killed_the_run(crashed_and_resumed):
    _, outputs, _, _ = crashed_and_resumed
    for name in ("mid_epoch", "between_levels", "corrupt_then_in_checkpoint_write"):
        assert outputs[name].returncode == -signal.SIGKILL, (name, outputs[name].stderr)
    assert outputs["to_the_end"].returncode == 0, outputs["to_the_end"].stderr


def test_resumed_runs_say_where_they_resume(crashed_and_resumed):
    _, outputs, _, _ = crashed_and_resumed
    assert "resuming" in outputs["between_levels"].stdout
    assert "at level 1" in outputs["between_levels"].stdout  # the checkpoint after level 0


def test_a_corrupt_checkpoint_is_detected_and_an_older_one_used(crashed_and_resumed):
    _, outputs, corrupted, _ = crashed_and_resumed
    output = outputs["corrupt_then_in_checkpoint_write"].stdout
    assert f"skipping checkpoint {corrupted.replace('.npz', '.json')}" in output
    assert "fails its sha256 check" in output
    assert "resuming" in output


def test_a_half_written_checkpoint_is_ignored(crashed_and_resumed):
    run_dir, outputs, corrupted, (half_written, manifest_written) = crashed_and_resumed
    # the crash left the newest data without its manifest; the last resume used the
    # checkpoint before it (the one written after level 1), not the corrupt one
    assert half_written > corrupted and not manifest_written
    assert "at level 2" in outputs["to_the_end"].stdout, outputs["to_the_end"].stdout
    assert "skipping" not in outputs["to_the_end"].stdout  # never even looked at
    assert (run_dir / "checkpoints" / "finished.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["finished.json"]


def test_the_record_equals_an_uninterrupted_run_without_duplicates(reference, crashed_and_resumed):
    run_dir = crashed_and_resumed[0]
    expected, resumed = rows(reference), rows(run_dir)
    assert len(resumed) == len(expected)
    assert resumed == expected  # bit-identical numbers, same order, no row twice


def test_masks_and_rewind_weights_equal_an_uninterrupted_run(reference, crashed_and_resumed):
    expected, resumed = saved_arrays(reference), saved_arrays(crashed_and_resumed[0])
    # levels 0-2, each with the ticket's and the two controls' masks, and the rewind weights
    assert expected.keys() == resumed.keys() and len(expected) == 3 * 3 + 1
    for name in expected:
        assert expected[name].keys() == resumed[name].keys()
        for key in expected[name]:
            np.testing.assert_array_equal(resumed[name][key], expected[name][key], err_msg=key)


def test_a_finished_run_is_not_run_again(reference):
    before = (reference / "record.jsonl").read_bytes()
    result = lottery(reference)
    assert result.returncode == 0, result.stderr
    assert "already finished" in result.stdout
    assert "level 0:" not in result.stdout  # nothing trained
    assert (reference / "record.jsonl").read_bytes() == before


def test_one_device_gives_the_numbers_of_two(reference, tmp_path):
    single = tmp_path / "one-device"
    result = lottery(single, devices=1)
    assert result.returncode == 0, result.stderr
    two, one = rows(reference), rows(single)
    assert one[0]["devices"] == 1 and two[0]["devices"] == 2
    assert len(one) == len(two)
    for a, b in zip(one[1:], two[1:]):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
            else:
                assert a[key] == b[key], key
    for name, arrays in saved_arrays(single).items():
        for key, value in arrays.items():
            np.testing.assert_allclose(value, saved_arrays(reference)[name][key], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name}:{key}")
