"""Iterative pruning with rewinding: the level loop, for every pruning method.

    for level in 0..L:  start_level -> train_level -> finish_level

Level 0 trains every branch dense. Each later level chooses the ticket (the schedule says
from which network and among which survivors, the method how it is scored), starts every
branch from the rewind mode's start weights and its masks, and trains the whole
(branch x replicate) stack together from step k to the end. Every evaluation and a summary
per member go to the record; each level's masks, the rewind weights and (with
`train.save_weights`) the trained ticket are saved beside it. A run checkpoints itself
(`lottery.checkpoint`) and resumes where it was killed; a member whose loss stops being
finite is recorded as diverged. The loop never names a method: schedules, scores, rewind
modes and branches are classes with hooks (`lottery.pruning.schedules`, `.select`,
`lottery.rewind`, `lottery.branches`), built once by `lottery.setup.build`.
"""

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pandas as pd

from lottery import faults
from lottery.checkpoint import CheckpointStore
from lottery.config import ConfigError, RunConfig
from lottery.distributed import barrier, to_host, writes
from lottery.history import LevelHistory, recorded
from lottery.identity import run_id
from lottery.level_start import LevelInputs
from lottery.pruning.schedules import in_words
from lottery.record import (RECORD_NAME, JsonlSink, Record, WandbSink, level_file, recorded_rows,
                            rewind_file, save_arrays, trained_file)
from lottery.rundir import exclusive
from lottery.setup import Setup, build
from lottery.state import LevelEntry, MemberState, Network
from lottery.terminal import percent, plural, progress, say, shown


@dataclass
class Level:
    """One level as it trains: the stack's state, its data keys and traced controls, the
    step reached, the rewind point, and the evaluations so far."""

    number: int
    state: MemberState
    keys: Any
    controls: dict
    step: int
    rewind: Network
    history: LevelHistory
    seconds: float = 0.0  # spent on this level before a resume
    started: float = field(default_factory=time.perf_counter)
    losses: list = field(default_factory=list)  # each chunk's mean loss since the last evaluation
    saved_at: int = 0  # the step of the last in-level checkpoint

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started


class Measured(NamedTuple):
    """Each member's surviving weights per measured layer, kept units per unit name, and
    density: the fraction of the measured layers' weights remaining."""

    alive: dict
    kept: dict
    density: np.ndarray


