"""Iterative pruning with rewinding: the level loop, for every pruning method.

Level 0 trains every branch dense. Each later level chooses the ticket (`prune.*`: which
units, scored how, how many per layer, on the trained or the initial network, from the
previous level's ticket or from the dense network), starts every branch from the start
weights (`rewind.mode`: the rewind point, or the trained weights) and its masks, and trains
the whole (branch x replicate) stack together from step k to the end; gradual pruning
instead prunes while the level trains. Every evaluation and a summary per member go to the
record; each level's ticket masks (`levels/level_NN.npz`), the rewind weights
(`rewind.npz`) and, with `train.save_weights`, the trained ticket (`levels/trained_NN.npz`)
are saved beside it. A run checkpoints itself (`lottery.checkpoint`) and resumes where it was
killed; a member whose loss stops being finite is recorded as diverged.
"""

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm import tqdm

from lottery import faults
from lottery.branches import TWIN, LevelStart, branch_function, members_of
from lottery.checkpoint import CheckpointStore
from lottery.config import ConfigError, RunConfig
from lottery.data import Dataset, load_dataset
from lottery.identity import run_id
from lottery.instability import POINTS, barrier, interpolation_errors
from lottery.models import ModelSpec, build_model
from lottery.optim import OptimizerError, build_optimizer
from lottery.pruning.masks import full_masks, remaining
from lottery.pruning.prune import (
    Counts,
    PlanError,
    PrunePlan,
    interpolate,
    keep_counts,
    survivors,
)
from lottery.pruning.structured import StructureError, model_groups
from lottery.pruning.units import Structures, Weights
from lottery.record import RECORD_NAME, JsonlSink, Record, WandbSink, recorded_rows, save_arrays
from lottery.rundir import exclusive
from lottery.seeds import member_keys, name_id
from lottery.train import Trainer

METRICS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


@dataclass(frozen=True)
class Method:
    """How a level chooses its ticket: `score` (a name in `lottery.pruning.scores.SCORES`),
    computed on `score_batch` training examples, in `rounds` rounds of pruning with the
    density falling geometrically between them (SynFlow's iterative procedure)."""

    score: str = "magnitude"
    score_batch: int = 100
    rounds: int = 1

    @property
    def precision(self):
        """The context scoring runs in: float64 for SynFlow, whose scores are products of
        |weights| through the whole depth (ResNet-56 at init overflows float32: 97% of its
        scores inf, 3% NaN), as its reference code computes them; float32 otherwise."""
        return jax.enable_x64(True) if self.score == "synflow" else nullcontext()


