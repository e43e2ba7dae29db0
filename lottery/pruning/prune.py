"""Pruning a level: exact kept counts planned on the host, applied by traceable functions.

A *unit* is what a score ranks and a mask keeps: a weight of a prunable kernel
(unstructured pruning) or a whole neuron or channel (structured). Pruning works on
`{name: 0/1 array}` selections of units (one entry per layer or per structure group) and
keeps, among the survivors of a base selection, the `count` highest-scoring ones. Ties are
broken at random from a key the caller derives (`lottery.seeds`), never by position or layer
order, so every count is exact and equal scores (a quantised grid, rewound weights, weights
already pruned) share the cut fairly. Counts are traced values: changing them never recompiles.

`PrunePlan.counts` plans every level's counts on the host: layerwise (each layer at its
rate), global (one pool, one threshold) or ERK (the pool's total split over its layers by
the Erdős–Rényi-Kernel rule). Iterative pruning removes `round(rate * surviving)` per level;
one-shot and gradual pruning reach the same counts, so every schedule compares at equal
densities. An N:M plan (`nm`, `lottery.pruning.nm`) keeps N of every M weights along each of
its layers' inputs: G·N of a layer's G groups from level 1 on, and `keep_counts` keeps the
top `round(count / G)` of each group, so a count between the levels' (gradual pruning,
rounds) goes through N':M states.
"""

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottery.pruning.masks import MASK_DTYPE
from lottery.pruning.nm import keep_groups
from lottery.seeds import name_id


class PlanError(ValueError):
    """A pruning schedule that cannot be carried out (it would empty a layer)."""


class Counts(NamedTuple):
    """Units kept at one level: per name pruned on its own, and in the global pool."""

    layers: dict  # name -> int32
    pool: np.int32


