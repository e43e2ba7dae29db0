"""How a level starts and ends where the audit found the engine wrong: gradual pruning's last
event and early stop, the instability pair's start at every level, and the controls when a
level starts from trained weights. Expectations come from plain loops and hand counts."""

import itertools
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import LAYERS
from lottery.config import (ConfigError, GradualConfig, PruneConfig, RewindConfig, RunConfig,
                            TrainConfig)
from lottery.history import early_stop_summary
from lottery.pruning.masks import full_masks
from lottery.pruning.schedules import Gradual, gradual_pruning
from lottery.state import Network

R = 2


def member(tree, m):
    return jax.tree.map(lambda x: np.asarray(x[m]), tree)


def kernel_counts(masks) -> dict:
    return {layer: int(np.sum(masks[layer]["kernel"])) for layer in LAYERS}


# ---------------------------------------------------------------- gradual pruning


def gradual_schedule(gradual: dict, steps: int, rewind_step: int) -> Gradual:
    """The gradual schedule of a level of `steps` steps rewound to `rewind_step`."""
    return Gradual.from_config(RunConfig(
        train=TrainConfig(steps=steps), rewind=RewindConfig(step=rewind_step),
        prune=PruneConfig(schedule="gradual", gradual=GradualConfig(**gradual))))


@pytest.mark.parametrize("steps, gradual", [
    (200, {"start": 0, "end": 200, "every": 50}),  # the audit's run: ended at 26.17%, not 25%
    (40, {"start": 0, "end": 40, "every": 10}),
    (40, {"start": 10, "end": 40, "every": 5}),
])
def test_a_last_pruning_event_that_is_never_trained_is_refused(steps, gradual):
    with pytest.raises(ConfigError, match=r"the last pruning step, \d+ .* is never trained"):
        gradual_schedule(gradual, steps, 0)


@pytest.fixture(scope="module")
def gradual_parts():
    """A small LeNet (8x8 inputs, 30 and 10 hidden units: 2,320 weights): the counts a
    schedule reaches do not depend on the layers' size, and each of the test's 108 pruning
    events sorts every layer (LeNet-300-100's 266,200 weights: ~20 s of the test's time)."""
    cfg = helpers.run_config("prune.schedule=gradual", "branches=[ticket]", "prune.rate=0.75",
                             "prune.levels=1", "prune.gradual.end=30", "prune.gradual.every=10",
                             "dataset.shape=[8,8,1]", "model.hidden=[30,10]")
    return helpers.setup(cfg)


def test_every_accepted_gradual_schedule_ends_at_the_one_shot_density(gradual_parts):
    """Each accepted (rewind step, start, end, every) for a 40-step level: the engine's
    prune_step, called before every step the level trains (k .. 39), ends at exactly the
    planned counts; refused ones are those whose last event would come after step 39."""
    parts = gradual_parts
    params = parts.model.init(jax.random.key(0))[0]
    target = {layer: int(n) for layer, n in parts.counts[1].layers.items()}
    controls = {"lr": np.float32(0), "counts": parts.counts[1]}
    accepted = refused = 0
    compiled = {}  # one jitted prune_step per distinct schedule (38 accepted cases, 13 distinct)
    for k, start, end, every in itertools.product((0, 10), (0, 10, 25), (30, 39, 40),
                                                  (7, 10, 15)):
        try:
            schedule = gradual_schedule({"start": start, "end": end, "every": every}, 40, k)
        except ConfigError:
            refused += 1
            assert start < k or start + (end - start) // every * every >= 40
            continue
        accepted += 1
        if schedule not in compiled:
            compiled[schedule] = jax.jit(gradual_pruning(parts.units, parts.plan,
                                                         parts.counts[0], **asdict(schedule)))
        step_fn = compiled[schedule]
        masks = full_masks(params)
        for step in range(k, 40):
            masks = step_fn(params, masks, np.int32(step), controls, jax.random.key(step))
        assert kernel_counts(masks) == target, (k, start, end, every)
    assert accepted >= 20 and refused >= 10


def test_early_stop_chooses_among_evaluations_at_the_final_density():
    """Hand-made history of one member: the lowest validation loss (0.30) comes from an
    evaluation at density 0.5, before the level reached its final 0.25; among the
    evaluations at 0.25 the lowest is 0.35, at step 30."""
    steps = [0, 10, 20, 30, 40]
    history = {"val_loss": np.array([[0.50], [0.30], [0.40], [0.35], [0.45]]),
               "test_accuracy": np.array([[0.1], [0.9], [0.8], [0.85], [0.7]])}
    densities = np.array([[1.0], [0.5], [0.25], [0.25], [0.25]])
    summary = early_stop_summary(steps, history, densities)
    assert summary["early_stop_step"].tolist() == [30]
    assert summary["early_stop_test_accuracy"].tolist() == [0.85]
    assert early_stop_summary(steps, history)["early_stop_step"].tolist() == [10]


# ---------------------------------------------------------------- instability


@pytest.fixture(scope="module")
def pair_parts():
    cfg = helpers.run_config("branches=[ticket,instability]", "rewind.step=20")
    return cfg, helpers.setup(cfg)


