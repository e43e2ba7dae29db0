"""What a level prunes: weights of the prunable kernels, or whole neurons / channels.

Both kinds present the same face to the engine: `select(masks)` gives the current
selection `{name: 0/1 array}` (per layer: the kernel's mask; per structure group: one entry
per neuron or channel), `expand(masks, selection)` the masks tree that keeps exactly that
selection, `shapes(params)` the selection's shapes, and `scores(...)` the pruning scores in
the same layout. The engine's pruning, branches and schedules work on selections only.
"""

from dataclasses import dataclass

import jax

from lottery.pruning.masks import apply_masks, full_masks, kernels, with_kernels
from lottery.pruning.scores import SCORES
from lottery.pruning.structured import group_scores, unit_weight_masks, units_alive


@dataclass(frozen=True)
class Weights:
    """Unstructured pruning of the kernels of `layers`."""

    layers: tuple[str, ...]
    records_units = False  # the record counts weights already (`density_<layer>`)

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


@dataclass(frozen=True)
class Structures:
    """Structured pruning of whole units (neurons or channels) of structure `groups`
    (`lottery.pruning.structured`); a unit is scored by the norm of its weights."""

    groups: tuple  # lottery.models.structure.Group
    records_units = True  # summary rows count each group's kept units (`units_<name>`)

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