class Experiment:
    """A run's level loop in `out_dir`: `start_level`, `train_level` and `finish_level` of
    each level, then `close`; resumes from `checkpoint` (`lottery.checkpoint`) if given."""

    def __init__(self, setup: Setup, out_dir: Path, checkpoint=None, log=say):
        self.setup, self.out_dir, self.checkpoint, self.log = setup, Path(out_dir), checkpoint, log
        self.store = CheckpointStore(self.out_dir / "checkpoints", run_id(setup.cfg.resolved))
        self.record, self.jsonl = open_record(setup, self.out_dir, self.store, checkpoint, log)
        self.programs, self.hooks = setup.programs, setup.hooks
        self.seed = np.uint32(setup.cfg.seed)  # a Python int above 2**31 would overflow jit's int32
        init, self.full = self.programs.initial(self.seed)
        self.entry, self.first_level, self.lost = LevelEntry.initial(init, self.full), 0, set()
        if checkpoint:
            self.entry = checkpoint.tree("entry", like=self.entry)
            self.first_level, self.lost = checkpoint.meta["level"], set(checkpoint.meta["lost"])
        cfg = setup.cfg
        per_level = cfg.train.steps - cfg.rewind.step
        self.progress = progress(cfg.train.steps + cfg.prune.levels * per_level,
                                 visible=writes())
        self.progress.update(0 if self.first_level == 0 else
                             cfg.train.steps + (self.first_level - 1) * per_level)

    def run(self) -> None:
        try:
            for number in range(self.first_level, self.setup.cfg.prune.levels + 1):
                level = self.start_level(number)
                self.train_level(level)
                self.finish_level(level)
        finally:  # stopped or refused too: the bar goes, the terminal is left clean
            self.progress.close()
        self.close()

    def close(self) -> None:
        """The run is finished: close the record, replace the checkpoints by the marker."""
        self.progress.close()
        self.record.close()
        self.store.finish({"levels": self.setup.cfg.prune.levels})

    def start_level(self, number: int) -> Level:
        """Choose the level's ticket and start every branch (or resume the level from its
        checkpoint); the level's first evaluation is recorded."""
        setup, entry = self.setup, self.entry
        begun = self.programs.begin(self.seed, number, *self.level_inputs(number))
        check_finite(setup.cfg, number, np.asarray(begun.finite), self.lost)
        controls = {"lr": setup.rewind.learning_rate(number, setup.trainer.optimizer,
                                                     setup.cfg.train.steps),
                    **setup.schedule.controls(setup.counts, number)}
        step = setup.cfg.rewind.step if number else 0
        level = Level(number, setup.trainer.start(begun.network, begun.masks), begun.keys,
                      controls, step, entry.rewind,
                      LevelHistory.start(number, setup.layout.members, self.lost, step),
                      saved_at=step)
        within = self.checkpoint if self.checkpoint and self.checkpoint.meta["level"] == number \
            else None
        if within and within.meta["step"] is not None:  # resume inside the level
            self.resume(level, within)
        else:
            self.evaluate(level)
        density = level.history.densities[-1][setup.layout.ticket.start]  # its last evaluation
        self.progress.set_description(
            f"level {number}/{setup.cfg.prune.levels} ({percent(density)})")
        return level

    def level_inputs(self, number: int) -> LevelInputs:
        """What level `number` starts from: the schedule's counts, source network and base
        masks, the method's scored network, the rewind mode's start."""
        setup, entry = self.setup, self.entry
        schedule, source = setup.schedule, setup.schedule.source(entry)
        return LevelInputs(schedule.start_counts(setup.counts, number),
                           setup.method.scored(entry.rewind, source),
                           schedule.base_masks(number, entry, self.full),
                           setup.rewind.start(number, entry, source))

    def resume(self, level: Level, within) -> None:
        """Put `level` back where the in-level checkpoint `within` left it."""
        meta = within.meta
        level.state = within.tree("state", like=level.state)
        level.rewind = within.tree("rewind", like=level.rewind)
        level.step, level.saved_at, level.seconds = meta["step"], meta["step"], meta["seconds"]
        level.history = LevelHistory.from_meta(level.number, self.setup.layout.members, meta,
                                               self.measure(level).density)
        self.progress.update(level.step - (self.setup.cfg.rewind.step if level.number else 0))

    def train_level(self, level: Level) -> None:
        """Train the stack to the last step: evaluations, the rewind point (at step k of
        level 0, where the branches' hooks run) and in-level checkpoints on the way."""
        while level.step < self.setup.cfg.train.steps:
            self.train_chunk(level)

    def train_chunk(self, level: Level) -> None:
        """Train one compiled chunk of steps, then what falls due at its end."""
        setup, cfg = self.setup, self.setup.cfg
        level.state, loss = setup.trainer.train_chunk(level.state, level.keys, level.step,
                                                      level.controls)
        faults.reached("chunk")
        level.losses.append(loss)
        level.step += setup.chunk
        self.progress.update(setup.chunk)
        if level.number == 0 and level.step == cfg.rewind.step:
            level.rewind = self.programs.ticket_of(level.state.network)  # survives donation
            for hook in self.hooks:
                level.state = hook.at_rewind_point(level.state)
        if level.step % cfg.train.eval_every == 0 or level.step == cfg.train.steps:
            self.evaluate(level)
            if (level.step < cfg.train.steps and cfg.train.checkpoint_every
                    and level.step - level.saved_at >= cfg.train.checkpoint_every):
                self.save_within(level)

    def measure(self, level: Level) -> "Measured":
        """Each member's surviving weights and units, and its density."""
        setup, size = self.setup, self.setup.layout.size
        alive, kept = to_host(self.programs.measure(level.state.masks))
        alive = {layer: np.asarray(c)[:size].astype(np.int64) for layer, c in alive.items()}
        density = sum(alive.values()) / sum(setup.weights[layer] for layer in setup.measured)
        return Measured(alive, {name: np.asarray(c)[:size] for name, c in kept.items()}, density)

    def evaluate(self, level: Level) -> None:
        """Evaluate every member and record the rows (the masks may change as a level
        trains, so each evaluation measures the density)."""
        metrics = self.setup.trainer.evaluate(level.state.network)
        train_loss = np.mean(to_host(level.losses), axis=0) if level.losses else None
        level.losses.clear()
        density = self.measure(level).density
        for row in level.history.evaluation(level.step, metrics, density, train_loss):
            self.record.write(row)

    def save_within(self, level: Level) -> None:
        """An in-level checkpoint: the stack, the rewind point and the history so far."""
        self.store.save({"level": level.number, "step": level.step, "lost": sorted(self.lost),
                         "seconds": level.elapsed(), "record_offset": self.jsonl.offset,
                         **level.history.meta()},
                        {"entry": self.entry, "state": level.state, "rewind": level.rewind})
        level.saved_at = level.step

    def finish_level(self, level: Level) -> None:
        """Save the level's files, record the branches' additions and every member's
        summary, log one line, and checkpoint the next level's entry."""
        seconds, number = level.elapsed(), level.number
        trained = self.programs.ticket_of(level.state.network)
        masks = self.programs.ticket_of(level.state.masks)
        self.save_level_files(level, trained)
        alive, kept, density = self.measure(level)
        additions = [hook.after_level(level.state, number, density) for hook in self.hooks]
        del level.state
        for addition in additions:
            for row in addition.rows:
                self.record.write(row)
        extras = {key: value for addition in additions for key, value in addition.summary.items()}
        summary = level.history.summary()
        for row in self.summary_rows(level, summary, seconds, alive, kept, density, extras):
            self.record.write(row)
        self.lost |= level.history.lost(self.setup.layout.ticket)
        self.log_level(level, summary, seconds, density, [a.log for a in additions if a.log])
        self.entry = LevelEntry(level.rewind, masks, trained,
                                trained if number == 0 else self.entry.dense)
        if number < self.setup.cfg.prune.levels:
            self.store.save({"level": number + 1, "step": None, "lost": sorted(self.lost),
                             "record_offset": self.jsonl.offset}, {"entry": self.entry})
            faults.reached("level")

    def save_level_files(self, level: Level, trained: Network) -> None:
        """The rewind point (level 0), the trained ticket (`train.save_weights`), and every
        branch's masks (`lottery.record.arrays`; axis 0: replicate)."""
        setup, out, number = self.setup, self.out_dir, level.number
        files = {}  # path: (tree, dtype)
        if number == 0:
            files[rewind_file(out)] = ({"params": level.rewind.params,
                                        "state": level.rewind.model_state}, None)
        if setup.cfg.train.save_weights:
            files[trained_file(out, number)] = ({"params": trained.params,
                                                 "state": trained.model_state}, None)
        for branch in setup.layout.branches:
            rows = setup.layout.rows(branch)
            files[level_file(out, number, branch)] = (
                jax.tree.map(lambda x, rows=rows: x[rows], level.state.masks), bool)
        trees = to_host({str(path): tree for path, (tree, _) in files.items()})
        if writes():
            for path, (_, dtype) in files.items():
                save_arrays(path, trees[str(path)], dtype)

    def summary_rows(self, level: Level, summary: dict, seconds: float, alive, kept, density,
                     extras: dict) -> list[dict]:
        """One summary row per member: its density (overall and per layer), status, the
        branches' additions, and its final and early-stop values (none once diverged)."""
        setup, history = self.setup, level.history
        finals = [name for name in summary if name.startswith("final_") and name != "final_step"]
        rows = []
        for m, (branch, replicate) in enumerate(setup.layout.members):
            gone = history.diverged[m] >= 0
            row = {"kind": "summary", "level": level.number, "branch": branch,
                   "replicate": replicate, "density": float(density[m]), "seconds": seconds,
                   "status": "diverged" if gone else "ok",
                   "diverged_step": int(history.diverged[m]) if gone else None,
                   **{f"density_{layer}": float(alive[layer][m] / setup.weights[layer])
                      for layer in setup.measured},
                   **setup.units.summary({name: kept[name][m] for name in setup.units.names},
                                         setup.weights),
                   **extras.get((branch, replicate), {}),
                   **{name: (recorded(values[m]) if values.dtype.kind == "f"
                             else values[m].item()) for name, values in summary.items()}}
            if gone:  # no final values
                row.update(dict.fromkeys(finals))
            rows.append(row)
        return rows

    def log_level(self, level: Level, summary: dict, seconds: float, density,
                  additions: list[str]) -> None:
        """One line: density, time, each branch's mean early-stop test accuracy over the
        members that did not diverge, the branches' additions, how many diverged."""
        layout, diverged = self.setup.layout, level.history.diverged
        # in float64, as the tables average the recorded numbers: a float32 mean can round
        # to another hundredth of a percent than the final table's
        accuracy = np.where(diverged < 0, summary["early_stop_test_accuracy"].astype(np.float64),
                            np.nan)
        self.log(f"level {level.number}: {percent(density[layout.ticket.start])} remaining, "
                 f"{seconds:.0f}s; early-stop test accuracy " + ", ".join(
                     f"{b} {percent(np.nanmean(accuracy[layout.rows(b)]))}"
                     for b in layout.branches)
                 + "".join(f"; {words}" for words in additions)
                 + (f"; {np.sum(diverged >= 0)} member(s) diverged"
                    if np.any(diverged >= 0) else ""))


