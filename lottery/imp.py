"""Iterative magnitude pruning with rewinding: the level loop.

Level 0 trains every branch dense. Each later level prunes the ticket's trained weights,
starts every branch from the rewind weights (step k of the dense run; k = 0 is the
initialisation) and its masks, and trains the whole (branch x replicate) stack together
from step k to the end. Every evaluation and a summary per member go to the record; each
level's ticket masks (`levels/level_NN.npz`) and the rewind weights (`rewind.npz`) are
saved beside it.
"""

import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm import tqdm

from lottery.branches import BRANCHES
from lottery.config import ConfigError, RunConfig
from lottery.data import Dataset, load_dataset
from lottery.models import ModelSpec, build_model
from lottery.pruning.masks import full_masks, remaining
from lottery.pruning.prune import PrunePlan, number_to_keep, prune
from lottery.pruning.scores import magnitude
from lottery.record import RECORD_NAME, JsonlSink, Record, WandbSink
from lottery.seeds import member_keys
from lottery.optim import OptimizerError, build_optimizer
from lottery.train import Trainer

METRICS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def check_reachable(plan: PrunePlan, weights: dict[str, int], levels: int) -> None:
    """Refuse a schedule that would remove every weight of a layer (or of the global pool)."""
    counts = {layer: weights[layer] for layer in plan.layer_rates}
    pool = sum(weights[layer] for layer in plan.global_layers)
    for level in range(1, levels + 1):
        for layer, rate in plan.layer_rates.items():
            counts[layer] = int(number_to_keep(np.int32(counts[layer]), np.float32(rate)))
            if counts[layer] == 0:
                raise ConfigError(f"prune.levels={levels} at rate {rate} empties layer {layer} "
                                  f"at level {level}: use fewer levels or a lower rate")
        if plan.global_layers:
            pool = int(number_to_keep(np.int32(pool), np.float32(plan.global_rate)))
            if pool == 0:
                raise ConfigError(f"prune.levels={levels} empties the global pool at level "
                                  f"{level}: use fewer levels or a lower rate")


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def level_programs(model, plan: PrunePlan, branches, replicates: int, trainer: Trainer):
    """The compiled programs around training, each compiled once per run.

    `begin(seed, level, rates, trained_ticket, ticket_masks, rewind)` prunes the ticket's
    masks (rates of 0 at level 0), starts every branch and returns the new ticket masks, the
    padded stack (params, model state, masks, data keys) and each member's surviving weights
    per layer. `rewind` is `(params, model_state)`; `trained_ticket` is params.
    `ticket_of(tree)` takes the ticket's replicates out of a stacked tree.
    """
    layers, R = plan.layers, replicates

    def begin(seed, level, rates, trained_ticket, ticket_masks, rewind):
        scores = jax.vmap(lambda p: magnitude(p, layers))(trained_ticket)
        ticket_masks = jax.vmap(partial(prune, plan), in_axes=(0, 0, None))(
            scores, ticket_masks, rates)
        begun = [jax.vmap(partial(BRANCHES[b], model, layers))(
            rewind, ticket_masks, member_keys(seed, R, level, b, "branch")) for b in branches]
        keys = [member_keys(seed, R, level, b, "data") for b in branches]
        masks = _stack([m for _, m in begun])
        alive = jax.vmap(partial(remaining, layers=layers))(masks)
        keys = jax.random.key_data(jnp.concatenate(keys))  # raw uint32: one stable sharding
        params, model_state = _stack([start for start, _ in begun])
        stack = trainer.pad((params, model_state, masks, keys))
        return ticket_masks, stack, alive

    def initial(seed):
        params, model_state = jax.vmap(model.init)(member_keys(seed, R, 0, "ticket", "init"))
        return (params, model_state), jax.vmap(full_masks)(params)

    at = branches.index("ticket") * R
    replicated = trainer.replicated
    return (jax.jit(begin, out_shardings=(replicated, trainer.stacked, replicated)),
            jax.jit(lambda stack: jax.tree.map(lambda x: x[at:at + R], stack),
                    out_shardings=replicated),
            jax.jit(initial, out_shardings=replicated))


