"""Helpers shared by the test modules: tiny configs, the engine's setup, spied runs.

Every in-process run uses the same tiny synthetic config (`TINY`, 6 members: 3 branches x 2
replicates), so that the compiled programs are the same ones and the persistent compilation
cache set up in conftest.py compiles them once for the whole session.
"""

import collections
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import lottery.cli
from lottery import imp
from lottery.config import RunConfig, validate
from lottery.record import load
from lottery.setup import build

TINY = {
    "dataset": "synthetic",
    "dataset.train_size": "600",
    "dataset.validation_size": "100",
    "dataset.test_size": "100",
    "train.steps": "40",
    "train.eval_every": "20",
    "train.batch_size": "20",
    "prune.levels": "2",
    "replicates": "2",
    "seed": "0",
}
BRANCHES = ("ticket", "reinit", "random_prune")
LAYERS = ("fc1", "fc2", "out")
WEIGHTS = {"fc1": 784 * 300, "fc2": 300 * 100, "out": 100 * 10}  # LeNet-300-100 on 28x28x1
METRICS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def overrides(*args: str, base: dict | None = TINY) -> list[str]:
    """`base` overridden by `args` ("key=value"; a later value of a key wins); deletions
    ("~key") are passed on as given, after the others."""
    merged, deletions = dict(base or {}), []
    for arg in args:
        if arg.startswith("~"):
            deletions.append(arg)
            continue
        key, value = arg.split("=", 1)
        merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()] + deletions


def compose_config(*args: str, base: dict | None = TINY):
    with initialize_config_dir(config_dir=lottery.cli.CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides(*args, base=base))


def run_config(*args: str, base: dict | None = TINY) -> RunConfig:
    return validate(compose_config(*args, base=base))


def check_reachable(plan, weights: dict, levels: int) -> None:
    """`ConfigError` where `plan` would empty a layer (or the pool) of a model with `weights`
    per layer (a count, or the kernel's shape: an N:M plan needs the inputs) within `levels`
    levels, as `imp.build` refuses it."""
    from lottery.config import ConfigError
    from lottery.pruning.prune import PlanError

    try:
        plan.counts({layer: count if isinstance(count, tuple) else (count,)
                     for layer, count in weights.items()}, levels)
    except PlanError as error:
        raise ConfigError(str(error)) from None


def expected_counts(n: int, rate: float, levels: int) -> list[int]:
    """Surviving weights after 0..levels levels: n - round(rate * n) each level, in float32
    arithmetic with round-half-to-even, as the engine does."""
    counts = [n]
    for _ in range(levels):
        n = int(n - np.round(np.float32(rate) * np.float32(n)))
        counts.append(n)
    return counts