def check_finite(cfg: RunConfig, level: int, finite: np.ndarray, lost: set) -> None:
    """Refuse to go on when a score that chose a ticket was not finite (an overflow: the
    mask would be decided by tie-breaking); a diverged ticket's replicate is exempt."""
    bad = [r for r in range(len(finite)) if not finite[r] and r not in lost]
    if bad:
        raise ConfigError(
            f"prune.score={cfg.prune.score}: scores of surviving weights are not finite at "
            f"level {level} (replicate(s) {bad}), so the mask would be chosen by tie-breaking: the "
            f"score overflows for {cfg.model['name']}; use another prune.score")


def prepare_directory(out_dir: Path, store: CheckpointStore) -> str:
    """What to do with `out_dir`: "finished" (the same run already finished), "resume" (a
    checkpoint of the same run exists) or "start". Refuses a directory holding another run."""
    runs = recorded_rows(out_dir / RECORD_NAME, "run")
    if runs and run_id(runs[0]["config"]) != store.run_id:
        raise ConfigError(f"{out_dir} holds a run of a different config (run "
                          f"{run_id(runs[0]['config'])}, this one is {store.run_id}): choose "
                          "another hydra.run.dir, or delete that run")
    if runs and store.finished():
        return "finished"
    return "resume" if runs else "start"


