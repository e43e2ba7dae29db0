"""W&B mirroring: offline runs under the run directory, one per (branch, replicate), none of
W&B's own chatter on the terminal but one line saying where the runs are, and a W&B failure
that is warned about once and leaves the JSONL record complete."""

import glob
import json
import shlex
import time
from pathlib import Path

import pandas as pd
import pytest
import wandb

import helpers
from lottery.analysis.plots import summary_figures
from lottery.record import SUMMARY_LOGGED, load, wandb_summary
from lottery.record.wandb_sink import where_runs_are

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


OFFLINE_RUN = {}  # the module's run, made once, by the first test that asks for it


@pytest.fixture
def offline_run(tmp_path_factory, session_tmp, monkeypatch, capfd):
    """The run, then its summary run as `lottery.cli` logs it after the run, twice (as when a
    finished run is started again); `printed`: what each of the two printed (stdout and
    stderr, the second without the run). W&B starts afresh without the session's
    $WANDB_SILENT (conftest.py), as for a user: it reads its environment once per process."""
    if not OFFLINE_RUN:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.delenv("WANDB_SILENT", raising=False)
        wandb.teardown()
        try:
            run = helpers.spied_run(helpers.run_config("logger=wandb"),
                                    tmp_path_factory.mktemp("wandb") / "run")
            run.printed = []
            for _ in range(2):
                wandb_summary(run.dir, summary_figures(run.summaries, run.dir, run.cfg.name))
                run.printed.append(capfd.readouterr())
        finally:
            wandb.teardown()  # the next W&B run reads the session's environment again
        OFFLINE_RUN["run"] = run
    return OFFLINE_RUN["run"]


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


def test_wandb_says_one_line_where_the_offline_runs_are(offline_run):
    """None of W&B's own lines ("wandb: ..."); one line naming the folder of the offline runs
    and the `wandb sync` command that uploads them, each time the run is started."""
    folder = (offline_run.dir / "wandb").resolve()
    for printed in offline_run.printed:
        lines = (printed.out + printed.err).splitlines()
        assert not [line for line in lines if line.lower().startswith("wandb")], lines
        said = [line for line in lines if "wandb sync" in line]
        assert len(said) == 1, lines
        named, command = said[0].removeprefix(f"W&B: {MEMBERS + 1} offline runs in ").split(
            "; upload with: ")
        assert Path(*shlex.split(named)).resolve() == folder
        program, action, *patterns = shlex.split(command)
        assert (program, action) == ("wandb", "sync")
        runs = sorted(Path(path).resolve() for pattern in patterns for path in glob.glob(pattern))
        assert runs == sorted(folder.glob("offline-run-*")) and len(runs) == MEMBERS + 1


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


def test_online_runs_are_named_by_project_and_group(tmp_path, monkeypatch):
    """Online, the line names the project's address (as the summary run gave it, else the
    configured project) and the group: what to open in the browser."""
    (tmp_path / "record.jsonl").write_text(json.dumps(
        {"kind": "run", "name": "g", "config": {"logger": {"project": "p"}}}) + "\n")
    for name in ("run-1", "run-2"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert where_runs_are(tmp_path) == "W&B: 2 runs online in project p, group g"
    (tmp_path / SUMMARY_LOGGED).write_text(json.dumps({"name": "s", "url": "http://x/me/p"}))
    assert where_runs_are(tmp_path) == "W&B: 2 runs online in project http://x/me/p, group g"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert where_runs_are(tmp_path) is None
