"""Rewinding: where a level's training starts after pruning (`rewind.mode`).

- weights (Frankle & Carbin 2019; Frankle et al. 2020 for k > 0): the surviving weights
  go back to their values at step k of the dense run, and the level trains steps k..T.
- lr (Renda et al. 2020): the trained weights are kept and the learning-rate schedule is
  replayed from step k.
- finetune (Renda et al. 2020's baseline): the trained weights are kept and trained steps
  k..T at a constant rate (`lr`, or the schedule's last rate).
Level 0 always starts from the initial network. To add one: a class with these methods
(`check` and `from_config` for its options in `rewind.*`), and a `REWINDS` entry.
"""

from dataclasses import dataclass

import numpy as np

from lottery.options import positive
from lottery.state import LevelEntry


@dataclass(frozen=True)
class WeightRewinding:
    step: int

    @classmethod
    def check(cls, cfg, chosen: bool) -> None:
        """Raise `ConfigError` for this mode's options in `cfg.rewind` that cannot run. Every
        mode is asked (`chosen`: it is the run's), so a bad option fails even while another
        mode is chosen. `rewind.step` itself is checked by the config."""

    @classmethod
    def from_config(cls, cfg):
        """The mode with its options from `cfg` (a `RunConfig` in steps)."""
        return cls(cfg.rewind.step)

    #: random_prune draws among the units the ticket was chosen from (no weight pruned at
    #: an earlier level comes back at 0) when a level starts from trained weights
    from_trained = False

    def start(self, level: int, entry: LevelEntry, source):
        """The network the level's branches start from (`source`: the schedule's)."""
        return entry.rewind

    def learning_rate(self, level: int, optimizer, steps: int) -> np.float32:
        """A constant learning rate for the level where positive; 0: the schedule's."""
        return np.float32(0)

    def describe(self) -> str:
        return f"weights rewound to step {self.step}"


@dataclass(frozen=True)
class LearningRateRewinding(WeightRewinding):
    from_trained = True

    def start(self, level, entry, source):
        return source if level else entry.rewind

    def describe(self):
        return f"trained weights, learning rate replayed from step {self.step}"


@dataclass(frozen=True)
class FineTuning(LearningRateRewinding):
    lr: float | None = None

    @classmethod
    def check(cls, cfg, chosen):
        if cfg.rewind.finetune_lr is not None:
            positive(cfg.rewind.finetune_lr, "rewind.finetune_lr",
                     ", or null for the schedule's last learning rate")

    @classmethod
    def from_config(cls, cfg):
        lr = cfg.rewind.finetune_lr
        return cls(cfg.rewind.step, None if lr is None else float(lr))

    def learning_rate(self, level, optimizer, steps):
        return np.float32(self.lr or optimizer.schedule(steps - 1)) if level else np.float32(0)

    def describe(self):
        return "trained weights fine-tuned"


REWINDS = {"weights": WeightRewinding, "lr": LearningRateRewinding, "finetune": FineTuning}