@contextmanager
def out_of_memory_hint(cfg: RunConfig):
    """Turn the device's out-of-memory error into one line that says what to change."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
            raise
        devices = len(jax.devices())
        per_device = math.ceil(cfg.stack_size / devices)
        raise ConfigError(
            f"out of memory training {cfg.stack_size} members ({cfg.stack_size // cfg.replicates} "
            f"branches x {cfg.replicates} replicates, {per_device} per device on {devices} "
            f"{jax.devices()[0].platform} device(s)): use fewer replicates per device (e.g. "
            f"replicates={max(1, cfg.replicates // 2)} and more seeds), fewer branches, a "
            "smaller train.batch_size or train.eval_batch_size, or more devices") from None


def quiet(line: str) -> None:
    """The log of a process that is not the run's voice."""


def run(cfg: RunConfig, out_dir: Path, log=say, setup: Setup | None = None) -> pd.DataFrame:
    """Run every level and branch; returns the summary rows (also in `out_dir/record.jsonl`).

    The run checkpoints itself in `out_dir/checkpoints/` after every level and, within a
    level, at the first evaluation `train.checkpoint_every` steps after the last checkpoint.
    Run again on the same directory, it resumes from the newest good checkpoint (the record
    cut back to that point, so no row is written twice) and gives the same numbers as an
    uninterrupted run; a finished run is not run again. The run holds `out_dir`'s lock
    (`lottery.rundir`) throughout: another process on the same directory stops at once.
    `setup`: the run's `lottery.setup.build(cfg)` where the caller has built it already
    (a notebook or test that looks at its trainer and programs)."""
    out_dir = Path(out_dir)
    if not writes():  # another process of the run speaks and holds the lock
        log = quiet
    with exclusive(out_dir, warn=log) if writes() else nullcontext():
        store = CheckpointStore(out_dir / "checkpoints", run_id(cfg.resolved))
        action = prepare_directory(out_dir, store)
        if action == "finished":
            log(f"lottery: {shown(out_dir)} already finished (run {store.run_id}): nothing to do")
            return pd.DataFrame(recorded_rows(out_dir / RECORD_NAME, "summary"))
        checkpoint = store.latest(warn=log) if action == "resume" else None
        barrier("every process has read the checkpoint")  # before process 0 writes again
        if action == "resume" and checkpoint is None:
            log(f"lottery: {out_dir} holds a run killed before its first checkpoint: "
                "starting over")
        with out_of_memory_hint(cfg):
            built = setup is None  # then the data is this function's to close
            setup = setup or build(cfg)
            try:
                announce(setup, out_dir, log)
                Experiment(setup, out_dir, checkpoint, log).run()
            finally:
                if built:
                    setup.data.close()
    return pd.DataFrame(recorded_rows(out_dir / RECORD_NAME, "summary"))