def level_programs(model, plan: PrunePlan, branches, replicates: int, trainer: Trainer,
                   units=None, method: Method = Method(), measured=None,
                   from_trained: bool = False):
    """The compiled programs around training, each compiled once per run.

    `begin(seed, level, counts, scored, base_masks, start)` scores `scored` (the stacked
    ticket replicates' `(params, model_state)`), keeps `counts` (`PrunePlan.counts`) of the
    survivors of `base_masks`, starts every branch from `start` (`(params, model_state)`)
    and returns the new ticket masks, the padded stack (params, model state, masks, data
    keys), each member's surviving weights per `measured` layer, its kept units per name of
    `units`, and per ticket replicate whether every score of a surviving unit was finite.
    `from_trained` (rewind.mode lr or finetune): `random_prune` draws among the survivors
    the ticket was chosen from, so no weight pruned at an earlier level comes back (at 0).
    `ticket_of(tree)` takes the ticket's replicates out of a stacked tree.
    """
    units = units or Weights(plan.layers)
    measured = measured or plan.layers
    R, rounds = replicates, method.rounds

    def choose(key, scored, base_masks, counts, data, invert=False):
        """The kept selection among the survivors of `base_masks`: every round keeps the
        highest scores (`invert`: the lowest, the inverted control, round by round as in
        Synaptic-Flow's `prune_loop`), and whether all survivors' scores were finite."""
        params, model_state = scored
        x_all, y_all = data
        index = jax.random.choice(key, len(x_all), (min(method.score_batch, len(x_all)),),
                                  replace=False)
        batch = x_all[index], y_all[index]
        base = units.select(base_masks)
        ties = jax.random.fold_in(key, name_id("ties"))

        def one_round(selection, target, ties):
            masks = units.expand(base_masks, selection)
            scores = units.scores(method.score, model, params, model_state, masks, batch, key)
            finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(scores[n]) | (selection[n] == 0))
                                        for n in scores]))
            ranked = jax.tree.map(jnp.negative, scores) if invert else scores
            return keep_counts(plan, ranked, selection, target, ties), finite

        with method.precision:
            if rounds == 1:
                return one_round(base, counts, ties)
            first = survivors(plan, base)  # geometric steps down to the counts (SynFlow)

            def body(j, carry):
                target = interpolate(first, counts, 1 - (j + 1) / rounds, "geometric")
                selection, finite = one_round(carry[0], target, jax.random.fold_in(ties, j))
                return selection, finite & carry[1]

            return jax.lax.fori_loop(0, rounds, body, (base, jnp.array(True)))

    def begin(seed, level, counts, scored, base_masks, start):
        score_keys = member_keys(seed, R, level, "ticket", "score")
        data = trainer.train_data
        selection, finite = jax.vmap(choose, in_axes=(0, 0, 0, None, None))(
            score_keys, scored, base_masks, counts, data)
        inverted = None
        if "inverted" in branches:  # the method run again with its scores inverted
            inverted, _ = jax.vmap(partial(choose, invert=True), in_axes=(0, 0, 0, None, None))(
                score_keys, scored, base_masks, counts, data)
        ticket_masks = jax.vmap(units.expand)(base_masks, selection)
        base = jax.vmap(units.select)(base_masks)
        candidates = base if from_trained else jax.tree.map(jnp.ones_like, base)
        inputs = LevelStart(start, ticket_masks, selection, candidates, inverted)
        begun = [jax.vmap(partial(branch_function(b), model, units))(
            inputs, member_keys(seed, R, level, b, "branch")) for b in branches]
        keys = [member_keys(seed, R, level, b, "data") for b in branches]
        masks = _stack([m for _, m in begun])
        alive = jax.vmap(partial(remaining, layers=measured))(masks)
        kept = jax.vmap(lambda m: {n: jnp.sum(s) for n, s in units.select(m).items()})(masks)
        keys = jax.random.key_data(jnp.concatenate(keys))  # raw uint32: one stable sharding
        params, model_state = _stack([start for start, _ in begun])
        stack = trainer.pad((params, model_state, masks, keys))
        return ticket_masks, stack, alive, kept, finite

    def initial(seed):
        params, model_state = jax.vmap(model.init)(member_keys(seed, R, 0, "ticket", "init"))
        return (params, model_state), jax.vmap(full_masks)(params)

    at = branches.index("ticket") * R
    replicated = trainer.replicated
    return (jax.jit(begin, out_shardings=(replicated, trainer.stacked, replicated, replicated,
                                          replicated)),
            jax.jit(lambda stack: jax.tree.map(lambda x: x[at:at + R], stack),
                    out_shardings=replicated),
            jax.jit(initial, out_shardings=replicated))


