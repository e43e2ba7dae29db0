"""Launchers and run identity: a run's output directory is named by a hash of its config
(`lottery.identity.run_id`, `${lottery_id:}` in conf/config.yaml), the same whichever
launcher runs it; a 2-job sweep through joblib (`hydra/launcher=parallel`) and through
submitit's local executor writes complete records, and repeating the sweep redoes nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, compose_config, overrides
from hydra import compose, initialize_config_dir

import lottery.cli
from lottery.config import validate
from lottery.identity import run_id
from lottery.record import RECORD_NAME, WandbSink

# one member, one level, on 8x8 images (the records' rows do not depend on the size)
SWEEP = {**TINY, "dataset.shape": "[8,8,1]", "prune.levels": "1", "replicates": "1",
         "branches": "[ticket]"}
SEEDS = (0, 1)
STEPS = (0, 20, 40)  # evaluations of each level: train.steps=40, train.eval_every=20


def compose_full(*args: str):
    """The config as Hydra composes it for a job, `hydra` node included."""
    with initialize_config_dir(config_dir=lottery.cli.CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(args), return_hydra_config=True)


def rid(*args: str) -> str:
    return run_id(compose_config(*args, base=SWEEP))


def test_output_directories_are_the_run_id_of_the_config():
    args = overrides("seed=1", base=SWEEP)
    task = compose_config("seed=1", base=SWEEP)
    expected = run_id(task)
    assert len(expected) == 10 and int(expected, 16) >= 0
    full = compose_full(*args)  # what Hydra resolves run.dir / sweep.subdir in
    assert full.hydra.run.dir == f"outputs/default/{expected}"
    assert (full.hydra.sweep.dir, full.hydra.sweep.subdir) == ("multirun/default", expected)
    assert run_id(full) == expected  # the hydra node is left out
    assert run_id(validate(task).resolved) == expected  # RunConfig.resolved: a plain dict
    # where and how a job is launched does not change what it is
    for hydra_args in (["hydra/launcher=slurm"], ["hydra/launcher=parallel"],
                       ["hydra.run.dir=/elsewhere", "hydra.job.chdir=true"]):
        assert compose_full(*args, *hydra_args).hydra.sweep.subdir == expected
    lenet = compose_full("experiment=lenet_mnist")
    assert lenet.hydra.run.dir == f"outputs/lenet_mnist/{run_id(lenet)}"


def test_the_id_changes_with_what_can_change_results_only():
    base = rid()
    changed = [rid("seed=1"), rid("rewind.step=20"), rid("train.steps=60"),
               rid("prune.rate=0.3"), rid("branches=[ticket,reinit]"), rid("name=other")]
    assert len({base, *changed}) == 1 + len(changed)
    assert rid("logger=wandb") == base == rid("logger=none")
    assert rid("logger=wandb", "logger.project=elsewhere") == base
    # the order of the overrides does not matter, nor does restating a default
    args = overrides(base=SWEEP)
    assert run_id(compose_full(*reversed(args))) == run_id(compose_full(*args)) == base
    assert rid("rewind.step=0") == base


def test_wandb_runs_are_named_by_the_run_id(monkeypatch, tmp_path):
    calls = []

    class Run:
        def log(self, values):
            pass

        def finish(self):
            pass

    stub = type(sys)("wandb")
    stub.Settings = lambda **kwargs: kwargs
    stub.init = lambda **kwargs: calls.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    config = validate(compose_config("logger=wandb", base=SWEEP)).resolved
    row = {"kind": "eval", "level": 0, "branch": "reinit", "replicate": 1, "step": 0,
           "val_loss": 1.0}
    for given in (None, "abc"):  # given: the run id imp.run passes
        calls.clear()
        sink = WandbSink("lottery", "default", config, tmp_path, run_id=given)
        sink.write(row)
        sink.close()
        expected = given or run_id(config)
        assert [call["name"] for call in calls] == [f"default-{expected}-reinit-r1"]
    assert run_id(config) == rid()


def job_output(result, sweep_dir: Path, before: set) -> str:
    """What a sweep printed: the launcher's stdout and stderr and, for submitit, the logs of
    the jobs it started (`.submitit/<job>/<job>_0_log.{out,err}`)."""
    logs = sorted(set((sweep_dir / ".submitit").glob("*/*_log.*")) - before)
    return "\n".join([result.stdout, result.stderr] + [log.read_text() for log in logs])


def run_sweep(launcher: str, sweep_dir: Path, cwd: Path) -> str:
    """`lottery -m <tiny config> seed=0,1` as a user runs it, with one JAX device per job."""
    before = set((sweep_dir / ".submitit").glob("*/*_log.*"))
    args = [a for a in overrides(base=SWEEP) if not a.startswith("seed=")]
    command = [sys.executable, "-m", "lottery.cli", "-m", *args,
               f"seed={','.join(map(str, SEEDS))}", f"hydra.sweep.dir={sweep_dir}",
               f"hydra/launcher={launcher}"]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    output = job_output(result, sweep_dir, before)
    assert result.returncode == 0, output[-4000:]
    return output


def check_record(path: Path) -> None:
    """The `run` row first, then every level's evaluations and its summary, each once."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["kind"] == "run"
    assert run_id(rows[0]["config"]) == path.parent.name  # the directory is the config's id
    evals = sorted((r["level"], r["branch"], r["replicate"], r["step"])
                   for r in rows if r["kind"] == "eval")
    assert evals == [(level, "ticket", 0, step) for level in (0, 1) for step in STEPS]
    summaries = [(r["level"], r["branch"], r["replicate"]) for r in rows if r["kind"] == "summary"]
    assert summaries == [(0, "ticket", 0), (1, "ticket", 0)]