def announce(setup: Setup, out_dir: Path, log) -> None:
    """The run's first log line, one row on a terminal: model, data, prunable weights, method,
    members and devices, output directory. The per-layer counts, the pruned layers and how
    members are batched are in the record's `run` row."""
    cfg, weights, devices = setup.cfg, setup.weights, list(setup.trainer.mesh.devices.flat)
    total, pruned = sum(weights.values()), sum(weights[layer] for layer in setup.measured)
    log(f"{setup.model.name} on {setup.data.name}, {total:,} prunable weights"
        + (f" ({pruned:,} in pruned layers)" if pruned != total else "")
        + f"; {method(cfg)}; {plural(cfg.stack_size, 'member')} on "
        f"{plural(len(devices), devices[0].platform)}"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f"{layout(setup.trainer.shape)}"
        f" -> {shown(out_dir)}")
    if setup.chunk < 50:
        log(f"lottery: warning: steps are compiled in chunks of {setup.chunk} (the gcd of "
            "eval_every, steps and rewind.step); choose multiples of a larger number for speed")


def layout(shape) -> str:
    """How the devices are laid out, when it is not the usual one-member-per-device spread."""
    if shape.data == 1:
        return ""
    return f" ({shape.stack} x {shape.data}: each batch split over {shape.data})"


def method(cfg: RunConfig) -> str:
    """The pruning method in a few words (`lottery.setup.describe` says it in full)."""
    prune, rewind = cfg.prune, cfg.rewind
    return (in_words(prune) + ", "
            + {"weights": f"rewind to step {rewind.step}",
               "lr": f"learning rate rewind to step {rewind.step}"}.get(rewind.mode, rewind.mode))


class NotWritten(NamedTuple):
    """The record of a process that does not write it (`lottery.distributed`)."""

    offset: int = 0


NOT_WRITTEN = NotWritten()


def open_record(setup: Setup, out_dir: Path, store: CheckpointStore, checkpoint, log):
    """The run's record (JSONL, and W&B where configured), cut back to the checkpoint; a
    new run starts it with its `run` row."""
    cfg = setup.cfg
    if not writes():  # process 0 writes the record (and W&B) of a several-process run
        return Record([]), NOT_WRITTEN
    jsonl = JsonlSink(out_dir / RECORD_NAME, keep=checkpoint.meta["record_offset"]
                      if checkpoint else 0)
    sinks = [jsonl]
    if cfg.logger.name == "wandb":
        sinks.append(WandbSink(cfg.logger.project, cfg.name, cfg.resolved, out_dir,
                               cfg.logger.init_timeout, run_id=store.run_id))
    record = Record(sinks)
    if checkpoint is None:
        store.clear()
        record.write({"kind": "run", "name": cfg.name, "config": cfg.resolved,
                      "prunable_weights": setup.weights, "pruned_layers": list(setup.measured),
                      "devices": setup.trainer.mesh.size, "processes": jax.process_count(),
                      "mesh": {"stack": setup.trainer.shape.stack,
                               "data": setup.trainer.shape.data},
                      "members_by": setup.trainer.members,
                      "chunk": setup.chunk})
    else:
        meta = checkpoint.meta
        where = (f"step {meta['step']} of level {meta['level']}" if meta["step"] is not None
                 else f"level {meta['level']}")
        log(f"lottery: resuming {out_dir} (run {store.run_id}) at {where}")
    return record, jsonl
