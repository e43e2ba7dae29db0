"""Branches: how a level starts, given the level's ticket masks and the rewind weights.

Each branch is a pure function of one replicate's `(model, layers, rewind, masks, key)`
returning `((params, model_state), masks)`, where `rewind` is `(params, model_state)` at the
rewind step (batch-norm statistics rewind with the weights); the engine vmaps it over
replicates. `key` is the member's own key for this level and branch; a branch folds in a
purpose name for each use.

- ticket: the rewound weights under the ticket's masks (Frankle & Carbin 2019).
- reinit: the ticket's masks on fresh weights (and fresh model state) from the init
  distribution.
- random_prune: random masks with exactly the ticket's per-layer densities, rewound weights.
At level 0 (all-ones masks) every branch is a dense network: ticket and random_prune start
from the ticket's init, reinit from a fresh one.
"""

import jax

from lottery.pruning.masks import apply_masks
from lottery.pruning.prune import random_masks_like
from lottery.seeds import name_id


def _purpose(key, purpose: str):
    return jax.random.fold_in(key, name_id(purpose))


def ticket(model, layers, rewind, masks, key):
    params, model_state = rewind
    return (apply_masks(params, masks), model_state), masks


def reinit(model, layers, rewind, masks, key):
    params, model_state = model.init(_purpose(key, "init"))
    return (apply_masks(params, masks), model_state), masks


def random_prune(model, layers, rewind, masks, key):
    params, model_state = rewind
    random_masks = random_masks_like(_purpose(key, "mask"), masks, layers)
    return (apply_masks(params, random_masks), model_state), random_masks


BRANCHES = {"ticket": ticket, "reinit": reinit, "random_prune": random_prune}