def setup(cfg: RunConfig):
    """The data, model, plan, chunk, trainer and programs exactly as `imp.run` builds them."""
    return build(cfg)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
    """Count XLA compilations by program name ("jit(member_chunk)", ...) inside the block.

    Each lowering to XLA records one backend-compile event, whether the executable is then
    built or taken from the persistent compilation cache."""
    counts = collections.Counter()

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            counts[kwargs.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def spied_run(cfg: RunConfig, out_dir: Path) -> SimpleNamespace:
    """`imp.run(cfg, out_dir)` on a setup built here, keeping its trainer, its level
    programs, its log lines and the number of XLA compilations of each program."""
    logs = []
    with count_compilations() as compilations:
        built = build(cfg)
        summaries = imp.run(cfg, out_dir, log=logs.append, setup=built)
    return SimpleNamespace(dir=Path(out_dir), cfg=cfg, summaries=summaries, logs=logs,
                           trainer=built.trainer, programs=built.programs,
                           compilations=dict(compilations))


def driven_run(cfg: RunConfig, out_dir: Path) -> SimpleNamespace:
    """A run of `cfg` whose level loop (`imp.Experiment`) is driven here, keeping (on the
    host) each level's inputs (`Experiment.level_inputs`: counts, scored, base masks,
    start), its started stack before training and the ticket's masks, each level's trained
    ticket, every training chunk's start step, controls and resulting learning rate, and
    the XLA compilations of each program."""
    begun, tickets, chunks, logs = [], [], [], []
    with count_compilations() as compilations:
        parts = build(cfg)
        experiment = imp.Experiment(parts, out_dir, log=logs.append)
        for number in range(cfg.prune.levels + 1):
            inputs = host(experiment.level_inputs(number))
            level = experiment.start_level(number)
            state = host(level.state)
            begun.append(SimpleNamespace(inputs=inputs, state=state, ticket_masks=jax.tree.map(
                lambda x: x[parts.layout.ticket], state.masks)))
            while level.step < parts.cfg.train.steps:
                start = level.step
                experiment.train_chunk(level)
                lr = np.asarray(level.state.opt_state.hyperparams["learning_rate"])
                chunks.append(SimpleNamespace(start=start, controls=host(level.controls),
                                              lr=lr[: parts.trainer.stack_size]))
            experiment.finish_level(level)
            tickets.append(host(experiment.entry.trained))
        experiment.close()
    return SimpleNamespace(cfg=cfg, dir=Path(out_dir), begun=begun, tickets=tickets,
                           chunks=chunks, summaries=load(out_dir, kind="summary"), parts=parts,
                           logs=logs, compilations=dict(compilations))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def host(tree):
    """A tree of device arrays as numpy arrays (PRNG keys as their raw key data)."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def random_gpt_params(config, std: float, seed: int) -> dict:
    """Random weights in `lottery.lm.gpt.init`'s layout, normal(0, std), LayerNorm scales
    near 1, so every unit matters (traced, not compiled: compiling the jitted init costs
    seconds)."""
    from lottery.lm import gpt

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: gpt.init(config, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.numpy.asarray((path[-1].key == "scale") + std * rng.standard_normal(
            x.shape), jax.numpy.float32), shapes)


# where runs of one config on other devices or processes may differ: the run row's devices,
# processes, mesh and how a device runs its members (vmap or one by one), and wall-clock times
PLACEMENT = {"devices", "processes", "mesh", "members_by", "seconds"}


def records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "record.jsonl").read_text().splitlines()]


def placed_anywhere(config: dict) -> dict:
    return {**config, "train": {k: v for k, v in config["train"].items() if k != "mesh"}}


def assert_same_records(reference: list[dict], other: list[dict], where: str) -> None:
    """The records of one config run on other devices or processes: equal rows but for
    `PLACEMENT`, floats to a float32 training's tolerance (the reductions' order differs)."""
    assert len(reference) == len(other), where
    for row, (a, b) in enumerate(zip(reference, other)):
        assert a.keys() == b.keys(), (where, row)
        for key in a.keys() - PLACEMENT:
            if key == "config":  # the same but for the mesh asked for
                assert placed_anywhere(a[key]) == placed_anywhere(b[key]), (where, row)
            elif isinstance(a[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), \
                    (where, row, key, a[key], b[key])
            else:
                assert a[key] == b[key], (where, row, key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(out: Path, args: list[str], devices: int = 1, crash_second_at: str = ""
                  ) -> list[subprocess.CompletedProcess]:
    """`lottery ARGS hydra.run.dir=OUT` started as two processes of one run (a coordinator
    on 127.0.0.1), `devices` CPU devices each; `crash_second_at`: the second's
    `LOTTERY_CRASH_AT`. Both finished, in process order."""
    port, started = free_port(), []
    for index in range(2):
        env = {**os.environ, "LOTTERY_COORDINATOR": f"127.0.0.1:{port}",
               "LOTTERY_NUM_PROCESSES": "2", "LOTTERY_PROCESS_ID": str(index),
               "JAX_NUM_CPU_DEVICES": str(devices),
               "LOTTERY_CRASH_AT": crash_second_at if index == 1 else ""}
        started.append(subprocess.Popen(
            [sys.executable, "-m", "lottery.cli", *args, f"hydra.run.dir={out}"], env=env,
            cwd=out.parent, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate())
            for p in started]


def run_hydra_command(main, args: list[str], cwd: Path) -> None:
    """A Hydra command (`main(args)`, e.g. `lottery.llm.cli.main`) in this process, in the
    folder `cwd`; the log handlers Hydra's job adds (a file in the run folder) are taken off
    again, so later tests' log lines do not go there."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("lottery")]
    before = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        try:
            main(args)
        finally:
            for logger, (handlers, level, propagate) in zip(loggers, before):
                for handler in logger.handlers:
                    if handler not in handlers:
                        handler.close()
                logger.handlers[:] = handlers
                logger.level, logger.propagate = level, propagate
