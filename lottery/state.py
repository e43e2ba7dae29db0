"""The named pytrees the engine passes around, and the layout of the stack of members.

- `Network`: one network's `(params, model_state)` (model state: batch-norm statistics).
- `MemberState`: what training carries for every member of the stack.
- `LevelEntry`: what a level starts from (the rewind point, the ticket's masks, the ticket
  trained at the last level, the dense network trained at level 0), kept in checkpoints.
- `Layout`: which rows of the stack are which branch and replicate.
- `LevelHooks`: what a branch or schedule adds to the level loop (rows for the record).

All but `Layout` are pytrees (NamedTuples), so they go through `jit`, `vmap` and
checkpoints as they are; their leaves are stacked on axis 0 (members or replicates).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple


class Network(NamedTuple):
    params: Any
    model_state: Any


class MemberState(NamedTuple):
    """A member's training state: the optimizer sees only `params`; `model_state` is carried
    through training and used at evaluation; `masks` keep pruned weights at zero; `extra` is
    the pruning schedule's own state (`lottery.pruning.step_hooks`; none for most)."""

    params: Any
    model_state: Any
    opt_state: Any
    masks: Any
    extra: Any = ()

    @property
    def network(self) -> Network:
        return Network(self.params, self.model_state)


class LevelEntry(NamedTuple):
    """What the next level starts from, stacked over the ticket's replicates."""

    rewind: Network  # the weights at the rewind point (step k of the dense run)
    masks: Any  # the ticket's masks after the last level
    trained: Network  # the ticket trained at the last level
    dense: Network  # the dense network trained at level 0

    @classmethod
    def initial(cls, init: Network, full_masks) -> "LevelEntry":
        """Before level 0: everything is the initial network, nothing is pruned."""
        return cls(init, full_masks, init, init)


@dataclass(frozen=True)
class Layout:
    """The stack's rows: for each branch as trained (`instability` brings its twin), its
    `replicates` rows, in order; the stack may be padded after the last row."""

    branches: tuple[str, ...]
    replicates: int

    @property
    def size(self) -> int:
        return len(self.branches) * self.replicates

    @property
    def members(self) -> list[tuple[str, int]]:
        """(branch, replicate) of every row, in order."""
        return [(b, r) for b in self.branches for r in range(self.replicates)]

    def rows(self, branch: str) -> slice:
        """The rows of `branch`'s replicates."""
        start = self.branches.index(branch) * self.replicates
        return slice(start, start + self.replicates)

    @property
    def ticket(self) -> slice:
        return self.rows("ticket")


class LevelAddition(NamedTuple):
    """What a branch or schedule adds to a level's record: rows, values for its members'
    summary rows (by (branch, replicate)), and words for the level's log line."""

    rows: list
    summary: dict
    log: str


class LevelHooks:
    """A branch's or schedule's hooks into the level loop; the default does nothing."""

    def at_rewind_point(self, state: MemberState) -> MemberState:
        """Called at step k of level 0, after the rewind point is taken."""
        return state

    def after_level(self, state: MemberState, level: int, density) -> LevelAddition:
        """Called when the level has trained (`density`: each member's)."""
        return LevelAddition([], {}, "")
