"""W&B mirroring: offline runs under the run directory, one per (branch, replicate), and a
W&B failure that is warned about once and leaves the JSONL record complete."""

import time

import pandas as pd
import pytest
import wandb

import helpers
from lottery.analysis.plots import summary_figures
from lottery.record import load, wandb_summary

R, LEVELS, EVALS = 2, 2, 3
MEMBERS = 3 * R


def eval_rows(run_dir):
    return load(run_dir, kind="eval").drop(columns="run")


def assert_record_complete(run_dir, main_run):
    """Every row of the reference run, with the same numbers (W&B changes nothing)."""
    pd.testing.assert_frame_equal(eval_rows(run_dir), eval_rows(main_run.dir))
    summaries = load(run_dir, kind="summary").drop(columns=["run", "seconds"])
    reference = load(main_run.dir, kind="summary").drop(columns=["run", "seconds"])
    pd.testing.assert_frame_equal(summaries, reference)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, session_tmp):
    """The run, then its summary run as `lottery.cli` logs it after the run, twice (as when a
    finished run is started again)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        run = helpers.spied_run(helpers.run_config("logger=wandb"),
                                tmp_path_factory.mktemp("wandb") / "run")
        for _ in range(2):
            wandb_summary(run.dir, summary_figures(run.summaries, run.dir, run.cfg.name))
    return run


KEYS = (b"val_loss", b"test_accuracy", b"summary/early_stop_step", b"lenet_300_100")


def wandb_log(run_dir, patience: float = 60.0, keys=KEYS) -> bytes:
    """The offline run's transaction log (uncompressed protobuf records). `run.finish()`
    returns a few milliseconds before W&B's writer process has flushed it, so wait (at most
    `patience` seconds) until it holds what was logged."""
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + patience
    while True:
        data = files[0].read_bytes()
        if all(key in data for key in keys) or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def test_offline_runs_are_written_under_the_run_directory(offline_run, main_run):
    runs = sorted((offline_run.dir / "wandb").glob("offline-run-*"))
    assert len(runs) == MEMBERS + 1  # one per (branch, replicate), and the group's summary
    logs = [wandb_log(run, keys=(b"lenet_300_100",)) for run in runs]
    summary = [(run, data) for run, data in zip(runs, logs) if b"-summary" in data]
    assert len(summary) == 1
    for run, data in zip(runs, logs):
        if data is summary[0][1]:
            continue
        data = wandb_log(run)
        for key in KEYS:
            assert key in data, (run.name, key)
    tables = (b"summaries", b"levels", b"evaluations", b"accuracy_vs_density")
    data = wandb_log(summary[0][0], keys=tables)
    for key in tables:
        assert key in data, key
    assert (offline_run.dir / "accuracy_vs_density.png").exists()
    assert_record_complete(offline_run.dir, main_run)


def test_record_is_complete_with_wandb(offline_run, main_run):
    record = load(offline_run.dir)
    assert record[record.kind == "run"]["config"].iloc[0]["logger"]["name"] == "wandb"
    assert len(record[record.kind == "eval"]) == (LEVELS + 1) * MEMBERS * EVALS
    assert len(record[record.kind == "summary"]) == (LEVELS + 1) * MEMBERS


def test_wandb_failure_warns_once_and_keeps_the_record(tmp_path, monkeypatch, capsys, main_run):
    calls = []

    def broken_init(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("no W&B here")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = helpers.spied_run(helpers.run_config("logger=wandb"), tmp_path / "run")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "W&B" in line]
    assert warnings == ["lottery: warning: W&B disabled for this run (RuntimeError: no W&B here); "
                        "the local record is complete"]
    assert len(calls) == 1  # the sink turned itself off after the first failure
    assert calls[0]["job_type"] == "ticket" and calls[0]["dir"] == str(run.dir)
    assert_record_complete(run.dir, main_run)
    assert not (run.dir / "wandb").exists() or not list((run.dir / "wandb").glob("offline-run-*"))
