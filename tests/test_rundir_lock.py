"""One writer per run directory (`lottery/rundir.py`): while one process holds a directory's
lock, another stops at once with one line naming the holder; the lock goes when its holder
ends, even by SIGKILL; and two identical `lottery` commands on one directory give one
complete record, not two interleaved ones."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from lottery.config import ConfigError
from lottery.rundir import LOCK_NAME, exclusive

# Holds the lock of the directory argv[1] until its stdin closes. POSIX locks belong to a
# process, so the holder must be another process than the test's.
HOLDER = """
import sys
from lottery.rundir import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s lock (returns once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    return holder


def refusal(run_dir: Path) -> str:
    with pytest.raises(ConfigError) as error:
        with exclusive(run_dir):
            pass
    return str(error.value)


def test_a_held_directory_is_refused_naming_the_holder(tmp_path):
    holder = hold(tmp_path)
    try:
        message = refusal(tmp_path)
        written = json.loads((tmp_path / LOCK_NAME).read_text())
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert "\n" not in message
    assert f"pid {holder.pid} on {socket.gethostname()}, since {written['since']}" in message
    assert "wait for it to finish, or stop that process" in message
    assert written["host"] == socket.gethostname() and written["pid"] == holder.pid
    assert datetime.fromisoformat(written["since"]).utcoffset().total_seconds() == 0
    with exclusive(tmp_path):  # the holder finished: the lock is free
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    holder = hold(tmp_path)
    assert f"pid {holder.pid} " in refusal(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with exclusive(tmp_path):
        pass
    holder.stdin.close()


def test_the_same_process_cannot_take_it_twice(tmp_path):
    # a second descriptor's close would release the first one's POSIX lock
    with exclusive(tmp_path):
        assert "already in use by this process" in refusal(tmp_path)
    with exclusive(tmp_path):  # and the first one released it
        pass


# test_resume.py's config (3 branches x 1 replicate, 2 levels of 40 steps on 8x8 synthetic
# data), so that in a whole session its programs are already in the compilation cache.
CONFIG = ["dataset=synthetic", "dataset.shape=[8,8,1]", "dataset.train_size=600",
          "dataset.validation_size=100", "dataset.test_size=100", "train.steps=40",
          "train.eval_every=10",
          "train.batch_size=20", "prune.levels=2", "replicates=1", "rewind.step=10",
          "train.checkpoint_every=20"]
BRANCHES = ("ticket", "reinit", "random_prune")


def lottery(run_dir: Path, log: Path) -> subprocess.Popen:
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "lottery.cli", *CONFIG,
                                 f"hydra.run.dir={run_dir}"], stdout=out, stderr=err)


def test_two_identical_commands_give_one_record(tmp_path):
    run_dir = tmp_path / "run"
    logs = {name: tmp_path / name for name in ("a", "b")}
    started = {name: lottery(run_dir, log) for name, log in logs.items()}  # together
    while not (run_dir / "record.jsonl").exists():  # one holds the lock and has begun
        assert any(p.poll() is None for p in started.values()), logs["a"].with_suffix(
            ".err").read_text() + logs["b"].with_suffix(".err").read_text()
        time.sleep(0.02)
    pid = json.loads((run_dir / LOCK_NAME).read_text())["pid"]
    name = next(name for name, p in started.items() if p.pid == pid)
    first, second = started.pop(name), started.popitem()[1]
    try:
        # Stop the writer mid-run (as Ctrl-Z would) until the other command is done, so that
        # the two surely overlap: without the lock both would write the record.
        first.send_signal(signal.SIGSTOP)
        overlapped = first.poll() is None
        second.wait(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    first_log, second_log = logs[name], logs["b" if name == "a" else "a"]
    assert first.wait(timeout=300) == 0, first_log.with_suffix(".err").read_text()
    err = second_log.with_suffix(".err").read_text()
    if overlapped:
        assert second.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"lottery: error: {run_dir} is in use by another run (pid "
                                   f"{first.pid} on {socket.gethostname()}, since "), lines[0]
    else:  # the first had already finished
        assert second.returncode == 0, err
        assert "already finished" in second_log.with_suffix(".out").read_text()

    rows = [json.loads(line) for line in (run_dir / "record.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r.get("level"), r.get("branch"), r.get("replicate"), r.get("step"))
            for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert [r["kind"] for r in rows].count("run") == 1
    summaries = {(r["level"], r["branch"]) for r in rows if r["kind"] == "summary"}
    assert summaries == {(level, b) for level in range(3) for b in BRANCHES}
    finals = {(r["level"], r["branch"]) for r in rows if r["kind"] == "eval" and r["step"] == 40}
    assert finals == summaries


# ------------------------------------------- a refused run's directory (`rundir.discard`)


def stub(run_dir: Path, *extra: str) -> Path:
    """What a Hydra job makes when it starts (`.hydra/` with its three files, the job log),
    and `extra` empty files beside them."""
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text("x: 1\n")
    for name in ("cli.log", *extra):
        (run_dir / name).write_text("")
    return run_dir


def test_discard_removes_a_stub_and_the_parents_it_left_empty(tmp_path, monkeypatch):
    from lottery.rundir import discard

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "other").mkdir(parents=True)  # keeps outputs/ non-empty
    run_dir = stub(tmp_path / "outputs" / "default" / "abc", LOCK_NAME)
    assert discard(run_dir, (".hydra", "cli.log"))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "outputs", "outputs/other"]


def test_discard_keeps_a_run_a_held_directory_and_the_working_directory(tmp_path, monkeypatch):
    from lottery.rundir import discard

    monkeypatch.chdir(tmp_path)
    made = (".hydra", "cli.log")
    run = stub(tmp_path / "run", "record.jsonl")  # a run's record: not a stub
    assert not discard(run, made) and (run / "record.jsonl").exists()
    held = stub(tmp_path / "held")
    holder = hold(held)  # a run starting there holds the lock
    try:
        assert not discard(held, made) and (held / ".hydra" / "hydra.yaml").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert discard(held, made) and not held.exists()  # once no one holds it
    here = stub(tmp_path / "here")
    monkeypatch.chdir(here)  # hydra.run.dir=.: the files go, the working directory stays
    assert discard(here, made) and here.is_dir() and not any(here.iterdir())
