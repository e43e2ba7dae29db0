"""What a level prunes: weights of the prunable kernels, N:M groups of them, or whole
neurons / channels.

Every kind presents the same face to the engine: `select(masks)` gives the current
selection `{name: 0/1 array}` (per layer: the kernel's mask; per structure group: one entry
per neuron or channel), `expand(masks, selection)` the masks tree that keeps exactly that
selection, `shapes(params)` the selection's shapes, and `scores(...)` the pruning scores in
the same layout; `random_like(key, selection, candidates)` and `shuffled(key, selection)`
the random controls (random_prune, shuffle) with the selection's counts; `summary(kept,
weights)` the kind's own values for a member's summary row. The engine's pruning, branches
and schedules work on selections only. Which units a level keeps is the plan's rule
(`lottery.pruning.prune.keep_counts`): N:M keeps per group.

- `Weights`: unstructured pruning of single weights.
- `NM`: N:M sparsity (`lottery.pruning.nm`): selections are kernel masks as for `Weights`,
  kept N of every M along each kernel's inputs; random_prune draws a random N:M mask,
  shuffle permutes each group (so it too is a random N:M mask, random_prune's draw from the
  whole layer); summary rows carry `nm_bytes` (the compressed layout, `nm.compress`) and
  `dense_bytes` (float32 kernels) of the N:M layers.
- `Structures`: whole neurons or channels (`lottery.pruning.structured`).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lottery.pruning import nm
from lottery.pruning.masks import apply_masks, full_masks, kernels, with_kernels
from lottery.pruning.prune import random_like, shuffled
from lottery.pruning.scores import SCORES
from lottery.pruning.structured import group_scores, unit_weight_masks, units_alive


@dataclass(frozen=True)
class Weights:
    """Unstructured pruning of the kernels of `layers`."""

    layers: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.layers

    def select(self, masks) -> dict:
        return kernels(masks, self.layers)

    def expand(self, masks, selection: dict):
        return with_kernels(masks, selection)

    def shapes(self, params) -> dict:
        return {layer: tuple(k.shape) for layer, k in kernels(params, self.layers).items()}

    def scores(self, score: str, model, params, model_state, masks, batch, key) -> dict:
        return SCORES[score](model, params, model_state, masks, self.layers, batch, key)

    def random_like(self, key, selection: dict, candidates: dict | None = None) -> dict:
        return random_like(key, selection, candidates)

    def shuffled(self, key, selection: dict) -> dict:
        return shuffled(key, selection)

    def summary(self, kept: dict, weights: dict) -> dict:
        """Extra summary values of a member that keeps `kept` units per name (`weights`:
        each prunable layer's weights): none, the record counts weights already
        (`density_<layer>`)."""
        return {}


@dataclass(frozen=True)
class NM(Weights):
    """N:M sparsity of the kernels of `layers`: `n` of every `m` consecutive weights along
    each kernel's inputs (the plan keeps them: `PrunePlan.nm`)."""

    n: int = 2
    m: int = 4

    def random_like(self, key, selection, candidates=None):
        keys = jax.random.split(key, len(selection))
        return {name: nm.random_groups(k, s, jnp.ones_like(s) if candidates is None
                                       else candidates[name], self.m)
                for k, (name, s) in zip(keys, selection.items())}

    def shuffled(self, key, selection):
        keys = jax.random.split(key, len(selection))
        return {name: nm.shuffled_groups(k, s, self.m)
                for k, (name, s) in zip(keys, selection.items())}

    def summary(self, kept, weights):
        """The bytes of the N:M layers: `nm_bytes` in the compressed layout of the member's
        masks (`nm.compress`: float32 values and packed positions), `dense_bytes` as
        float32 kernels."""
        return {"nm_bytes": sum(nm.layout_bytes(int(kept[layer]), self.m)
                                for layer in self.layers),
                "dense_bytes": sum(weights[layer] * nm.FLOAT_BYTES for layer in self.layers)}


@dataclass(frozen=True)
class Structures:
    """Structured pruning of whole units (neurons or channels) of structure `groups`
    (`lottery.pruning.structured`); a unit is scored by the norm of its weights."""

    groups: tuple  # lottery.models.structure.Group

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(group.name for group in self.groups)

    def select(self, masks) -> dict:
        return units_alive(masks, self.groups)

    def expand(self, masks, selection: dict):
        return unit_weight_masks(full_masks(masks), self.groups, selection)

    def shapes(self, params) -> dict:
        return {group.name: (group.size,) for group in self.groups}

    def scores(self, score: str, model, params, model_state, masks, batch, key) -> dict:
        if score == "random":
            keys = jax.random.split(key, len(self.groups))
            return {g.name: jax.random.uniform(k, (g.size,)) for k, g in zip(keys, self.groups)}
        return group_scores(apply_masks(params, masks), self.groups)

    def random_like(self, key, selection, candidates=None):
        return random_like(key, selection, candidates)

    def shuffled(self, key, selection):
        return shuffled(key, selection)

    def summary(self, kept, weights):
        """Each group's kept units (`units_<name>`)."""
        return {f"units_{name}": int(kept[name]) for name in self.names}
