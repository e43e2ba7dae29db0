"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

A level trains once at its density from a random mask (ERK or uniform per-layer counts).
After the optimizer step of step s, with t = s + 1 steps done, when t is a multiple of
`every` and t < `stop`, each pruned layer

  - drops the floor(f(t) · n_active) active weights of smallest magnitude (`WHOLE`), where
    f(t) = fraction · (1 + cos(π t / stop)) / 2 (cosine decay, RigL's `drop_fraction_anneal`);
  - grows as many among the rest (those just dropped included): at random (SET) or by the
    largest magnitude of the dense gradient of this step's batch (RigL);
  - a grown weight that was inactive starts at 0 with its optimizer moments reset; one
    dropped and grown again keeps its value (RigL's `reinit_when_same=False`).

Per-layer counts never change. The rule follows RigL's `SparseSETOptimizer._get_update_op`
(rigl/sparse_optimizers.py: the optimizer step first, then the mask update; the drop count
truncated), with ties broken at random from the member's key instead of RigL's 1e-5 noise.
A member's `extra` holds the weights ever active (the in-time over-parameterisation rate,
Liu et al. 2021) and, per update, the fraction of the mask that changed.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottery.distributed import to_host
from lottery.history import recorded
from lottery.pruning.masks import MASK_DTYPE, apply_masks
from lottery.pruning.prune import keep_top
from lottery.pruning.step_hooks import StepHooks, masked_update
from lottery.seeds import name_id
from lottery.state import LevelAddition, LevelHooks


def drop_fraction(t, fraction: float, stop: int):
    """The fraction of each layer's active weights replaced at step t (traceable)."""
    return fraction * (1 + jnp.cos(jnp.pi * t / stop)) / 2


def update_steps(every: int, stop: int) -> int:
    """How many updates a level can make: t = every, 2 every, ... below `stop`."""
    return max(0, (stop - 1) // every)


WHOLE = 2.0**-20  # f · n within this (relative) below a whole number counts as that number


def drop_and_grow(active, drop_scores, grow_scores, fraction, key):
    """One layer's new mask: of `active` (0/1), the highest `drop_scores` kept but
    floor(fraction · n_active); as many grown among the rest by the highest `grow_scores`.
    Ties are broken at random from `key`. The product is float32: one that is whole in
    exact arithmetic (f = 0.5 at t = stop / 2: cos(π/2) is -4e-8 in float32) would truncate
    to one less, as it does in RigL's TensorFlow code; `WHOLE` keeps it whole."""
    n_active = jnp.sum(active).astype(jnp.int32)
    n_drop = jnp.floor(fraction * n_active * (1 + WHOLE)).astype(jnp.int32)
    drop_key, grow_key = jax.random.split(key)
    kept = keep_top(drop_scores, active, n_active - n_drop, drop_key)
    grown = keep_top(grow_scores, 1 - kept, n_drop, grow_key)
    return (kept + grown).astype(MASK_DTYPE)


def reset_moments(optimizer, opt_state, keep):
    """`opt_state` with every params-shaped moment (momentum, Adam's mu and nu) multiplied
    by `keep` (0 where a weight was just grown)."""
    return optax.tree_utils.tree_map_params(optimizer, lambda moment, k: moment * k,
                                            opt_state, keep)


class Updates(NamedTuple):
    """A member's `extra` under dynamic sparse training."""

    ever: dict  # {layer: 0/1}: the weights active at some step of the level
    changed: jax.Array  # per update: the fraction of the pruned layers' mask that changed
    replaced: jax.Array  # per update: the fraction of the active weights replaced


class DynamicSparse(StepHooks):
    """The step hooks of SET (`grow="random"`) and RigL (`grow="gradient"`) on `units`'
    layers (`lottery.pruning.units.Weights`); `optimizer` resets the grown weights'
    moments."""

    fixed_masks = False

    def __init__(self, units, optimizer, grow: str, every: int, fraction: float, stop: int):
        self.units, self.optimizer, self.grow = units, optimizer, grow
        self.every, self.fraction, self.stop = every, fraction, stop
        self.updates = update_steps(every, stop)

    def start(self, params, masks):
        slots = jnp.full((self.updates,), jnp.nan, jnp.float32)
        return Updates(self.units.select(masks), slots, slots)

    def update(self, optimize, grads, params, opt_state, masks, extra, step, controls, key):
        params, opt_state = masked_update(optimize, grads, params, opt_state, masks)
        t = step + 1
        due = (t % self.every == 0) & (t < self.stop)

        def mask_update(args):
            params, opt_state, masks, extra = args
            return self.mask_update(grads, params, opt_state, masks, extra, t, key)

        return jax.lax.cond(due, mask_update, lambda args: args,
                            (params, opt_state, masks, extra))

    def mask_update(self, grads, params, opt_state, masks, extra: Updates, t, key):
        """Drop and grow in every layer at step t; the new weights start at 0 with zero
        moments; the update's numbers go into `extra`."""
        old, weights = self.units.select(masks), self.units.select(params)
        gradients = self.units.select(grads)
        fraction = drop_fraction(t, self.fraction, self.stop)
        key = jax.random.fold_in(key, t)
        new = {}
        for layer, active in old.items():
            layer_key = jax.random.fold_in(key, name_id(layer))
            grow_scores = (jnp.abs(gradients[layer]) if self.grow == "gradient" else
                           jax.random.uniform(jax.random.fold_in(layer_key, name_id("grow")),
                                              active.shape))
            new[layer] = drop_and_grow(active, jnp.abs(weights[layer]), grow_scores,
                                       fraction, layer_key)
        grown = {layer: new[layer] * (1 - old[layer]) for layer in new}
        masks = self.units.expand(masks, new)
        keep = jax.tree.map(lambda m: 1 - m, self.units.expand(
            jax.tree.map(jnp.zeros_like, masks), grown))
        params = apply_masks(params, masks)  # dropped: 0; grown: 0 already (were masked)
        opt_state = reset_moments(self.optimizer, opt_state, keep)
        total = sum(m.size for m in old.values())
        changed = sum(jnp.sum(new[layer] != old[layer]) for layer in new) / total
        active = sum(jnp.sum(m) for m in old.values())
        replaced = sum(jnp.sum(g) for g in grown.values()) / active
        slot = t // self.every - 1
        extra = Updates({layer: jnp.maximum(extra.ever[layer], new[layer]) for layer in new},
                        extra.changed.at[slot].set(changed), extra.replaced.at[slot].set(replaced))
        return params, opt_state, masks, extra


class UpdateRecord(LevelHooks):
    """Each level's mask updates and in-time over-parameterisation rate into the record:
    a `mask_update` row per member and update (step, `mask_changed`, `replaced`), and each
    member's `itop_rate` (the fraction of its pruned layers' weights ever active) in its
    summary row."""

    def __init__(self, layout, every: int):
        self.layout, self.every = layout, every

    def after_level(self, state, level, density):
        if level == 0:  # dense: nothing to drop or grow
            return LevelAddition([], {}, "")
        ever, changed, replaced = to_host((state.extra.ever, state.extra.changed,
                                           state.extra.replaced))
        alive = sum(np.asarray(m, np.float64).reshape(len(m), -1).sum(1) for m in ever.values())
        total = sum(math.prod(m.shape[1:]) for m in ever.values())
        rows, summary = [], {}
        for m, (branch, replicate) in enumerate(self.layout.members):
            rate = float(alive[m] / total)
            summary[(branch, replicate)] = {"itop_rate": rate}
            for slot in np.flatnonzero(np.isfinite(changed[m])):
                rows.append({"kind": "mask_update", "level": level, "branch": branch,
                             "replicate": replicate, "step": int((slot + 1) * self.every),
                             "mask_changed": recorded(changed[m][slot]),
                             "replaced": recorded(replaced[m][slot])})
        rates = [s["itop_rate"] for s in summary.values()]
        return LevelAddition(rows, summary, f"ITOP rate {100 * np.mean(rates):.1f}%")
