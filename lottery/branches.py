"""Branches: how a level starts, given the level's ticket and the start weights.

Each branch is a small class: `start(model, units, level: LevelStart, key)`, a pure function
of one replicate returning `(Network, masks)` (the engine vmaps it over replicates), and,
where a branch needs them, hooks into the level (`LevelHooks`). The level loop never names a
branch: to add one, write a class and add it to `BRANCHES`. `units`
(`lottery.pruning.units`) says what is pruned (weights, neurons or channels), so every
control works alike on each. `level.start` is the `Network` to start from: the
rewind point (weight rewinding; batch-norm statistics rewind with the weights) or the
trained weights (learning-rate rewinding, fine-tuning). `key` is the member's own key for
this level and branch; a branch folds in a purpose name for each use.

- ticket: the start weights under the ticket's masks (Frankle & Carbin 2019).
- reinit: the ticket's masks on fresh weights (and fresh model state) from the init
  distribution.
- random_prune: random masks with exactly the ticket's per-layer (per-group) counts (N:M:
  a random N:M mask), start weights. With weight rewinding the random units are drawn from
  the whole layer (Frankle & Carbin's random pruning); when a level starts from the trained
  weights (rewind.mode lr or finetune) they are drawn among the units the ticket was chosen
  from, so the control is random pruning of the trained network and no weight pruned
  earlier comes back at 0.
- shuffle: the ticket's masks permuted at random within each layer (group; N:M: within
  each group of M, which makes it a random N:M mask like random_prune's), start weights:
  the layerwise-shuffling sanity check of Frankle et al. 2021 (refused by the config where
  it would revive pruned trained weights: iterative pruning from trained weights).
- inverted: the units the same method keeps with its scores inverted: every scoring round
  keeps the *lowest*-scoring survivors, as many as the method keeps (per layer, or over the
  pool under global pruning, which then sets the per-layer counts); score inversion, Frankle
  et al. 2021, round by round as Synaptic-Flow's `invert`.
- instability: two copies of the ticket (`instability` and its twin `instability_b`), trained
  with different data orders; the engine records the error barrier on the straight line
  between them (`lottery.instability`). At every level both copies start as the ticket's
  retraining starts: its weights and batch-norm statistics at step k, a fresh optimizer
  state, the learning rate of step k (level 0 with k > 0: the dense run's weights at k).
At level 0 (nothing pruned) every branch is a dense network: all start from the ticket's
init except reinit, which starts from a fresh one.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottery.history import recorded
from lottery.instability import POINTS, barrier, interpolation_errors
from lottery.options import ConfigError, override
from lottery.pruning.masks import apply_masks
from lottery.seeds import name_id
from lottery.state import LevelAddition, LevelHooks, MemberState, Network


class LevelStart(NamedTuple):
    start: Network  # the network every branch starts from
    masks: Any  # the ticket's masks tree
    selection: dict  # the ticket's kept units, {name: 0/1}
    candidates: dict  # the units random_prune draws from, {name: 0/1}
    inverted: dict | None  # the selection of the method run with inverted scores


def _purpose(key, purpose: str):
    return jax.random.fold_in(key, name_id(purpose))


def _with_masks(start: Network, masks):
    return Network(apply_masks(start.params, masks), start.model_state), masks


class Branch:
    """The ticket: the start weights under the ticket's masks."""

    uses_inverted = False  # whether the level also runs the method with inverted scores
    twin = None  # the name of a second member with its own data order, if any

    def start(self, model, units, level: LevelStart, key):
        return _with_masks(level.start, level.masks)

    def hooks(self, setup) -> LevelHooks | None:
        """The branch's hooks for a run built as `setup` (`lottery.setup.Setup`), if any."""
        return None

    def check(self, cfg) -> None:
        """Raise `ConfigError` where the branch cannot run with `cfg` (a `RunConfig`)."""


class Reinit(Branch):
    def start(self, model, units, level, key):
        return _with_masks(Network(*model.init(_purpose(key, "init"))), level.masks)


class RandomPrune(Branch):
    def start(self, model, units, level, key):
        selection = units.random_like(_purpose(key, "mask"), level.selection, level.candidates)
        return _with_masks(level.start, units.expand(level.masks, selection))