def save_arrays(path: Path, tree, dtype=None) -> None:
    """Save a stacked tree of arrays as `path` (npz, keys 'layer/leaf'; axis 0 = replicate),
    atomically: a killed run never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(str(k.key) for k in keys): np.asarray(leaf, dtype)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    with open(path.with_suffix(".tmp"), "wb") as f:
        np.savez_compressed(f, **flat)
    path.with_suffix(".tmp").replace(path)


def early_stop_summary(steps: list[int], history: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Final and early-stop (first minimum of validation loss) values, per member.

    `history[metric]` has shape (evaluations, members)."""
    best = np.argmin(np.nan_to_num(history["val_loss"], nan=np.inf), axis=0)  # NaN: diverged
    members = np.arange(best.size)
    summary = {"final_step": np.full(best.size, steps[-1]),
               "early_stop_step": np.asarray(steps)[best]}
    for metric, values in history.items():
        summary[f"final_{metric}"] = values[-1]
        summary[f"early_stop_{metric}"] = values[best, members]
    return summary


@dataclass(frozen=True)
class Setup:
    """What a run is built from: the config in steps, data, model, pruning plan, weight counts
    and trainer."""

    cfg: RunConfig  # every duration in steps
    data: Dataset
    model: ModelSpec
    plan: PrunePlan
    weights: dict[str, int]  # prunable weights per layer
    chunk: int  # steps per compiled training call: gcd(eval_every, steps, rewind step)
    trainer: Trainer


def _options(section: dict) -> dict:
    return {key: value for key, value in section.items() if key != "name"}


def build(cfg: RunConfig) -> Setup:
    """Load the data and build everything a run needs; refuses impossible schedules."""
    data = load_dataset(cfg.dataset["name"], **_options(cfg.dataset))
    if cfg.batch_size > len(data.x_train):
        raise ConfigError(f"train.batch_size={cfg.batch_size} exceeds the {len(data.x_train)} "
                          f"training examples of {data.name}")
    model = build_model(cfg.model["name"], data.input_shape, data.num_classes,
                        **_options(cfg.model))
    plan = cfg.prune_plan(model.prunable)
    weights = model.param_counts(jax.eval_shape(model.init, jax.random.key(0))[0])
    check_reachable(plan, weights, cfg.levels)
    steps_per_epoch = len(data.x_train) // cfg.batch_size
    cfg = cfg.in_steps(steps_per_epoch)
    chunk = math.gcd(cfg.eval_every, cfg.steps, cfg.rewind_step)
    try:
        optimizer = build_optimizer(**cfg.optimizer, steps_per_epoch=steps_per_epoch)
    except OptimizerError as error:
        raise ConfigError(str(error)) from None
    trainer = Trainer(model, optimizer, data, cfg.batch_size, chunk, cfg.stack_size,
                      cfg.eval_batch_size, cfg.members)
    return Setup(cfg, data, model, plan, weights, chunk, trainer)


