"""How a level chooses its ticket: score the network, keep the planned counts.

`Method` names the score (`lottery.pruning.scores.SCORES`), the training examples it sees,
its rounds and the weights it scores (`at`: the trained network or the rewind point).
`Method.select` is the pure, traceable choice for one replicate: every round keeps the
highest-scoring survivors (inverted: the lowest), the density falling geometrically between
rounds (SynFlow's iterative procedure, Tanaka et al. 2020, `prune_loop` in its reference
code), ties broken at random from the replicate's key.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lottery.options import ConfigError, integer
from lottery.pruning.prune import PrunePlan, interpolate, keep_counts, survivors
from lottery.pruning.scores import DEFAULT_ROUNDS
from lottery.seeds import name_id

MAX_ROUNDS = 10_000  # SynFlow's paper uses 100


@dataclass(frozen=True)
class Method:
    """`score` computed on `score_batch` training examples of the network `at` ("trained":
    the level's source network; "init": the rewind point), in `rounds` rounds."""

    score: str = "magnitude"
    score_batch: int = 100
    rounds: int = 1
    at: str = "trained"

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse a `prune.score_batch` or `prune.score_rounds` that cannot run (`cfg`: a
        `RunConfig`; the score's name is checked against `SCORES` by the config)."""
        integer(cfg.prune.score_batch, "prune.score_batch", 1)
        rounds = cfg.prune.score_rounds
        if rounds is not None and integer(rounds, "prune.score_rounds", 1) > MAX_ROUNDS:
            raise ConfigError(f"prune.score_rounds={rounds} must be at most {MAX_ROUNDS}: "
                              "every round scores the whole network")

    @classmethod
    def from_config(cls, cfg) -> "Method":
        """The method of `cfg.prune`; null rounds: the score's own (`DEFAULT_ROUNDS`)."""
        prune = cfg.prune
        rounds = DEFAULT_ROUNDS.get(prune.score, 1) if prune.score_rounds is None \
            else prune.score_rounds
        return cls(prune.score, prune.score_batch, rounds, prune.at)

    @property
    def precision(self):
        """The context scoring runs in: float64 for SynFlow, whose scores are products of
        |weights| through the whole depth (ResNet-56 at init overflows float32: 97% of its
        scores inf, 3% NaN), as its reference code computes them; float32 otherwise."""
        return jax.enable_x64(True) if self.score == "synflow" else nullcontext()

    def scored(self, rewind, source):
        """The network whose scores choose the ticket."""
        return rewind if self.at == "init" else source

    def select(self, model, units, plan: PrunePlan, key, scored, base_masks, counts, data,
               invert: bool = False):
        """The kept selection among the survivors of `base_masks` (`units.select` layout),
        and whether every surviving unit's score was finite. `scored` is the `Network`;
        `data` the training set `(x, y)`, from which `score_batch` examples are drawn."""
        x_all, y_all = data
        index = jax.random.choice(key, len(x_all), (min(self.score_batch, len(x_all)),),
                                  replace=False)
        batch = x_all[index], y_all[index]
        base = units.select(base_masks)
        ties = jax.random.fold_in(key, name_id("ties"))

        def one_round(selection, target, ties):
            masks = units.expand(base_masks, selection)
            scores = units.scores(self.score, model, *scored, masks, batch, key)
            finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(scores[n]) | (selection[n] == 0))
                                        for n in scores]))
            ranked = jax.tree.map(jnp.negative, scores) if invert else scores
            return keep_counts(plan, ranked, selection, target, ties), finite

        with self.precision:
            if self.rounds == 1:
                return one_round(base, counts, ties)
            first = survivors(plan, base)  # geometric steps down to the counts (SynFlow)

            def body(j, carry):
                selection, finite = carry
                target = interpolate(first, counts, 1 - (j + 1) / self.rounds, "geometric")
                selection, now = one_round(selection, target, jax.random.fold_in(ties, j))
                return selection, finite & now

            return jax.lax.fori_loop(0, self.rounds, body, (base, jnp.array(True)))
