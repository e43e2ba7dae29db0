"""The run folder's one owner (`lottery.record`) and the one atomic writer (`lottery.atomic`),
on files written or read here by hand: names of the level files, npz written and read back,
the JSONL reader, sweep jobs in number order, a write that fails half-way, and the W&B
summary run logged once, or warned about when W&B fails."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import wandb

from lottery import record
from lottery.atomic import sha256, write_atomically


def test_level_file_names(tmp_path):
    assert record.level_file(tmp_path, 3) == tmp_path / "levels" / "level_03.npz"
    assert record.level_file(tmp_path, 3, "reinit") == tmp_path / "levels" / "level_03_reinit.npz"
    assert record.trained_file(tmp_path, 12) == tmp_path / "levels" / "trained_12.npz"
    assert record.rewind_file(tmp_path) == tmp_path / "rewind.npz"


def test_saved_levels_are_the_tickets_in_order(tmp_path):
    assert record.saved_levels(tmp_path) == {}
    (tmp_path / "levels").mkdir()
    for name in ("level_10.npz", "level_00.npz", "level_02.npz", "level_01_reinit.npz",
                 "trained_00.npz", "level_03.npz.tmp"):
        (tmp_path / "levels" / name).write_bytes(b"")
    found = record.saved_levels(tmp_path)
    assert list(found) == [0, 2, 10]
    assert found[2] == tmp_path / "levels" / "level_02.npz"


def test_save_arrays_writes_compressed_npz_with_path_keys(tmp_path):
    kernel = np.arange(24, dtype=np.float32).reshape(2, 3, 4) % 3  # 0, 1, 2: as bool 0, 1, 1
    tree = {"fc1": {"kernel": kernel, "bias": np.zeros((2, 4), np.float32)},
            "out": {"kernel": np.ones((2, 4, 1), np.float32)}}
    path = tmp_path / "levels" / "level_00.npz"
    record.save_arrays(path, tree, bool)
    assert sorted(p.name for p in path.parent.iterdir()) == ["level_00.npz"]  # no temporary
    with np.load(path) as archive:  # read without the owner
        assert sorted(archive.files) == ["fc1/bias", "fc1/kernel", "out/kernel"]
        assert archive["fc1/kernel"].dtype == bool
        assert archive["fc1/kernel"].tolist() == (kernel != 0).tolist()
        assert not archive["fc1/bias"].any() and archive["out/kernel"].all()
    with open(path, "rb") as f:  # compressed members (zip method 8, deflate)
        assert f.read(10)[8:10] == b"\x08\x00"
    got = record.load_arrays(path, ["out/kernel", "fc1/kernel"])
    assert list(got) == ["out/kernel", "fc1/kernel"] and got["out/kernel"].shape == (2, 4, 1)
    assert sorted(record.load_arrays(path)) == ["fc1/bias", "fc1/kernel", "out/kernel"]
    assert record.load_arrays(path, ["fc1/kernel"], np.float32)["fc1/kernel"].dtype == np.float32
    with pytest.raises(KeyError, match="lacks fc2/kernel"):
        record.load_arrays(path, ["fc1/kernel", "fc2/kernel"])
    with pytest.raises(FileNotFoundError, match="level_01.npz does not exist"):
        record.load_arrays(path.with_name("level_01.npz"))


def test_write_atomically_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "file"
    write_atomically(path, lambda f: f.write(b"old"))
    assert path.read_bytes() == b"old"

    def half(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half)
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]
    write_atomically(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [path]
    assert sha256(path) == hashlib.sha256(b"new").hexdigest()


def test_rows_are_read_in_order_and_by_kind(tmp_path):
    path = tmp_path / record.RECORD_NAME
    path.write_text('{"kind": "run", "config": {}}\n\n{"kind": "eval", "step": 0}\n'
                    '{"kind": "eval", "step": 20}\n  \n{"kind": "summary", "level": 0}\n')
    assert [row.get("step") for row in record.read_rows(path)] == [None, 0, 20, None]
    assert record.recorded_rows(path, "eval") == [{"kind": "eval", "step": 0},
                                                  {"kind": "eval", "step": 20}]
    assert record.recorded_rows(tmp_path / "missing.jsonl", "eval") == []
    evals = record.load(tmp_path, kind="eval")
    assert evals["step"].tolist() == [0, 20] and evals["step"].dtype == int
    assert list(evals.columns) == ["run", "kind", "step"]  # no column only other kinds fill


def test_sweep_jobs_load_in_number_order(tmp_path):
    for job in (10, 2, 0, 1):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / record.RECORD_NAME).write_text(
            json.dumps({"kind": "summary", "level": job}) + "\n")
    assert [d.name for d in record.run_dirs(tmp_path)] == ["0", "1", "2", "10"]
    assert record.load(tmp_path, kind="summary")["run"].tolist() == ["0", "1", "2", "10"]
    assert record.run_dirs(tmp_path / "2" / record.RECORD_NAME) == [tmp_path / "2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / record.RECORD_NAME).write_text("")
    assert record.load(empty, kind="summary").empty
    with pytest.raises(FileNotFoundError, match="no record.jsonl"):
        record.load(tmp_path / "nothing")


@pytest.fixture
def finished_run(tmp_path):
    rows = [{"kind": "run", "name": "g", "config": {"logger": {"project": "p"}}},
            {"kind": "eval", "level": 0, "branch": "ticket", "replicate": 0, "step": 0},
            {"kind": "summary", "level": 0, "branch": "ticket", "replicate": 0,
             "density": 1.0, "early_stop_step": 0, "early_stop_test_accuracy": 0.5}]
    (tmp_path / record.RECORD_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_wandb_summary_failure_is_one_warning_and_is_tried_again(finished_run, monkeypatch,
                                                                  capsys):
    def broken(**kwargs):
        raise RuntimeError("no W&B here")

    monkeypatch.setattr(wandb, "init", broken)
    record.wandb_summary(finished_run)
    assert capsys.readouterr().err.splitlines() == [
        "lottery: warning: W&B summary not logged (RuntimeError: no W&B here); the local "
        "record is complete"]
    assert not (finished_run / record.SUMMARY_LOGGED).exists()
    calls = []

    class Run:
        def log(self, values):
            calls.append(sorted(values))

        def finish(self):
            calls.append("finish")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or Run())
    monkeypatch.setattr(wandb, "Table", lambda dataframe: dataframe)
    record.wandb_summary(finished_run)
    init, logged, finish = calls
    assert (init["project"], init["group"], init["job_type"]) == ("p", "g", "summary")
    assert init["name"].startswith("g-") and init["name"].endswith("-summary")
    assert logged == ["evaluations", "levels", "summaries"] and finish == "finish"
    assert (finished_run / record.SUMMARY_LOGGED).exists()


def test_a_branch_missing_at_a_level_leaves_its_cells_empty():
    """An LM run's `dense` branch exists at round 0 only, its variants from round 1: each
    level's row has the branches it has, empty cells for the others (counted by hand)."""
    rows = [{"level": 0, "branch": "dense", "replicate": 0, "density": 1.0,
             "early_stop_test_accuracy": 0.5, "early_stop_step": 10},
            {"level": 1, "branch": "prune", "replicate": 0, "density": 0.5,
             "early_stop_test_accuracy": 0.25, "early_stop_step": 20}]
    lines = record.markdown_table(pd.DataFrame(rows)).splitlines()
    assert lines[0] == ("| level | % remaining | dense early-stop iter | dense early-stop test "
                        "acc (%) | prune early-stop iter | prune early-stop test acc (%) |")
    assert lines[2] == "| 0 | 100.0 | 10 ± 0 | 50.00 ± 0.00 |  |  |"
    assert lines[3] == "| 1 | 50.0 |  |  | 20 ± 0 | 25.00 ± 0.00 |"
