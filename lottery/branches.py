"""Branches: how a level starts, given the level's ticket and the start weights.

Each branch is a pure function `(model, units, level: LevelStart, key)` of one replicate,
returning `((params, model_state), masks)`; the engine vmaps it over replicates. `units`
(`lottery.pruning.units`) says what is pruned (weights, neurons or channels), so every
control works alike on each. `level.start` is `(params, model_state)` to start from: the
rewind point (weight rewinding; batch-norm statistics rewind with the weights) or the
trained weights (learning-rate rewinding, fine-tuning). `key` is the member's own key for
this level and branch; a branch folds in a purpose name for each use.

- ticket: the start weights under the ticket's masks (Frankle & Carbin 2019).
- reinit: the ticket's masks on fresh weights (and fresh model state) from the init
  distribution.
- random_prune: random masks with exactly the ticket's per-layer (per-group) counts, start
  weights. With weight rewinding the random units are drawn from the whole layer (Frankle &
  Carbin's random pruning); when a level starts from the trained weights (rewind.mode lr or
  finetune) they are drawn among the units the ticket was chosen from, so the control is
  random pruning of the trained network and no weight pruned earlier comes back at 0.
- shuffle: the ticket's masks permuted at random within each layer (group), start weights:
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

from typing import NamedTuple

import jax

from lottery.pruning.masks import apply_masks
from lottery.pruning.prune import random_like, shuffled
from lottery.seeds import name_id


class LevelStart(NamedTuple):
    start: tuple  # (params, model_state)
    masks: dict  # the ticket's masks tree
    selection: dict  # the ticket's kept units, {name: 0/1}
    candidates: dict  # the units random_prune draws from, {name: 0/1}
    inverted: dict | None  # the selection of the method run with inverted scores


def _purpose(key, purpose: str):
    return jax.random.fold_in(key, name_id(purpose))


def _with_masks(start, masks):
    params, model_state = start
    return (apply_masks(params, masks), model_state), masks


def ticket(model, units, level: LevelStart, key):
    return _with_masks(level.start, level.masks)


def reinit(model, units, level: LevelStart, key):
    return _with_masks(model.init(_purpose(key, "init")), level.masks)


def random_prune(model, units, level: LevelStart, key):
    selection = random_like(_purpose(key, "mask"), level.selection, level.candidates)
    return _with_masks(level.start, units.expand(level.masks, selection))


def shuffle(model, units, level: LevelStart, key):
    selection = shuffled(_purpose(key, "shuffle"), level.selection)
    return _with_masks(level.start, units.expand(level.masks, selection))


def inverted(model, units, level: LevelStart, key):
    return _with_masks(level.start, units.expand(level.masks, level.inverted))


BRANCHES = {"ticket": ticket, "reinit": reinit, "random_prune": random_prune,
            "shuffle": shuffle, "inverted": inverted, "instability": ticket}
TWIN = "instability_b"  # the second copy of the instability pair: its own data order


def members_of(branches) -> tuple[str, ...]:
    """The branches as trained: `instability` brings its twin."""
    return tuple(branches) + ((TWIN,) if "instability" in branches else ())


def branch_function(name: str):
    return BRANCHES["instability" if name == TWIN else name]