@pytest.mark.parametrize("launcher", ["parallel", "submitit_local"])
def test_a_sweep_through_a_launcher_completes_and_a_rerun_redoes_nothing(launcher, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_sweep(launcher, sweep_dir, tmp_path)
    records = sorted(sweep_dir.glob(f"*/{RECORD_NAME}"))
    ids = [rid(f"seed={seed}") for seed in SEEDS]
    assert sorted(record.parent.name for record in records) == sorted(ids)
    for record in records:
        check_record(record)
    written = {record: record.read_bytes() for record in records}

    output = run_sweep(launcher, sweep_dir, tmp_path)
    assert sorted(sweep_dir.glob(f"*/{RECORD_NAME}")) == records  # no new run directory
    assert {record: record.read_bytes() for record in records} == written  # nothing appended
    lines = [line for line in output.splitlines() if "already finished" in line]
    for run in ids:  # each job said that its run had finished
        assert any(run in line for line in lines), output[-4000:]


def test_launcher_presets_and_the_sweep_preset_compose():
    from hydra.utils import instantiate

    full = compose_full("experiment=lenet_sweep", "hydra/launcher=slurm",
                        "hydra.launcher.partition=gpu")
    assert dict(full.hydra.sweeper.params) == {"seed": "0,1,2", "rewind.step": "0,100,500,2000"}
    slurm = instantiate(full.hydra.launcher)
    assert type(slurm).__name__ == "SlurmLauncher"
    assert {k: slurm.params[k] for k in ("partition", "gpus_per_node", "name")} == {
        "partition": "gpu", "gpus_per_node": 1, "name": "lottery-lenet_sweep"}
    assert slurm.params["submitit_folder"] == "multirun/lenet_sweep/.submitit/%j"
    parallel = instantiate(compose_full("hydra/launcher=parallel").hydra.launcher)
    assert type(parallel).__name__ == "JoblibLauncher" and parallel.joblib["n_jobs"] == 2
    local = compose_full("hydra/launcher=local").hydra.launcher
    assert local._target_.endswith("BasicLauncher")  # Hydra instantiates this one itself
