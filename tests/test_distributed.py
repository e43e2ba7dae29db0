"""A run of several processes (`lottery.distributed`): two local `lottery` processes joined
through a coordinator on 127.0.0.1 are one run. Process 0 alone writes the run folder; a
process killed with SIGKILL ends the run in one line from the other; the same command run
again on both resumes from the last checkpoint; and the record is one process's."""

import os
from pathlib import Path

import pytest
from helpers import assert_same_records, overrides, records, run_config, two_processes

from lottery import distributed, imp
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


def test_slurm_tasks_join_and_a_shell_in_an_allocation_does_not(monkeypatch):
    """A task of an `srun` step of several tasks joins through JAX's own SLURM detection
    (no address given); a shell inside `salloc` (no step) and a one-task step do not."""
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize",
                        lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed.jax.config, "update", lambda *args: None)
    for name in (*distributed.ENV, "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.initialize() is False  # salloc's shell: no step
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert distributed.initialize() is False
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    assert distributed.initialize() is True
    assert calls == [{"initialization_timeout": distributed.JOIN,
                      "heartbeat_timeout_seconds": distributed.HEARTBEAT,
                      "shutdown_timeout_seconds": distributed.HEARTBEAT}]


def test_the_multinode_launcher_submits_one_job_of_a_task_per_gpu(tmp_path, monkeypatch):
    """hydra/launcher=slurm_multinode's sbatch script, as submitit writes it from the
    launcher's parameters (translated as hydra-submitit-launcher does): 2 nodes x 4 tasks,
    a GPU per task, the tasks started by one srun step."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from test_launchers import compose_full

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit looks for srun on PATH
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    launcher = instantiate(compose_full("experiment=lenet_sweep", "hydra/launcher=slurm_multinode",
                                        "hydra.launcher.partition=gpu").hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {key if key in base else f"slurm_{key}": value
              for key, value in launcher.params.items()
              if key not in ("submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1", "--partition=gpu"):
        assert f"#SBATCH {option}\n" in script
    assert "--gpus-per-node" not in script and "--array" not in script
    assert "\nsrun " in script


def _two_processes(out: Path, devices: int, crash_second_at: str = ""):
    """The run started as two processes of `devices` CPU devices each, every batch split
    over 2 devices (`train.mesh.data=2`): with 1 device each, over the two processes (1 x 2);
    with 2 each, within each process, the members spread over the two (2 x 2)."""
    return two_processes(out, [*overrides(*RUN), "train.mesh.data=2"], devices,
                         crash_second_at)


def test_two_processes_are_one_run_that_resumes_after_one_is_killed(tmp_path):
    out = tmp_path / "run"
    # process 1 is SIGKILLed after its 3rd chunk: level 1's first, after the level's checkpoint
    first, second = _two_processes(out, devices=2, crash_second_at="chunk:3")
    assert second.returncode == -9
    assert first.returncode == 1, first.stderr[-3000:]
    line = [ln for ln in first.stderr.splitlines() if ln.startswith("lottery: error:")]
    assert len(line) == 1 and line[0].startswith(
        "lottery: error: process 1 of the run's 2 stopped, so process 0 stops too ("), line
    assert line[0].endswith("run the same command on every process again to resume from "
                            "the last checkpoint")

    # resumed on another layout: the checkpoint holds host arrays, not device placements
    first, second = _two_processes(out, devices=1)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr[-3000:] + second.stderr[-3000:]
    assert "lottery: resuming" in first.stdout and "in 2 processes (1 x 2" in first.stdout
    assert "lottery" not in second.stdout  # process 0 speaks for the run
    assert sorted(p.name for p in (out / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]

    imp.run(run_config(*RUN), tmp_path / "one", log=lambda line: None)  # 1 process, 2 devices
    reference, two = records(tmp_path, "one"), records(tmp_path, "run")
    assert two[0]["processes"] == 2 and two[0]["mesh"] == {"stack": 2, "data": 2}  # the start
    assert reference[0]["processes"] == 1
    assert_same_records(reference, two, "2 processes")  # each row once: none written twice
