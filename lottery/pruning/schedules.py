"""Pruning schedules: when a level's units are removed, and from which network.

A schedule is a small class with the hooks the level loop calls; the loop never names one.
Every schedule reaches the same per-level counts (`PrunePlan.counts`), so they compare at
equal densities.

- iterative (Frankle & Carbin 2019): each level prunes the ticket trained at the last level,
  among the survivors of its masks.
- oneshot: each level prunes the dense network trained at level 0 straight to its counts.
- gradual (Zhu & Gupta 2017): each level trains from the dense network and prunes while it
  trains, by magnitude, on a cubic schedule between `start` and `end` every `every` steps.
- static, set, rigl: each level trains once from a random mask at its density (ERK or
  uniform); SET and RigL drop and grow weights as it trains (`lottery.pruning.dynamic`).
- `prune.ste` (with oneshot or gradual): each level trains its dense weights straight through
  masks chosen again at every step (`lottery.pruning.ste`); SR-STE with `sr`.

To add one: subclass `Schedule`, override the hooks that differ (and `check` and
`from_config` where it has options, `prune.<its name>.*`), add it to `SCHEDULES`.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lottery.options import ConfigError, duration, override
from lottery.pruning.prune import Counts, PrunePlan, interpolate, keep_counts
from lottery.pruning.select import Method
from lottery.pruning.dynamic import DynamicSparse, UpdateRecord
from lottery.pruning.step_hooks import PruneBefore, StepHooks
from lottery.pruning.ste import StraightThrough
from lottery.state import LevelEntry


@dataclass(frozen=True)
class Schedule:
    """The hooks, with the one-shot behaviour as the default."""

    own_words = False  # described by `words` alone (its masks are not chosen by a score)

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

    def step_hooks(self, units, plan: PrunePlan, counts: list[Counts],
                   optimizer) -> StepHooks:
        """What the level does inside the training step (`lottery.pruning.step_hooks`)."""
        return StepHooks()

    @classmethod
    def scope(cls, prune) -> str:
        """How the level's counts are allocated over the layers (`prune.scope`'s values)."""
        return prune.scope

    @classmethod
    def words(cls, prune) -> str:
        """The method in a few words, for the run's first log line."""
        return (f"{prune.schedule} {prune.scope} {prune.score} pruning"
                + ("" if prune.structure == "weights" else f" of {structure_words(prune)}")
                + (" at init" if prune.at == "init" else ""))

    def method(self, method: Method) -> Method:
        """How the level's starting masks are chosen (`lottery.pruning.select.Method`)."""
        return method

    def level_hooks(self, setup):
        """Hooks into the level loop (`lottery.state.LevelHooks`: rows for the record), or
        None."""
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
        wrong = needed(("prune.score", cfg.prune.score, "magnitude"),
                       ("prune.at", cfg.prune.at, "trained"))
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

    def step_hooks(self, units, plan, counts, optimizer):
        return PruneBefore(gradual_pruning(units, plan, counts[0], self.start, self.end,
                                           self.every))


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


def needed(*settings) -> list[str]:
    """The overrides `key=want` of the (key, have, want) settings whose value is not wanted."""
    return [override(key, want) for key, have, want in settings if have != want]


def structure_words(prune) -> str:
    """What `prune.structure` removes, in words ("2:4 weights" for N:M)."""
    return "{}:{} weights".format(*prune.nm) if prune.structure == "nm" else prune.structure


def trains_once(cfg, what: str) -> None:
    """Refuse what a schedule whose level trains once, from the rewind point, cannot build:
    another branch than ticket, and learning-rate rewinding or fine-tuning."""
    if list(cfg.branches) != ["ticket"]:
        raise ConfigError(f"{what} trains each level once, so branches={list(cfg.branches)} "
                          "cannot be built: use branches=[ticket]", key="branches",
                          fix="branches=[ticket]")
    if cfg.rewind.mode != "weights":
        raise ConfigError(f"{what} trains each level from the rewind point's weights: use "
                          "rewind.mode=weights", key="rewind.mode", fix="rewind.mode=weights")


@dataclass(frozen=True)
class Static(Schedule):
    """Static sparse training: each level trains once from the rewind point under a random
    mask at the level's density, split over the layers by ERK or uniformly
    (`prune.dst.init`); the baseline of the dynamic methods (Evci et al. 2020)."""

    own_words = True

    @classmethod
    def check(cls, cfg, chosen):
        if not chosen:
            return
        name = f"prune.schedule={cfg.prune.schedule}"
        trains_once(cfg, name)
        prune = cfg.prune
        if prune.structure != "weights" or prune.ste:
            fix = "prune.structure=weights" if prune.structure != "weights" else "prune.ste=false"
            raise ConfigError(f"{name} drops and grows single weights: use {fix}",
                              key=fix.split("=")[0], fix=fix)
        unused = needed(("prune.score", prune.score, "magnitude"),
                        ("prune.at", prune.at, "trained"),
                        ("prune.scope", prune.scope, "layerwise"))
        if unused:
            raise ConfigError(f"{name} starts each level from a random mask split over the "
                              "layers by prune.dst.init, so prune.score, prune.at and "
                              f"prune.scope are not used: leave them at their defaults "
                              f"({' '.join(unused)})", key=unused[0].split("=")[0],
                              fix=" ".join(unused))

    @classmethod
    def scope(cls, prune):
        return "erk" if prune.dst.init == "erk" else "layerwise"

    @classmethod
    def words(cls, prune):
        return f"{prune.schedule} sparse training ({prune.dst.init} densities)"

    def method(self, method):
        return Method("random", method.score_batch, 1, "init")


