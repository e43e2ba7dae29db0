"""The compiled programs around training that start a level, each compiled once per run.

`begin` chooses the level's ticket (`lottery.pruning.select.Method`), starts every branch
from it (`lottery.branches`) and returns the padded stack; `measure` counts each member's
surviving weights and units; `ticket_of` takes the ticket's replicates out of a stacked
tree; `initial` makes the ticket's initial networks and full masks.
"""

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lottery.branches import LevelStart, branch_of
from lottery.pruning.masks import full_masks, remaining
from lottery.seeds import member_keys
from lottery.state import Network


class Begun(NamedTuple):
    """A level's start: the ticket's masks (per ticket replicate), the padded stack's
    networks, masks and data keys (raw key data), and per ticket replicate whether every
    score of a surviving unit was finite."""

    ticket_masks: Any
    network: Network
    masks: Any
    keys: Any
    finite: Any


class LevelInputs(NamedTuple):
    """What `begin` starts a level from (stacked over the ticket's replicates)."""

    counts: Any  # `lottery.pruning.prune.Counts`: the units the ticket keeps
    scored: Network  # the network whose scores choose the ticket
    base_masks: Any  # the masks whose survivors it is chosen among
    start: Network  # the network every branch starts from


class LevelPrograms(NamedTuple):
    begin: Callable  # (seed, level, *LevelInputs) -> Begun
    measure: Callable  # stacked masks -> ({layer: weights}, {unit name: units}) per member
    ticket_of: Callable  # stacked tree -> the ticket replicates' tree
    initial: Callable  # seed -> (Network, full masks) of the ticket's replicates


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def level_programs(setup, from_trained: bool | None = None) -> LevelPrograms:
    """The programs for a run built as `setup` (`lottery.setup.Setup`).

    `begin` scores `scored` (the ticket replicates' stacked `Network`), keeps `counts` of
    the survivors of `base_masks` and starts every branch from `start` (a `Network`).
    `from_trained` (default: the rewind mode's): random_prune draws among the survivors the
    ticket was chosen from, so no weight pruned at an earlier level comes back (at 0)."""
    model, units, plan, trainer = setup.model, setup.units, setup.plan, setup.trainer
    layout, method, R = setup.layout, setup.method, setup.layout.replicates
    from_trained = setup.rewind.from_trained if from_trained is None else from_trained

    def select(invert: bool):
        """`method.select` over the ticket's replicates (counts and data shared)."""
        return jax.vmap(partial(method.select, model, units, plan, invert=invert),
                        in_axes=(0, 0, 0, None, None))

    def begin(seed, level, counts, scored, base_masks, start):
        score_keys = member_keys(seed, R, level, "ticket", "score")
        data = trainer.train_data
        selection, finite = select(False)(score_keys, scored, base_masks, counts, data)
        inverted = None
        if setup.uses_inverted:  # the method run again with its scores inverted
            inverted, _ = select(True)(score_keys, scored, base_masks, counts, data)
        ticket_masks = jax.vmap(units.expand)(base_masks, selection)
        base = jax.vmap(units.select)(base_masks)
        candidates = base if from_trained else jax.tree.map(jnp.ones_like, base)
        inputs = LevelStart(start, ticket_masks, selection, candidates, inverted)
        begun = [jax.vmap(partial(branch_of(b).start, model, units))(
            inputs, member_keys(seed, R, level, b, "branch")) for b in layout.branches]
        keys = [member_keys(seed, R, level, b, "data") for b in layout.branches]
        keys = jax.random.key_data(jnp.concatenate(keys))  # raw uint32: one stable sharding
        network, masks = trainer.pad((_stack([n for n, _ in begun]), _stack([m for _, m in begun])))
        return Begun(ticket_masks, network, masks, trainer.pad(keys), finite)

    def measure(masks):
        alive = jax.vmap(partial(remaining, layers=setup.measured))(masks)
        kept = jax.vmap(lambda m: {n: jnp.sum(s) for n, s in units.select(m).items()})(masks)
        return alive, kept

    def initial(seed):
        network = Network(*jax.vmap(model.init)(member_keys(seed, R, 0, "ticket", "init")))
        return network, jax.vmap(full_masks)(network.params)

    def ticket_rows(tree):
        return jax.tree.map(lambda x: x[layout.ticket], tree)

    replicated, stacked = trainer.replicated, trainer.stacked
    return LevelPrograms(
        jax.jit(begin, out_shardings=Begun(replicated, stacked, stacked, stacked, replicated)),
        jax.jit(measure, out_shardings=replicated),
        jax.jit(ticket_rows, out_shardings=replicated),
        jax.jit(initial, out_shardings=replicated))