def test_the_instability_pair_starts_bit_identical_at_a_later_level(pair_parts):
    """Level 2: both copies start as the ticket's retraining starts (same weights, masks,
    fresh optimizer); trained with each other's data order they stay bit-identical, with
    their own orders they part: the data order is their only difference."""
    cfg, parts = pair_parts
    init, full = parts.programs.initial(np.uint32(0))
    trained = Network(*jax.jit(jax.vmap(parts.model.init))(jax.random.split(jax.random.key(9), R)))
    begun = parts.programs.begin(np.uint32(0), 2, parts.counts[2], trained, full, init)
    params, masks, keys = begun.network.params, begun.masks, begun.keys
    first, second, ticket = (parts.layout.rows(b).start
                             for b in ("instability", "instability_b", "ticket"))
    for r in range(R):
        for tree in (params, masks):
            for a, b, t in zip(jax.tree.leaves(member(tree, first + r)),
                               jax.tree.leaves(member(tree, second + r)),
                               jax.tree.leaves(member(tree, ticket + r))):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(a, t)
        assert not np.array_equal(np.asarray(keys[first + r]), np.asarray(keys[second + r]))

    def train(keys):
        state = parts.trainer.start(*jax.tree.map(jnp.copy, (begun.network, masks)))
        return helpers.host(parts.trainer.train_chunk(state, keys, cfg.rewind.step)[0].params)

    swapped = np.asarray(keys).copy()
    swapped[second:second + R] = swapped[first:first + R]
    same_order, own_orders = train(jnp.asarray(swapped)), train(keys)
    for leaf in jax.tree.leaves(same_order):
        np.testing.assert_array_equal(leaf[first:first + R], leaf[second:second + R])
    assert any(not np.array_equal(leaf[first:first + R], leaf[second:second + R])
               for leaf in jax.tree.leaves(own_orders))


def test_at_level_0_the_pair_leaves_the_dense_run_with_a_fresh_optimizer(pair_parts):
    """At step k of level 0 both copies take the ticket's weights, as every later level's
    pair starts from the rewind point: Adam's moments and count start again at 0."""
    cfg, parts = pair_parts
    (pair,) = parts.hooks
    init, full = parts.programs.initial(np.uint32(0))
    begun = parts.programs.begin(np.uint32(0), 0, parts.counts[0], init, full, init)
    state, _ = parts.trainer.train_chunk(parts.trainer.start(begun.network, begun.masks),
                                         begun.keys, 0)
    before = helpers.host(state)
    after = helpers.host(pair.at_rewind_point(state))
    ticket = parts.layout.ticket.start
    for b in ("instability", "instability_b"):
        for r in range(R):
            m = parts.layout.rows(b).start + r
            for got, source in zip(jax.tree.leaves(member(after.params, m)),
                                   jax.tree.leaves(member(before.params, ticket + r))):
                np.testing.assert_array_equal(got, source)
            fresh = parts.trainer.optimizer.init(member(before.params, ticket + r))
            for got, new in zip(jax.tree.leaves(member(after.opt_state, m)),
                                jax.tree.leaves(fresh)):
                np.testing.assert_array_equal(got, new)  # moments 0, count 0
    # the ticket itself keeps its moments
    assert any(np.any(leaf) for leaf in jax.tree.leaves(member(before.opt_state, ticket)))
    for x, y in zip(jax.tree.leaves(member(after.opt_state, ticket)),
                    jax.tree.leaves(member(before.opt_state, ticket))):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- controls from trained weights


@pytest.mark.parametrize("mode", ["weights", "lr"])
def test_random_prune_from_trained_weights_draws_among_the_survivors(mode):
    """At level 2 of iterative pruning the ticket is chosen among level 1's survivors. With
    weight rewinding random_prune draws from the whole layer (Frankle & Carbin); from the
    trained weights (lr, finetune) it draws among those survivors, so no weight pruned at
    level 1 starts again at exactly 0."""
    cfg = helpers.run_config(f"rewind.mode={mode}")
    parts = helpers.setup(cfg)
    assert parts.rewind.from_trained == (mode != "weights")
    begin = parts.programs.begin
    init, full = parts.programs.initial(np.uint32(0))
    level1 = begin(np.uint32(0), 1, parts.counts[1], init, full, init).ticket_masks
    masks = begin(np.uint32(0), 2, parts.counts[2], init, level1, init).masks
    random = parts.layout.rows("random_prune").start
    for r in range(R):
        base, drawn = member(level1, r), member(masks, random + r)
        outside = sum(int(np.sum((drawn[layer]["kernel"] == 1) & (base[layer]["kernel"] == 0)))
                      for layer in LAYERS)
        assert kernel_counts(drawn) == {layer: int(parts.counts[2].layers[layer])
                                        for layer in LAYERS}
        if mode == "weights":
            assert outside > 0
        else:
            assert outside == 0


def test_shuffle_is_refused_where_it_would_revive_pruned_trained_weights():
    with pytest.raises(ConfigError, match="would start weights pruned at earlier levels"):
        helpers.run_config("rewind.mode=lr", "branches=[ticket,shuffle]")
    helpers.run_config("rewind.mode=lr", "branches=[ticket,shuffle]", "prune.schedule=oneshot")
    helpers.run_config("rewind.mode=weights", "branches=[ticket,shuffle]")
