"""Pruning a level: `(scores, masks, rates) -> masks`, exact counts, traceable rates.

Among the surviving weights of a layer (layerwise) or of a pool of layers (global), the
`round(rate * surviving)` lowest-scoring ones are removed. Ties are broken by position,
so the number removed is exact. Rates are traced values: changing them never recompiles.
"""

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from lottery.pruning.masks import MASK_DTYPE, kernels, with_kernels
from lottery.pruning.scores import uniform_random


@dataclass(frozen=True)
class PrunePlan:
    """Which layers are pruned how: each of `layer_rates` on its own at its rate, and the
    `global_layers` together as one pool at `global_rate` (empty for layerwise pruning)."""

    layer_rates: dict[str, float]
    global_layers: tuple[str, ...] = ()
    global_rate: float = 0.0

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer_rates) + self.global_layers

    def rates(self, scale: float = 1.0):
        """The rates as arrays, the traced second argument of `prune` (scale 0: prune nothing)."""
        return ({k: np.float32(v * scale) for k, v in self.layer_rates.items()},
                np.float32(self.global_rate * scale))


def number_to_keep(surviving, rate):
    return surviving - jnp.round(rate * surviving).astype(surviving.dtype)


def keep_top(scores, mask, n_keep):
    """A mask keeping exactly the `n_keep` highest-scoring surviving entries of `mask`."""
    lowest = jnp.finfo(scores.dtype).min  # a NaN score (diverged weight): last of the survivors
    flat = jnp.where(mask.ravel() > 0, jnp.nan_to_num(scores.ravel(), nan=lowest), -jnp.inf)
    order = jnp.argsort(-flat, stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks < n_keep).astype(MASK_DTYPE).reshape(mask.shape)


def prune(plan: PrunePlan, scores, masks, rates):
    """New masks after one level: `scores` by layer name, `rates` from `plan.rates()`."""
    layer_rates, global_rate = rates
    old = kernels(masks, plan.layers)
    new = {}
    for layer, rate in layer_rates.items():
        surviving = jnp.sum(old[layer]).astype(jnp.int32)
        new[layer] = keep_top(scores[layer], old[layer], number_to_keep(surviving, rate))
    if plan.global_layers:
        pool = plan.global_layers
        flat_scores = jnp.concatenate([scores[layer].ravel() for layer in pool])
        flat_mask = jnp.concatenate([old[layer].ravel() for layer in pool])
        surviving = jnp.sum(flat_mask).astype(jnp.int32)
        kept = keep_top(flat_scores, flat_mask, number_to_keep(surviving, global_rate))
        start = 0
        for layer in pool:
            size = old[layer].size
            new[layer] = kept[start : start + size].reshape(old[layer].shape)
            start += size
    return with_kernels(masks, new)


def random_masks_like(key, masks, layers):
    """Random masks with exactly the per-layer counts of `masks` (the random_prune control)."""
    scores = uniform_random(key, masks, layers)
    return with_kernels(masks, {
        layer: keep_top(scores[layer], jnp.ones_like(mask), jnp.sum(mask).astype(jnp.int32))
        for layer, mask in kernels(masks, layers).items()})
