"""A run of several processes (`lottery.distributed`): two local `lottery` processes joined
through a coordinator on 127.0.0.1 are one run. Process 0 alone writes the run folder; a
process killed with SIGKILL ends the run in one line from the other; the same command run
again on both resumes from the last checkpoint; and the record is one process's."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_records, overrides, records, run_config

from lottery import imp
from lottery.distributed import DistributedError, _from_environment

RUN = ("dataset.shape=[8,8,1]", "train.steps=40", "train.checkpoint_every=20", "prune.levels=1")


def test_the_three_variables_go_together(monkeypatch):
    for name in ("LOTTERY_COORDINATOR", "LOTTERY_NUM_PROCESSES", "LOTTERY_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert _from_environment() is None
    monkeypatch.setenv("LOTTERY_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(DistributedError, match=r"\$LOTTERY_COORDINATOR set but not "
                                               r"\$LOTTERY_NUM_PROCESSES, \$LOTTERY_PROCESS_ID"):
        _from_environment()
    monkeypatch.setenv("LOTTERY_NUM_PROCESSES", "2")
    monkeypatch.setenv("LOTTERY_PROCESS_ID", "2")
    with pytest.raises(DistributedError, match=r"LOTTERY_PROCESS_ID=2 must be in \[0, 2\)"):
        _from_environment()
    monkeypatch.setenv("LOTTERY_PROCESS_ID", "1")
    assert _from_environment() == {"coordinator_address": "127.0.0.1:1234",
                                   "num_processes": 2, "process_id": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out: Path, crash_second_at: str = "") -> list[subprocess.CompletedProcess]:
    """The same `lottery` command started twice, one CPU device each, as one run whose every
    batch is split over the two processes (`train.mesh.data=2`)."""
    port, started = _free_port(), []
    for index in range(2):
        env = {**os.environ, "LOTTERY_COORDINATOR": f"127.0.0.1:{port}",
               "LOTTERY_NUM_PROCESSES": "2", "LOTTERY_PROCESS_ID": str(index),
               "JAX_NUM_CPU_DEVICES": "1",
               "LOTTERY_CRASH_AT": crash_second_at if index == 1 else ""}
        command = [sys.executable, "-m", "lottery.cli", *overrides(*RUN, "train.mesh.data=2"),
                   f"hydra.run.dir={out}"]
        started.append(subprocess.Popen(command, env=env, cwd=out.parent, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate())
            for p in started]


def test_two_processes_are_one_run_that_resumes_after_one_is_killed(tmp_path):
    out = tmp_path / "run"
    # process 1 is SIGKILLed after its 3rd chunk: level 1's first, after the level's checkpoint
    first, second = _two_processes(out, crash_second_at="chunk:3")
    assert second.returncode == -9
    assert first.returncode == 1, first.stderr[-3000:]
    line = [ln for ln in first.stderr.splitlines() if ln.startswith("lottery: error:")]
    assert len(line) == 1 and line[0].startswith(
        "lottery: error: process 1 of the run's 2 stopped, so process 0 stops too ("), line
    assert line[0].endswith("run the same command on every process again to resume from "
                            "the last checkpoint")

    first, second = _two_processes(out)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr[-3000:] + second.stderr[-3000:]
    assert "lottery: resuming" in first.stdout and "in 2 processes (1 x 2" in first.stdout
    assert "lottery" not in second.stdout  # process 0 speaks for the run
    assert sorted(p.name for p in (out / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]

    imp.run(run_config(*RUN), tmp_path / "one", log=lambda line: None)  # 1 process, 2 devices
    reference, two = records(tmp_path, "one"), records(tmp_path, "run")
    assert two[0]["processes"] == 2 and two[0]["mesh"] == {"stack": 1, "data": 2}
    assert reference[0]["processes"] == 1
    assert_same_records(reference, two, "2 processes")  # each row once: none written twice