@dataclass(frozen=True)
class PrunePlan:
    """Which units are pruned how: each of `layer_rates` on its own at its rate, and the
    `global_layers` together as one pool at `global_rate` per level: by one threshold, or
    (`erk`) split over its layers by the ERK rule and then pruned layer by layer. `nm`
    (N, M): every layer of `layer_rates` keeps N of every M weights along its inputs from
    level 1 on (its rate unused; no pool)."""

    layer_rates: dict[str, float]
    global_layers: tuple[str, ...] = ()
    global_rate: float = 0.0
    erk: bool = False
    nm: tuple[int, int] | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer_rates) + self.global_layers

    @property
    def pooled(self) -> tuple[str, ...]:
        """The layers ranked together under one threshold (none for ERK)."""
        return () if self.erk else self.global_layers

    def counts(self, shapes: dict[str, tuple[int, ...]], levels: int) -> list[Counts]:
        """Units kept at levels 0..`levels` (`shapes`: each name's unit array shape); raises
        `PlanError` when a level would empty a layer or the pool, or when an N:M layer's
        inputs do not split into groups of M."""
        from lottery.pruning.erk import erk_counts

        sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
        if self.nm:
            return self._nm_counts(shapes, sizes, levels)
        own = {layer: sizes[layer] for layer in self.layer_rates}
        pool_size = sum(sizes[layer] for layer in self.global_layers)
        pool = pool_size
        plan = []
        for level in range(levels + 1):
            if level:
                for layer, rate in self.layer_rates.items():
                    own[layer] = int(number_to_keep(np.int32(own[layer]), np.float32(rate)))
                    if own[layer] == 0:
                        raise PlanError(f"prune.levels={levels} at rate {rate} empties layer "
                                        f"{layer} at level {level}: use fewer levels or a "
                                        "lower rate")
                if self.global_layers:
                    pool = int(number_to_keep(np.int32(pool), np.float32(self.global_rate)))
                    if pool == 0:
                        raise PlanError(f"prune.levels={levels} empties the global pool at "
                                        f"level {level}: use fewer levels or a lower rate")
            layer_counts = dict(own)
            if self.erk and self.global_layers:
                erk = erk_counts({layer: shapes[layer] for layer in self.global_layers},
                                 pool / pool_size)
                previous = plan[-1].layers if plan else sizes
                layer_counts.update({layer: min(erk[layer], previous[layer])
                                     for layer in self.global_layers})
            plan.append(Counts({k: np.int32(v) for k, v in layer_counts.items()},
                               np.int32(0 if self.erk else pool)))
        return plan

    def _nm_counts(self, shapes, sizes, levels):
        n, m = self.nm
        for layer in self.layer_rates:
            inputs = shapes[layer][-2] if len(shapes[layer]) > 1 else 1
            if inputs % m:
                raise PlanError(f"prune.nm=[{n},{m}] keeps {n} of every {m} inputs of a layer, "
                                f"but layer {layer} has {inputs} inputs, not a multiple of {m}: "
                                f"leave it dense with +prune.layer_rates.{layer}=0 (or out of "
                                f"prune.layers), or use an M that divides {inputs}")
        return [Counts({layer: np.int32(sizes[layer] if level == 0 else sizes[layer] // m * n)
                        for layer in self.layer_rates}, np.int32(0))
                for level in range(levels + 1)]


def number_to_keep(surviving, rate):
    return surviving - jnp.round(rate * surviving).astype(surviving.dtype)


def keep_top(scores, mask, n_keep, key):
    """A mask keeping exactly the `n_keep` highest-scoring surviving entries of `mask`.

    Equal scores are ordered by random 32-bit keys drawn from `key`: which of them is kept
    never depends on its position (stable sorting would keep the first entries of the first
    layer); only entries equal in score and in key (about n²/2³³ pairs among n tied at
    the cut) fall back to their order. A NaN score (a diverged weight) ranks below every
    number among the survivors. No sort: the cut is found by bisection over the scores'
    bits (`threshold`), some 20 times faster than sorting on a CPU."""
    lowest = jnp.finfo(scores.dtype).min
    flat = ordered(jnp.nan_to_num(scores.ravel(), nan=lowest))
    alive = mask.ravel() > 0
    cut = threshold(flat, alive, n_keep)
    above, tied = alive & (flat > cut), alive & (flat == cut)
    need = n_keep - jnp.sum(above)  # kept among the tied, by random keys
    draws = jax.random.bits(key, flat.shape, jnp.uint32)
    draw_cut = threshold(draws, tied, need)
    lucky, last = tied & (draws > draw_cut) & (need > 0), tied & (draws == draw_cut)
    last = last & (jnp.cumsum(last) <= need - jnp.sum(lucky))
    kept = (above | lucky | last) & (n_keep > 0)
    return kept.astype(MASK_DTYPE).reshape(mask.shape)


def ordered(x):
    """uint32 keys in the order of the float32 values `x` (-inf < ... < -0 < 0 < ... < inf)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def threshold(keys, where, k):
    """The largest t with at least `k` (at least 1) of the uint32 `keys` at `where` >= t:
    32 halvings of [0, 2³² - 1], each one count."""
    k = jnp.maximum(k, 1)

    def halve(_, bounds):
        low, high = bounds  # the answer is in [low, high]
        span = high - low
        mid = low + span // 2 + span % 2
        enough = jnp.sum(where & (keys >= mid)) >= k
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid - jnp.uint32(1))

    low, _ = jax.lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(2**32 - 1)))
    return low


def keep_counts(plan: PrunePlan, scores: dict, base: dict, counts: Counts, key) -> dict:
    """The selection keeping, among the survivors of `base`, `counts` of the highest `scores`:
    per name for the names in `counts.layers` (an N:M plan: `round(count / G)` in each of
    a layer's G groups), over the pool for `plan.pooled`; ties broken at random from `key`
    (one draw per name, one for the pool)."""
    def keep(name, count):
        name_key = jax.random.fold_in(key, name_id(name))
        if plan.nm:
            return keep_groups(scores[name], base[name], count, plan.nm[1], name_key)
        return keep_top(scores[name], base[name], count, name_key)

    new = {name: keep(name, count) for name, count in counts.layers.items()}
    if plan.pooled:
        flat_scores = jnp.concatenate([scores[name].ravel() for name in plan.pooled])
        flat_base = jnp.concatenate([base[name].ravel() for name in plan.pooled])
        kept = keep_top(flat_scores, flat_base, counts.pool,
                        jax.random.fold_in(key, name_id("global pool")))
        start = 0
        for name in plan.pooled:
            size = base[name].size
            new[name] = kept[start : start + size].reshape(base[name].shape)
            start += size
    return new


def survivors(plan: PrunePlan, selection: dict) -> Counts:
    """The counts of a selection, as `keep_counts` takes them (traceable)."""
    pool = sum((jnp.sum(selection[name]) for name in plan.pooled), jnp.float32(0))
    return Counts({name: jnp.sum(selection[name]).astype(jnp.int32)
                   for name in plan.layers if name not in plan.pooled},
                  pool.astype(jnp.int32))


def interpolate(start: Counts, end: Counts, remaining_fraction, curve="cubic") -> Counts:
    """Counts between `start` (fraction 1) and `end` (fraction 0): `end + (start - end) * f`,
    with f = remaining_fraction**3 (Zhu & Gupta's cubic schedule, `curve="cubic"`), or
    `start * (end / start) ** (1 - remaining_fraction)` (`curve="geometric"`:
    SynFlow's exponential schedule). Traceable; exact at both ends."""
    def one(a, b):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        if curve == "geometric":
            value = a * (b / jnp.maximum(a, 1)) ** (1 - remaining_fraction)
        else:
            value = b + (a - b) * remaining_fraction**3
        value = jnp.where(remaining_fraction <= 0, b, jnp.where(remaining_fraction >= 1, a, value))
        return jnp.round(value).astype(jnp.int32)

    return jax.tree.map(one, start, end)


def random_like(key, selection: dict, candidates: dict | None = None) -> dict:
    """Random selections with exactly the per-name counts of `selection` (random_prune),
    drawn among `candidates` (default: every unit)."""
    keys = jax.random.split(key, len(selection))
    return {name: keep_top(jax.random.uniform(k, s.shape),
                           jnp.ones_like(s) if candidates is None else candidates[name],
                           jnp.sum(s).astype(jnp.int32), jax.random.fold_in(k, 1))
            for k, (name, s) in zip(keys, selection.items())}


def shuffled(key, selection: dict) -> dict:
    """Each name's selection with its entries permuted at random (the shuffle control of
    Frankle et al. 2021): per-name counts unchanged, positions random."""
    keys = jax.random.split(key, len(selection))
    return {name: jax.random.permutation(k, s.ravel()).reshape(s.shape)
            for k, (name, s) in zip(keys, selection.items())}