def instability_programs(model, branches, replicates: int, trainer: Trainer,
                         statistics_batches: int = 50):
    """For the `instability` pair: `share(state)` starts both copies as the ticket's
    retraining starts at step k: the ticket's params and model state, a fresh optimizer
    state (the rule of every level); `pair_errors(params, model_state)` gives the test
    errors, shape (replicates, POINTS), on the line between each replicate's copies."""
    R = replicates
    ticket, first, second = (branches.index(b) * R for b in ("ticket", "instability", TWIN))
    x_train = trainer.train_data[0]
    batch = min(len(x_train) // statistics_batches, 100) or 1
    statistics = x_train[: batch * statistics_batches].reshape(-1, batch, *x_train.shape[1:])

    def share(state):
        params, model_state, opt_state, masks = state
        source = jnp.arange(ticket, ticket + R)
        targets = jnp.concatenate([jnp.arange(first, first + R), jnp.arange(second, second + R)])
        pair = jnp.concatenate([source, source])
        params, model_state = jax.tree.map(lambda x: x.at[targets].set(x[pair]),
                                           (params, model_state))
        fresh = jax.vmap(trainer.optimizer.init)(jax.tree.map(lambda x: x[targets], params))
        opt_state = jax.tree.map(lambda x, f: x.at[targets].set(f), opt_state, fresh)
        return params, model_state, opt_state, masks

    def pair_errors(params, model_state):
        pair = [jax.tree.map(lambda x, at=at: x[at:at + R], (params, model_state))
                for at in (first, second)]
        return jax.lax.map(lambda ab: interpolation_errors(
            model, ab[0], ab[1], trainer.eval_data[1], statistics), tuple(pair))

    return (jax.jit(share, out_shardings=trainer.stacked, donate_argnums=0),
            jax.jit(pair_errors, out_shardings=trainer.replicated))


def gradual_pruning(units, plan: PrunePlan, full: Counts, start: int, end: int, every: int):
    """The Trainer's `prune_step` for gradual magnitude pruning (Zhu & Gupta 2017): before
    steps start, start + every, ..., end, keep the largest-magnitude survivors, as many as
    the cubic schedule gives between `full` and `controls["counts"]` (the level's counts);
    `end` is a step the level trains (the config refuses one it never reaches), so the
    level ends at exactly its counts. Ties are broken at random from the member's `key`,
    folded with the step (only at an event, not at every step)."""
    def prune_step(params, masks, step, controls, key):
        # one event only (end == start, every longer than the span): straight to the counts
        remaining_fraction = 1 - jnp.clip((step - start) / (end - start), 0, 1) \
            if end > start else jnp.float32(0)
        event = (step >= start) & (step <= end) & ((step - start) % every == 0)

        def prune_now(masks):
            scores = units.scores("magnitude", None, params, None, masks, None, None)
            target = interpolate(full, controls["counts"], remaining_fraction)
            ties = jax.random.fold_in(key, step)
            return units.expand(masks, keep_counts(plan, scores, units.select(masks), target,
                                                   ties))

        return jax.lax.cond(event, prune_now, lambda masks: masks, masks)

    return prune_step


def early_stop_summary(steps: list[int], history: dict[str, np.ndarray],
                       densities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Final and early-stop (first minimum of validation loss) values, per member.

    `history[metric]` has shape (evaluations, members). With `densities` (the same shape:
    each member's density at each evaluation) the early stop is chosen only among the
    evaluations at the member's final density: under gradual pruning an earlier, denser
    network is not the one the row reports."""
    val_loss = np.nan_to_num(history["val_loss"], nan=np.inf)  # NaN: diverged
    if densities is not None:
        val_loss = np.where(densities == densities[-1], val_loss, np.inf)
    best = np.argmin(val_loss, axis=0)
    members = np.arange(best.size)
    summary = {"final_step": np.full(best.size, steps[-1]),
               "early_stop_step": np.asarray(steps)[best]}
    for metric, values in history.items():
        summary[f"final_{metric}"] = values[-1]
        summary[f"early_stop_{metric}"] = values[best, members]
    return summary


@dataclass(frozen=True)
class Setup:
    """What a run is built from: the config in steps, data, model, what is pruned and how
    much per level, weight counts and trainer."""

    cfg: RunConfig  # every duration in steps
    data: Dataset
    model: ModelSpec
    plan: PrunePlan
    units: Weights | Structures  # what a level prunes: weights, neurons or channels
    counts: list  # Counts of units kept at each level 0..levels
    weights: dict[str, int]  # prunable weights per layer
    measured: tuple[str, ...]  # the layers whose remaining weights make up `density`
    chunk: int  # steps per compiled training call: gcd(eval_every, steps, rewind step)
    trainer: Trainer


def _options(section: dict) -> dict:
    return {key: value for key, value in section.items() if key != "name"}


def _units(cfg: RunConfig, model: ModelSpec, params) -> tuple[PrunePlan, Weights | Structures]:
    if cfg.structure == "weights":
        plan = cfg.prune_plan(model.prunable)
        return plan, Weights(plan.layers)
    try:
        groups = model_groups(model, cfg.structure)
    except StructureError as error:
        raise ConfigError(f"prune.structure={cfg.structure}: {error}") from None
    plan = cfg.prune_plan(tuple(group.name for group in groups))
    return plan, Structures(tuple(group for group in groups if group.name in plan.layers))


def build(cfg: RunConfig) -> Setup:
    """Load the data and build everything a run needs; refuses impossible schedules."""
    data = load_dataset(cfg.dataset["name"], **_options(cfg.dataset))
    if cfg.batch_size > len(data.x_train):
        raise ConfigError(f"train.batch_size={cfg.batch_size} exceeds the {len(data.x_train)} "
                          f"training examples of {data.name}")
    model = build_model(cfg.model["name"], data.input_shape, data.num_classes,
                        **_options(cfg.model))
    params = jax.eval_shape(model.init, jax.random.key(0))[0]
    plan, units = _units(cfg, model, params)
    try:
        counts = plan.counts(units.shapes(params), cfg.levels)
    except PlanError as error:
        raise ConfigError(str(error)) from None
    weights = model.param_counts(params)
    measured = plan.layers if cfg.structure == "weights" else model.prunable
    steps_per_epoch = len(data.x_train) // cfg.batch_size
    cfg = cfg.in_steps(steps_per_epoch)
    chunk = math.gcd(cfg.eval_every, cfg.steps, cfg.rewind_step)
    try:
        optimizer = build_optimizer(**cfg.optimizer, steps_per_epoch=steps_per_epoch)
    except OptimizerError as error:
        raise ConfigError(str(error)) from None
    prune_step = None
    if cfg.schedule == "gradual":
        prune_step = gradual_pruning(units, plan, counts[0], **cfg.gradual)
    trainer = Trainer(model, optimizer, data, cfg.batch_size, chunk, cfg.stack_size,
                      cfg.eval_batch_size, cfg.members, prune_step)
    return Setup(cfg, data, model, plan, units, counts, weights, measured, chunk, trainer)


def describe(cfg: RunConfig) -> str:
    """The pruning method in words, for the log."""
    what = {"weights": "weights", "neurons": "neurons", "channels": "channels"}[cfg.structure]
    rewind = {"weights": f"weights rewound to step {cfg.rewind_step}",
              "lr": f"trained weights, learning rate replayed from step {cfg.rewind_step}",
              "finetune": "trained weights fine-tuned"}[cfg.rewind_mode]
    return (f"{cfg.schedule} {cfg.scope} pruning of {what} by {cfg.score} scores of the "
            f"{'initial' if cfg.prune_at == 'init' else 'trained'} network; {rewind}")


def check_finite(cfg: RunConfig, level: int, finite: np.ndarray, lost: set) -> None:
    """Refuse to go on when a score that chose a ticket was not finite (an overflow: the
    mask would be decided by tie-breaking); a diverged ticket's replicate is exempt."""
    bad = [r for r in range(len(finite)) if not finite[r] and r not in lost]
    if bad:
        raise ConfigError(
            f"prune.score={cfg.score}: scores of surviving weights are not finite at level "
            f"{level} (replicate(s) {bad}), so the mask would be chosen by tie-breaking: the "
            f"score overflows for {cfg.model['name']}; use another prune.score")


def _finite(value) -> float | None:
    """A recorded number: None where training diverged (NaN or infinite)."""
    value = float(value)
    return value if math.isfinite(value) else None


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
            f"out of memory training {cfg.stack_size} members ({len(members_of(cfg.branches))} "
            f"branches x {cfg.replicates} replicates, {per_device} per device on {devices} "
            f"{jax.devices()[0].platform} device(s)): use fewer replicates per device (e.g. "
            f"replicates={max(1, cfg.replicates // 2)} and more seeds), fewer branches, a "
            "smaller train.batch_size or train.eval_batch_size, or more devices") from None


def run(cfg: RunConfig, out_dir: Path, log=print) -> pd.DataFrame:
    """Run every level and branch; returns the summary rows (also in `out_dir/record.jsonl`).

    The run checkpoints itself in `out_dir/checkpoints/` after every level and, within a
    level, at the first evaluation `train.checkpoint_every` steps after the last checkpoint.
    Run again on the same directory, it resumes from the newest good checkpoint (the record
    cut back to that point, so no row is written twice) and gives the same numbers as an
    uninterrupted run; a finished run is not run again. The run holds `out_dir`'s lock
    (`lottery.rundir`) throughout: another process on the same directory stops at once."""
    out_dir = Path(out_dir)
    with exclusive(out_dir, warn=log):
        store = CheckpointStore(out_dir / "checkpoints", run_id(cfg.resolved))
        action = prepare_directory(out_dir, store)
        if action == "finished":
            log(f"lottery: {out_dir} already finished (run {store.run_id}): nothing to do")
            return pd.DataFrame(recorded_rows(out_dir / RECORD_NAME, "summary"))
        checkpoint = store.latest(warn=log) if action == "resume" else None
        if action == "resume" and checkpoint is None:
            log(f"lottery: {out_dir} holds a run killed before its first checkpoint: "
                "starting over")
        with out_of_memory_hint(cfg):
            return _run(cfg, out_dir, store, checkpoint, log)


def _run(cfg: RunConfig, out_dir: Path, store: CheckpointStore, checkpoint, log):
    setup = build(cfg)
    cfg, data, model, plan, units, weights, chunk, trainer = (
        setup.cfg, setup.data, setup.model, setup.plan, setup.units, setup.weights,
        setup.chunk, setup.trainer)
    R, branches, k, T = cfg.replicates, members_of(cfg.branches), cfg.rewind_step, cfg.steps
    layers = setup.measured
    log(f"lottery: {model.name} on {data.name}: {sum(weights.values()):,} prunable weights "
        f"({', '.join(f'{n} {c:,}' for n, c in weights.items())}), of which "
        f"{sum(weights[layer] for layer in layers):,} in pruned layers; {describe(cfg)}; "
        f"{cfg.stack_size} members ({len(branches)} branches x {R} replicates) on "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s), members by "
        f"{trainer.members}; record: {out_dir / RECORD_NAME}")
    if chunk < 50:
        log(f"lottery: warning: steps are compiled in chunks of {chunk} (the gcd of eval_every, "
            "steps and rewind.step); choose multiples of a larger number for speed")

    keep = checkpoint.meta["record_offset"] if checkpoint else 0
    jsonl = JsonlSink(out_dir / RECORD_NAME, keep=keep)  # cut back to the checkpoint
    summaries = recorded_rows(out_dir / RECORD_NAME, "summary")  # the levels already done
    sinks = [jsonl]
    if cfg.logger["name"] == "wandb":
        sinks.append(WandbSink(cfg.logger.get("project", "lottery"), cfg.name, cfg.resolved,
                               out_dir, cfg.logger.get("init_timeout", 60), run_id=store.run_id))
    record = Record(sinks)
    if checkpoint is None:
        store.clear()
        record.write({"kind": "run", "name": cfg.name, "config": cfg.resolved,
                      "prunable_weights": weights, "devices": len(jax.devices()),
                      "chunk": chunk})
    else:
        where = (f"step {checkpoint.meta['step']} of level {checkpoint.meta['level']}"
                 if checkpoint.meta["step"] is not None else f"level {checkpoint.meta['level']}")
        log(f"lottery: resuming {out_dir} (run {store.run_id}) at {where}")

    method = Method(cfg.score, cfg.score_batch, cfg.score_rounds)
    begin, ticket_of, initial = level_programs(model, plan, branches, R, trainer, units, method,
                                               layers, from_trained=cfg.rewind_mode != "weights")
    count_alive = jax.jit(jax.vmap(partial(remaining, layers=layers)))
    if "instability" in branches:
        share, pair_errors = instability_programs(model, branches, R, trainer)
    seed = np.uint32(cfg.seed)  # a Python int above 2**31 would overflow jit's int32
    rewind, full = initial(seed)
    entry = (rewind, full, rewind, rewind)  # a level's rewind, ticket masks, trained, dense
    first_level, lost = 0, set()  # lost: replicates whose ticket diverged
    if checkpoint:
        entry = checkpoint.tree("entry", like=entry)
        first_level, lost = checkpoint.meta["level"], set(checkpoint.meta["lost"])
    ticket_at = branches.index("ticket") * R
    names = [(b, r) for b in branches for r in range(R)]
    final_lr = np.float32(cfg.finetune_lr or trainer.optimizer.schedule(T - 1))

    progress = tqdm(total=T + cfg.levels * (T - k), unit="step", disable=not sys.stderr.isatty(),
                    dynamic_ncols=True)
    progress.update(0 if first_level == 0 else T + (first_level - 1) * (T - k))
    for level in range(first_level, cfg.levels + 1):
        rewind, ticket_masks, trained, dense = entry
        source = trained if cfg.schedule == "iterative" else dense  # trained in the last level
        iterative = level and cfg.schedule == "iterative"
        ticket_masks, (params, model_state, masks, keys), alive, kept, finite = begin(
            seed, level, setup.counts[0 if cfg.schedule == "gradual" else level],
            rewind if cfg.prune_at == "init" else source, ticket_masks if iterative else full,
            rewind if level == 0 or cfg.rewind_mode == "weights" else source)
        check_finite(cfg, level, np.asarray(finite), lost)
        controls = {"lr": np.float32(final_lr if level and cfg.rewind_mode == "finetune" else 0)}
        if cfg.schedule == "gradual":
            controls["counts"] = setup.counts[level]
        alive = {layer: np.asarray(c).astype(np.int64) for layer, c in alive.items()}
        density = sum(alive.values()) / sum(weights[layer] for layer in layers)
        state = trainer.start(params, model_state, masks)
        del params, model_state, masks

        step = 0 if level == 0 else k
        steps, history, densities = [], {metric: [] for metric in METRICS}, []
        # the step at which each member's loss stopped being finite (-1: never)
        diverged = np.array([step if r in lost else -1 for _, r in names])
        elapsed = 0.0
        within = checkpoint if checkpoint and checkpoint.meta["level"] == level else None
        if within and within.meta["step"] is not None:  # resume inside the level
            state = within.tree("state", like=state)
            rewind = within.tree("rewind", like=rewind)
            step, steps, elapsed = within.meta["step"], within.meta["steps"], within.meta["seconds"]
            history = {metric: list(np.asarray(within.meta["history"][metric], np.float32))
                       for metric in METRICS}
            densities = list(np.asarray(within.meta.get("densities")  # older checkpoints
                                        or [density.tolist()] * len(steps)))
            diverged = np.asarray(within.meta["diverged"])
            progress.update(step - (0 if level == 0 else k))
        progress.set_description(f"level {level}/{cfg.levels} ({100 * density[ticket_at]:.1f}%)")
        started = time.perf_counter()
        saved_at = step
        chunk_losses = []  # each chunk's mean training loss since the last evaluation

        def evaluate(at, state):
            nonlocal alive, density
            if cfg.schedule == "gradual":  # the masks change as the level trains
                alive = {layer: np.asarray(c)[:len(names)].astype(np.int64)
                         for layer, c in count_alive(state[3]).items()}
                density = sum(alive.values()) / sum(weights[layer] for layer in layers)
            metrics = trainer.evaluate(state[0], state[1])
            train_loss = np.mean(jax.device_get(chunk_losses), axis=0) if chunk_losses else None
            chunk_losses.clear()
            steps.append(at)
            densities.append(np.asarray(density))
            for metric in METRICS:
                history[metric].append(metrics[metric])
            for m, (branch, replicate) in enumerate(names):
                if diverged[m] >= 0:
                    continue  # a diverged member is no longer recorded
                values = {metric: _finite(metrics[metric][m]) for metric in METRICS}
                loss = None if train_loss is None else _finite(train_loss[m])
                if None in values.values() or (train_loss is not None and loss is None):
                    diverged[m] = at  # its accuracies are meaningless too (argmax of NaN)
                    values, loss = dict.fromkeys(values), None
                record.write({"kind": "eval", "level": level, "branch": branch,
                              "replicate": replicate, "density": float(density[m]), "step": at,
                              **values, "train_loss": loss})

        def save_within_level(state):
            store.save({"level": level, "step": step, "steps": steps, "lost": sorted(lost),
                        "seconds": elapsed + time.perf_counter() - started,
                        "record_offset": jsonl.offset, "diverged": diverged.tolist(),
                        "history": {metric: np.stack(history[metric]).tolist()
                                    for metric in METRICS},
                        "densities": np.stack(densities).tolist()},
                       {"entry": entry, "state": state, "rewind": rewind})

        if not (within and within.meta["step"] is not None):
            evaluate(step, state)
        while step < T:
            state, loss = trainer.train_chunk(state, keys, step, controls)
            faults.reached("chunk")
            chunk_losses.append(loss)
            step += chunk
            progress.update(chunk)
            if level == 0 and step == k:
                rewind = ticket_of(state[:2])  # new buffers: survive the donation
                if "instability" in branches:  # both copies start from the dense run at k
                    state = share(state)
            if step % cfg.eval_every == 0 or step == T:
                evaluate(step, state)
                if step < T and cfg.checkpoint_every and step - saved_at >= cfg.checkpoint_every:
                    save_within_level(state)
                    saved_at = step
        seconds = elapsed + time.perf_counter() - started
        if level == 0:
            save_arrays(out_dir / "rewind.npz", {"params": rewind[0], "state": rewind[1]})
        trained = ticket_of(state[:2])
        if cfg.save_weights:
            save_arrays(out_dir / "levels" / f"trained_{level:02d}.npz",
                        {"params": trained[0], "state": trained[1]})
        if level == 0:
            dense = trained
        if cfg.schedule == "gradual":
            ticket_masks = ticket_of(state[3])
        save_arrays(out_dir / "levels" / f"level_{level:02d}.npz", ticket_masks, bool)
        for i, branch in enumerate(branches):  # every control's masks, replicate on axis 0
            if branch != "ticket":
                save_arrays(out_dir / "levels" / f"level_{level:02d}_{branch}.npz",
                            jax.tree.map(lambda x, i=i: x[i * R:(i + 1) * R], state[3]), bool)
        barriers = {}
        if "instability" in branches:
            errors = np.asarray(pair_errors(state[0], state[1]))
            for r in range(R):
                barriers[r] = _finite(barrier(errors[r]))
                record.write({"kind": "instability", "level": level, "replicate": r,
                              "density": float(density[ticket_at + r]), "rewind_step": k,
                              "barrier": barriers[r], "errors": errors[r].tolist(),
                              "alphas": np.linspace(0, 1, POINTS).tolist()})
        del state
        summary = early_stop_summary(steps, {m: np.stack(v) for m, v in history.items()},
                                     np.stack(densities))
        for m, (branch, replicate) in enumerate(names):
            row = {"kind": "summary", "level": level, "branch": branch, "replicate": replicate,
                   "density": float(density[m]), "seconds": seconds,
                   "status": "diverged" if diverged[m] >= 0 else "ok",
                   "diverged_step": int(diverged[m]) if diverged[m] >= 0 else None,
                   **{f"density_{layer}": float(alive[layer][m] / weights[layer]) for layer in layers},
                   **({f"units_{name}": int(kept[name][m]) for name in units.names}
                      if cfg.structure != "weights" else {}),
                   **({"barrier": barriers[replicate]} if branch == "instability" else {}),
                   **{name: (_finite(values[m]) if values.dtype.kind == "f" else values[m].item())
                      for name, values in summary.items()}}
            if diverged[m] >= 0:  # no final values
                row.update(dict.fromkeys([name for name in summary if name.startswith("final_")
                                          and name != "final_step"]))
            record.write(row)
            summaries.append(row)
        lost |= {r for r in range(R) if diverged[ticket_at + r] >= 0}
        # diverged members are left out of the means, as in the tables
        healthy = np.where(diverged < 0, summary["early_stop_test_accuracy"], np.nan)
        log(f"level {level}: {100 * density[ticket_at]:.2f}% remaining, {seconds:.0f}s; early-stop "
            "test accuracy " + ", ".join(
                f"{b} {100 * np.nanmean(healthy[i * R:(i + 1) * R]):.2f}%"
                for i, b in enumerate(branches))
            + (f"; instability barrier {100 * np.nanmean(list(barriers.values())):.2f}%"
               if barriers else "")
            + (f"; {np.sum(diverged >= 0)} member(s) diverged" if np.any(diverged >= 0) else ""))
        entry = (rewind, ticket_masks, trained, dense)
        if level < cfg.levels:
            store.save({"level": level + 1, "step": None, "lost": sorted(lost),
                        "record_offset": jsonl.offset}, {"entry": entry})
            faults.reached("level")
    progress.close()
    record.close()
    store.finish({"levels": cfg.levels})
    return pd.DataFrame(summaries)