def run(cfg: RunConfig, out_dir: Path, log=print) -> pd.DataFrame:
    """Run every level and branch; returns the summary rows (also in `out_dir/record.jsonl`)."""
    out_dir = Path(out_dir)
    if (out_dir / RECORD_NAME).exists():
        raise ConfigError(f"{out_dir / RECORD_NAME} already exists: choose a new hydra.run.dir "
                          "(or delete that run) so that two runs never share one record")
    setup = build(cfg)
    cfg, data, model, plan, weights, chunk, trainer = (
        setup.cfg, setup.data, setup.model, setup.plan, setup.weights, setup.chunk,
        setup.trainer)
    R, branches, k, T = cfg.replicates, cfg.branches, cfg.rewind_step, cfg.steps
    log(f"lottery: {model.name} on {data.name}: {sum(weights.values()):,} prunable weights "
        f"({', '.join(f'{n} {c:,}' for n, c in weights.items())}), of which "
        f"{sum(weights[layer] for layer in plan.layers):,} pruned; {cfg.stack_size} members "
        f"({len(branches)} branches x {R} replicates) on {len(jax.devices())} "
        f"{jax.devices()[0].platform} device(s), members by {trainer.members}; record: "
        f"{out_dir / RECORD_NAME}")
    if chunk < 50:
        log(f"lottery: warning: steps are compiled in chunks of {chunk} (the gcd of eval_every, "
            "steps and rewind.step); choose multiples of a larger number for speed")

    sinks = [JsonlSink(out_dir / RECORD_NAME)]
    if cfg.logger["name"] == "wandb":
        sinks.append(WandbSink(cfg.logger.get("project", "lottery"), cfg.name, cfg.resolved,
                               out_dir, cfg.logger.get("init_timeout", 60)))
    record = Record(sinks)
    record.write({"kind": "run", "name": cfg.name, "config": cfg.resolved,
                  "prunable_weights": weights, "devices": len(jax.devices()), "chunk": chunk})

    layers = plan.layers
    begin, ticket_of, initial = level_programs(model, plan, branches, R, trainer)
    seed = np.uint32(cfg.seed)  # a Python int above 2**31 would overflow jit's int32
    rewind, ticket_masks = initial(seed)
    trained_ticket = rewind[0]
    ticket_at = branches.index("ticket") * R
    names = [(b, r) for b in branches for r in range(R)]

    progress = tqdm(total=T + cfg.levels * (T - k), unit="step", disable=not sys.stderr.isatty(),
                    dynamic_ncols=True)
    summaries = []
    for level in range(cfg.levels + 1):
        ticket_masks, (params, model_state, masks, keys), alive = begin(
            seed, level, plan.rates(1.0 if level else 0.0), trained_ticket, ticket_masks,
            rewind)
        alive = {layer: np.asarray(c).astype(np.int64) for layer, c in alive.items()}
        save_arrays(out_dir / "levels" / f"level_{level:02d}.npz", ticket_masks, bool)
        density = sum(alive.values()) / sum(weights[layer] for layer in layers)
        state = trainer.start(params, model_state, masks)
        del params, model_state, masks

        step = 0 if level == 0 else k
        progress.set_description(f"level {level}/{cfg.levels} ({100 * density[ticket_at]:.1f}%)")
        started = time.perf_counter()
        steps, history = [], {metric: [] for metric in METRICS}

        chunk_losses = []  # each chunk's mean training loss since the last evaluation

        def evaluate(at, state):
            metrics = trainer.evaluate(state[0], state[1])
            train_loss = np.mean(jax.device_get(chunk_losses), axis=0) if chunk_losses else None
            chunk_losses.clear()
            steps.append(at)
            for metric in METRICS:
                history[metric].append(metrics[metric])
            for m, (branch, replicate) in enumerate(names):
                record.write({"kind": "eval", "level": level, "branch": branch,
                              "replicate": replicate, "density": float(density[m]), "step": at,
                              **{metric: float(metrics[metric][m]) for metric in METRICS},
                              "train_loss": None if train_loss is None else float(train_loss[m])})

        evaluate(step, state)
        while step < T:
            state, loss = trainer.train_chunk(state, keys, step)
            chunk_losses.append(loss)
            step += chunk
            progress.update(chunk)
            if level == 0 and step == k:
                rewind = ticket_of(state[:2])  # new buffers: survive the donation
            if step % cfg.eval_every == 0 or step == T:
                evaluate(step, state)
        seconds = time.perf_counter() - started
        if level == 0:
            save_arrays(out_dir / "rewind.npz", {"params": rewind[0], "state": rewind[1]})
        trained_ticket = ticket_of(state[0])
        del state

        summary = early_stop_summary(steps, {m: np.stack(v) for m, v in history.items()})
        for m, (branch, replicate) in enumerate(names):
            row = {"kind": "summary", "level": level, "branch": branch, "replicate": replicate,
                   "density": float(density[m]), "seconds": seconds,
                   **{f"density_{layer}": float(alive[layer][m] / weights[layer]) for layer in layers},
                   **{name: values[m].item() for name, values in summary.items()}}
            record.write(row)
            summaries.append(row)
        log(f"level {level}: {100 * density[ticket_at]:.2f}% remaining, {seconds:.0f}s; early-stop "
            "test accuracy " + ", ".join(
                f"{b} {100 * np.mean(summary['early_stop_test_accuracy'][i * R:(i + 1) * R]):.2f}%"
                for i, b in enumerate(branches)))
    progress.close()
    record.close()
    return pd.DataFrame(summaries)