@dataclass(frozen=True)
class SET(Static):
    """SET (Mocanu et al. 2018): static sparse training whose masks drop their smallest
    weights and grow as many at random every `every` steps until `stop`
    (`lottery.pruning.dynamic`)."""

    every: int = 100
    fraction: float = 0.3
    stop: int = 0
    grow = "random"

    @classmethod
    def check(cls, cfg, chosen):
        super().check(cfg, chosen)
        known = (cfg.train.steps, cfg.rewind.step, cfg.prune.dst.every, cfg.prune.dst.stop)
        if chosen and all(isinstance(v, int) for v in known if v is not None):
            cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg):
        """`stop` defaults to 75% of train.steps (Evci et al. 2020)."""
        dst, steps, rewind = cfg.prune.dst, cfg.train.steps, cfg.rewind.step
        stop = int(0.75 * steps) if dst.stop is None else dst.stop
        if not rewind < stop <= steps:
            fix = f"prune.dst.stop={steps}"
            raise ConfigError(f"prune.dst.stop={stop} (steps) must satisfy rewind.step={rewind} "
                              f"< stop <= train.steps={steps}: use e.g. {fix}",
                              key="prune.dst.stop", fix=fix)
        first = -(-(rewind + 1) // dst.every) * dst.every  # the level's first update
        if first >= stop:
            fix = f"prune.dst.every={max(1, (stop - rewind - 1) // 4)}"
            raise ConfigError(f"prune.dst.every={dst.every} makes no mask update between "
                              f"rewind.step={rewind} and prune.dst.stop={stop}: use a smaller "
                              f"every, e.g. {fix}, or a later stop", key="prune.dst.every",
                              fix=fix)
        return cls(dst.every, dst.fraction, stop)

    def step_hooks(self, units, plan, counts, optimizer):
        return DynamicSparse(units, optimizer, self.grow, self.every, self.fraction, self.stop)

    def level_hooks(self, setup):
        return UpdateRecord(setup.layout, self.every)


@dataclass(frozen=True)
class RigL(SET):
    """RigL (Evci et al. 2020): SET whose grown weights are those of largest dense gradient."""

    grow = "gradient"


@dataclass(frozen=True)
class StraightThroughSchedule(Schedule):
    """`prune.ste`: a level trains once from the rewind point, dense weights under masks
    chosen again at every step by magnitude (`lottery.pruning.ste`), at the level's counts
    from its first step (`base` oneshot) or on gradual pruning's cubic schedule (`base`
    gradual); `decay`: SR-STE's λ_W (0 for plain straight-through)."""

    base: Schedule
    decay: float = 0.0
    own_words = True

    @classmethod
    def check(cls, cfg, chosen):
        if not chosen:
            return
        prune, name = cfg.prune, f"prune.ste={str(cfg.prune.ste).lower()}"
        if prune.schedule not in ("oneshot", "gradual"):
            raise ConfigError(f"{name} prunes each level as it trains: use "
                              "prune.schedule=oneshot (at the level's density from its first "
                              "step) or gradual (on the cubic schedule)", key="prune.schedule",
                              fix="prune.schedule=oneshot")
        trains_once(cfg, name)
        wrong = needed(("prune.score", prune.score, "magnitude"),
                       ("prune.at", prune.at, "trained"))
        if wrong:
            raise ConfigError(f"{name} chooses masks by the magnitude of the dense weights as "
                              f"they train: use {' '.join(wrong)}", key=wrong[0].split("=")[0],
                              fix=" ".join(wrong))

    @classmethod
    def from_config(cls, cfg):
        base = SCHEDULES[cfg.prune.schedule].from_config(cfg)
        return cls(base, cfg.prune.sr_decay if cfg.prune.ste == "sr" else 0.0)

    def start_counts(self, counts, level):
        return counts[0]  # dense weights; the first step chooses the masks

    def controls(self, counts, level):
        return {"counts": counts[level]}

    def step_hooks(self, units, plan, counts, optimizer):
        full, base = counts[0], self.base

        def count_at(step, controls):
            if not isinstance(base, Gradual):
                return controls["counts"]
            last = base.start + jnp.clip((step - base.start) // base.every * base.every, 0,
                                         base.end - base.start)
            remaining = 1 - jnp.clip((last - base.start) / max(base.end - base.start, 1), 0, 1)
            remaining = jnp.where(step < base.start, 1.0, remaining)
            return interpolate(full, controls["counts"], remaining)

        return StraightThrough(units, plan, count_at, self.decay)


SCHEDULES = {"iterative": Iterative, "oneshot": OneShot, "gradual": Gradual, "static": Static,
             "set": SET, "rigl": RigL}


def in_words(prune) -> str:
    """The run's pruning method in a few words (`prune`: the config's `prune` section)."""
    words = SCHEDULES[prune.schedule].words(prune)
    return ({True: "straight-through ", "sr": "SR-STE "}[prune.ste] + words) if prune.ste \
        else words


def schedule_of(cfg) -> Schedule:
    """The run's schedule (`cfg`: a `RunConfig` in steps): `prune.schedule`, trained
    straight-through where `prune.ste` says so."""
    if cfg.prune.ste:
        return StraightThroughSchedule.from_config(cfg)
    return SCHEDULES[cfg.prune.schedule].from_config(cfg)
