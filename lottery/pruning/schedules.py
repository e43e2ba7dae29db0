"""Pruning schedules: when a level's units are removed, and from which network.

A schedule is a small class with the hooks the level loop calls; the loop never names one.
Every schedule reaches the same per-level counts (`PrunePlan.counts`), so they compare at
equal densities.

- iterative (Frankle & Carbin 2019): each level prunes the ticket trained at the last level,
  among the survivors of its masks.
- oneshot: each level prunes the dense network trained at level 0 straight to its counts.
- gradual (Zhu & Gupta 2017): each level trains from the dense network and prunes while it
  trains, by magnitude, on a cubic schedule between `start` and `end` every `every` steps.

To add one: subclass `Schedule`, override the hooks that differ, add it to `SCHEDULES`.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lottery.pruning.prune import Counts, PrunePlan, interpolate, keep_counts
from lottery.state import LevelEntry


@dataclass(frozen=True)
class Schedule:
    """The hooks, with the one-shot behaviour as the default."""

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """The schedule with its options from `cfg` (a `RunConfig` in steps)."""
        return cls()

    def source(self, entry: LevelEntry):
        """The network a level prunes (and, under rewind.mode lr or finetune, retrains)."""
        return entry.dense

    def base_masks(self, level: int, entry: LevelEntry, full):
        """The masks whose survivors the level's ticket is chosen among."""
        return full

    def start_counts(self, counts: list[Counts], level: int) -> Counts:
        """The units the level keeps when it starts."""
        return counts[level]

    def controls(self, counts: list[Counts], level: int) -> dict:
        """Traced values the level's per-step hook reads (none by default)."""
        return {}

    def prune_step(self, units, plan: PrunePlan, counts: list[Counts]):
        """The Trainer's per-step hook (`lottery.train.Trainer`), or None."""
        return None


@dataclass(frozen=True)
class OneShot(Schedule):
    pass


@dataclass(frozen=True)
class Iterative(Schedule):
    def source(self, entry):
        return entry.trained

    def base_masks(self, level, entry, full):
        return entry.masks if level else full


@dataclass(frozen=True)
class Gradual(Schedule):
    """Pruning events before steps start, start + every, ..., end (in steps; the config
    refuses an `end` the level never trains, so the level ends at exactly its counts)."""

    start: int
    end: int
    every: int

    @classmethod
    def from_config(cls, cfg):
        return cls(**cfg.gradual)

    def start_counts(self, counts, level):
        return counts[0]  # a level starts dense

    def controls(self, counts, level):
        return {"counts": counts[level]}

    def prune_step(self, units, plan, counts):
        return gradual_pruning(units, plan, counts[0], self.start, self.end, self.every)


def gradual_pruning(units, plan: PrunePlan, full: Counts, start: int, end: int, every: int):
    """The per-step hook of gradual magnitude pruning: at an event, keep the
    largest-magnitude survivors, as many as the cubic schedule gives between `full` and
    `controls["counts"]` (the level's counts). Ties are broken at random from the member's
    `key`, folded with the step (only at an event, not at every step)."""
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


SCHEDULES = {"iterative": Iterative, "oneshot": OneShot, "gradual": Gradual}