class Shuffle(Branch):
    def start(self, model, units, level, key):
        selection = units.shuffled(_purpose(key, "shuffle"), level.selection)
        return _with_masks(level.start, units.expand(level.masks, selection))

    def check(self, cfg):
        mode = cfg.rewind.mode
        if cfg.prune.schedule == "iterative" and mode != "weights":
            kept = [b for b in cfg.branches if b != "shuffle"]
            kept += [] if "random_prune" in kept else ["random_prune"]
            fix = override("branches", kept)
            raise ConfigError(f"branches include shuffle, which permutes the ticket's mask over "
                              f"the whole layer: with rewind.mode={mode} and iterative pruning "
                              "it would start weights pruned at earlier levels again at exactly "
                              f"0; use {fix} (random_prune draws among the trained "
                              "survivors), or rewind.mode=weights", key="branches", fix=fix)


class Inverted(Branch):
    uses_inverted = True

    def start(self, model, units, level, key):
        return _with_masks(level.start, units.expand(level.masks, level.inverted))


class Instability(Branch):
    """Two copies of the ticket; the pair's hooks (`Pair`) share their start and record the
    error barrier between them after each level."""

    twin = "instability_b"

    def hooks(self, setup):
        return Pair(setup.model, setup.layout, setup.trainer, setup.rewind.step)


class Pair(LevelHooks):
    """The instability pair's compiled programs. `share(state)` starts both copies as the
    ticket's retraining starts at step k: the ticket's params and model state, a fresh
    optimizer state (the rule of every level); `errors(network)` gives the test errors,
    shape (replicates, POINTS), on the line between each replicate's copies (batch-norm
    statistics re-estimated on `statistics_batches` training batches at each point)."""

    def __init__(self, model, layout, trainer, rewind_step: int, statistics_batches: int = 50):
        self.layout, self.rewind_step = layout, rewind_step
        ticket, first, second = (layout.rows(b) for b in ("ticket", "instability",
                                                          Instability.twin))
        x_train, _ = trainer.train_data
        batch = min(len(x_train) // statistics_batches, 100) or 1
        statistics = x_train[: batch * statistics_batches].reshape(-1, batch, *x_train.shape[1:])

        def share(state: MemberState) -> MemberState:
            source = jnp.arange(ticket.start, ticket.stop)
            targets = jnp.concatenate([jnp.arange(first.start, first.stop),
                                       jnp.arange(second.start, second.stop)])
            pair = jnp.concatenate([source, source])
            network = jax.tree.map(lambda x: x.at[targets].set(x[pair]), state.network)
            fresh = jax.vmap(trainer.optimizer.init)(
                jax.tree.map(lambda x: x[targets], network.params))
            opt_state = jax.tree.map(lambda x, f: x.at[targets].set(f), state.opt_state, fresh)
            return state._replace(params=network.params, model_state=network.model_state,
                                  opt_state=opt_state)

        def errors(network: Network):
            ends = [jax.tree.map(lambda x, rows=rows: x[rows], network) for rows in (first, second)]
            _, test = trainer.eval_data
            return jax.lax.map(lambda ends: interpolation_errors(model, *ends, test, statistics),
                               tuple(ends))

        self.share = jax.jit(share, out_shardings=trainer.stacked, donate_argnums=0)
        self.errors = jax.jit(errors, out_shardings=trainer.replicated)

    def at_rewind_point(self, state):
        return self.share(state)  # both copies start from the dense run at k

    def after_level(self, state, level, density):
        errors = np.asarray(self.errors(state.network))
        ticket = self.layout.ticket.start
        rows, summary = [], {}
        for r, line in enumerate(errors):
            value = recorded(barrier(line))
            rows.append({"kind": "instability", "level": level, "replicate": r,
                         "density": float(density[ticket + r]),
                         "rewind_step": self.rewind_step, "barrier": value,
                         "errors": line.tolist(), "alphas": np.linspace(0, 1, POINTS).tolist()})
            summary[("instability", r)] = {"barrier": value}
        values = [row["barrier"] for row in rows]
        return LevelAddition(rows, summary, "instability barrier "
                             f"{100 * np.nanmean(np.array(values, float)):.2f}%")


BRANCHES = {"ticket": Branch(), "reinit": Reinit(), "random_prune": RandomPrune(),
            "shuffle": Shuffle(), "inverted": Inverted(), "instability": Instability()}
TWINS = {branch.twin: branch for branch in BRANCHES.values() if branch.twin}


def members_of(branches) -> tuple[str, ...]:
    """The branches as trained: a branch with a twin brings it, after all the others."""
    return tuple(branches) + tuple(BRANCHES[b].twin for b in branches if BRANCHES[b].twin)


def branch_of(name: str) -> Branch:
    """The branch a trained member's name belongs to (a twin: its branch)."""
    return TWINS.get(name) or BRANCHES[name]
