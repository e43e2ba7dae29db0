"""Pruning schedules: when a level's units are removed, and from which network.

A schedule is a small class with the hooks the level loop calls; the loop never names one.
Every schedule reaches the same per-level counts (`PrunePlan.counts`), so they compare at
equal densities.

- iterative (Frankle & Carbin 2019): each level prunes the ticket trained at the last level,
  among the survivors of its masks.
- oneshot: each level prunes the dense network trained at level 0 straight to its counts.
- gradual (Zhu & Gupta 2017): each level trains from the dense network and prunes while it
  trains, by magnitude, on a cubic schedule between `start` and `end` every `every` steps.

To add one: subclass `Schedule`, override the hooks that differ (and `check` and
`from_config` where it has options, `prune.<its name>.*`), add it to `SCHEDULES`.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lottery.options import ConfigError, duration, override
from lottery.pruning.prune import Counts, PrunePlan, interpolate, keep_counts
from lottery.state import LevelEntry


@dataclass(frozen=True)
class Schedule:
    """The hooks, with the one-shot behaviour as the default."""

    @classmethod
    def check(cls, cfg, chosen: bool) -> None:
        """Raise `ConfigError` (one line, naming the key) for this schedule's options that
        cannot run. Every schedule is asked, so a bad option fails even while another is
        chosen; `chosen`: it is the run's, so its options are checked against the rest of
        `cfg` too. Asked by `lottery.config.validate` (durations may still be epochs: check
        what is known) and again once every duration is in steps (`RunConfig.in_steps`)."""

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
    def check(cls, cfg, chosen):
        gradual = cfg.prune.gradual
        duration(gradual.start, "prune.gradual.start", 0)
        duration(gradual.every, "prune.gradual.every", 1)
        if gradual.end is not None:
            duration(gradual.end, "prune.gradual.end", 1)
        if not chosen:
            return
        if list(cfg.branches) != ["ticket"]:
            raise ConfigError(f"prune.schedule=gradual prunes while one network trains, so "
                              f"branches={list(cfg.branches)} cannot be built: use "
                              "branches=[ticket]", key="branches", fix="branches=[ticket]")
        wrong = [override(key, want) for key, have, want in (
            ("prune.score", cfg.prune.score, "magnitude"), ("prune.at", cfg.prune.at, "trained"))
            if have != want]
        if wrong:
            fix = " ".join(wrong)
            raise ConfigError("prune.schedule=gradual prunes by the magnitude of the weights as "
                              f"they train (Zhu & Gupta 2017): use {fix}",
                              key=wrong[-1].split("=")[0], fix=fix)
        known = (cfg.train.steps, cfg.rewind.step, gradual.start, gradual.every, gradual.end)
        if all(isinstance(v, int) for v in known if v is not None):  # else: once data loads
            cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg):
        """Pruning events at start, start + every, ..., end inside [rewind.step,
        train.steps); `end` defaults to half-way from the later of start and rewind.step."""
        gradual, steps, rewind = cfg.prune.gradual, cfg.train.steps, cfg.rewind.step
        start, end, every = gradual.start, gradual.end, gradual.every
        if end is None:
            end = max(start, rewind) + (steps - max(start, rewind)) // 2
        if not rewind <= start < end <= steps:
            raise ConfigError(f"prune.gradual: start={start} and end={end} (steps) must "
                              f"satisfy rewind.step={rewind} <= start < end <= "
                              f"train.steps={steps}")
        last = start + (end - start) // every * every  # the last pruning event
        if last >= steps:
            raise ConfigError(f"prune.gradual: the last pruning step, {last} (start={start}, "
                              f"end={end}, every={every}), is never trained: a level trains "
                              f"steps {rewind} to {steps - 1}, so it would end above its "
                              f"target density; use prune.gradual.end={steps - 1} or less (or "
                              "a longer train.steps)")
        return cls(start, last, every)

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
