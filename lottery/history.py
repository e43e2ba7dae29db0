"""A level's history: its evaluations, which members diverged, and its early stop.

`LevelHistory` turns each evaluation into record rows (a member whose loss or metrics stop
being finite is recorded as diverged once, then no more), gives the summary of every
member at the level's end (final values and the early stop: the first minimum of the
validation loss among the evaluations at the member's final density), and round-trips
through a checkpoint's metadata, so that a resumed level goes on exactly where it was.
"""

import math
from dataclasses import dataclass, field

import numpy as np

METRICS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def recorded(value) -> float | None:
    """A recorded number: None where training diverged (NaN or infinite)."""
    value = float(value)
    return value if math.isfinite(value) else None


def recorded_evaluation(values: dict) -> dict:
    """One member's evaluation as recorded: every value None once any is not finite
    (diverged: its accuracies are meaningless too, the argmax of NaN)."""
    values = {name: recorded(value) for name, value in values.items()}
    return dict.fromkeys(values) if None in values.values() else values


def early_stop_summary(steps: list[int], history: dict[str, np.ndarray],
                       densities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Final and early-stop (first minimum of validation loss) values, per member.

    `history[metric]` has shape (evaluations, members). With `densities` (the same shape:
    each member's density at each evaluation) the early stop is chosen only among the
    evaluations at the member's final density: under gradual pruning an earlier, denser
    network is not the one the row reports."""
    val_loss = np.nan_to_num(history["val_loss"], nan=np.inf)  # NaN: diverged
    if densities is not None:
        val_loss = np.where(densities == densities[-1], val_loss, np.inf)
    best = np.argmin(val_loss, axis=0)
    members = np.arange(best.size)
    summary = {"final_step": np.full(best.size, steps[-1]),
               "early_stop_step": np.asarray(steps)[best]}
    for metric, values in history.items():
        summary[f"final_{metric}"] = values[-1]
        summary[f"early_stop_{metric}"] = values[best, members]
    return summary


@dataclass
class LevelHistory:
    """The evaluations of one level of `members` ((branch, replicate) pairs)."""

    level: int
    members: list
    diverged: np.ndarray  # the step at which each member stopped being finite (-1: never)
    steps: list = field(default_factory=list)
    metrics: dict = field(default_factory=lambda: {metric: [] for metric in METRICS})
    densities: list = field(default_factory=list)  # each member's density per evaluation

    @classmethod
    def start(cls, level: int, members: list, lost: set, step: int) -> "LevelHistory":
        """A new level; the replicates in `lost` (their ticket diverged) count as diverged."""
        return cls(level, members, np.array([step if r in lost else -1 for _, r in members]))

    def evaluation(self, step: int, metrics: dict, density: np.ndarray,
                   train_loss: np.ndarray | None) -> list[dict]:
        """Add an evaluation (`metrics[metric]`: one value per member; `train_loss`: the mean
        training loss since the last one, or None) and return its record rows."""
        self.steps.append(step)
        self.densities.append(np.asarray(density))
        for metric in METRICS:
            self.metrics[metric].append(metrics[metric])
        rows = []
        for m, (branch, replicate) in enumerate(self.members):
            if self.diverged[m] >= 0:
                continue  # a diverged member is no longer recorded
            evaluation = {metric: metrics[metric][m] for metric in METRICS}
            if train_loss is not None:
                evaluation["train_loss"] = train_loss[m]
            values = recorded_evaluation(evaluation)
            if values["val_loss"] is None:
                self.diverged[m] = step
            rows.append({"kind": "eval", "level": self.level, "branch": branch,
                         "replicate": replicate, "density": float(density[m]), "step": step,
                         **values, "train_loss": values.get("train_loss")})
        return rows

    def summary(self) -> dict[str, np.ndarray]:
        """Each member's final and early-stop values (`early_stop_summary`)."""
        return early_stop_summary(self.steps, {m: np.stack(v) for m, v in self.metrics.items()},
                                  np.stack(self.densities))

    def lost(self, ticket: slice) -> set:
        """The ticket's replicates that diverged."""
        return {r for r, step in enumerate(self.diverged[ticket]) if step >= 0}

    def meta(self) -> dict:
        """The history as a checkpoint's JSON metadata."""
        return {"steps": self.steps, "diverged": self.diverged.tolist(),
                "history": {metric: np.stack(self.metrics[metric]).tolist()
                            for metric in METRICS},
                "densities": np.stack(self.densities).tolist()}

    @classmethod
    def from_meta(cls, level: int, members: list, meta: dict, density) -> "LevelHistory":
        """The history saved by `meta` in a checkpoint (one from before densities were
        saved: every evaluation at `density`, the level's fixed density)."""
        densities = meta.get("densities") or [np.asarray(density).tolist()] * len(meta["steps"])
        return cls(level, members, np.asarray(meta["diverged"]), list(meta["steps"]),
                   {metric: list(np.asarray(meta["history"][metric], np.float32))
                    for metric in METRICS},
                   list(np.asarray(densities)))
