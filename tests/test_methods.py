"""Pruning methods end to end (issue 4): pruning at initialisation with its sanity checks
(shuffle, inverted, reinit), ERK allocation, one-shot and gradual schedules, and the
retraining modes (weight rewinding, learning-rate rewinding, fine-tuning).

Each run is the TINY synthetic LeNet-300-100 config with one method changed; the level
level loop is driven here, so the tests see what each level started from. Runs that compile
programs of their own (every one but ERK's, whose programs are TINY's) take 8x8 inputs
(`SMALL`): what they check does not depend on the size, and LeNet's 266,200 weights on 28x28
inputs would cost seconds of training, scoring and saving per run."""

import functools
from types import SimpleNamespace

import helpers
import jax
import numpy as np
import pytest
from helpers import LAYERS, WEIGHTS, host, load_npz
from test_erk import rigl_reference

from lottery import imp
from lottery.config import ConfigError
from lottery.pruning.prune import Counts, PrunePlan, interpolate, keep_top
from lottery.pruning.scores import SCORES
from lottery.pruning.schedules import gradual_pruning
from lottery.pruning.units import Weights
from lottery.record import load
from lottery.seeds import member_keys
from lottery.setup import build

R = 2
SHAPES = {"fc1": (784, 300), "fc2": (300, 100), "out": (100, 10)}
SMALL = ("dataset.shape=[8,8,1]",)  # LeNet-300-100 on 8x8 inputs
SMALL_SHAPES = {"fc1": (64, 300), "fc2": (300, 100), "out": (100, 10)}
SMALL_WEIGHTS = {"fc1": 64 * 300, "fc2": 300 * 100, "out": 100 * 10}


def traced_run(tmp_path_factory, name: str, *overrides: str) -> SimpleNamespace:
    """A TINY run with `overrides`, driven level by level (`helpers.driven_run`)."""
    return helpers.driven_run(helpers.run_config(*overrides),
                              tmp_path_factory.mktemp(name) / "run")


def member(tree, m):
    return jax.tree.map(lambda x: x[m], tree)


def kernel_counts(masks) -> dict:
    return {layer: int(np.sum(masks[layer]["kernel"])) for layer in LAYERS}


# ---------------------------------------------------------------- pruning at initialisation


PAI_BRANCHES = ("ticket", "reinit", "shuffle", "inverted")


@pytest.fixture(scope="module")
def snip_at_init(tmp_path_factory):
    return traced_run(tmp_path_factory, "snip", *SMALL, "prune.score=snip", "prune.at=init",
                      "prune.schedule=oneshot", "prune.scope=global", "prune.score_batch=50",
                      f"branches=[{','.join(PAI_BRANCHES)}]")


def pooled_snip_scores(run, level: int, r: int) -> np.ndarray:
    """Replicate r's SNIP scores at `level`, recomputed here from the initial weights and the
    score batch its derived key draws, pooled over the layers."""
    model, trainer = run.parts.model, run.parts.trainer
    init, base = run.begun[level].inputs.scored, run.begun[level].inputs.base_masks
    key = member_keys(np.uint32(0), R, level, "ticket", "score")[r]
    x, y = trainer.train_data
    index = jax.random.choice(key, len(x), (50,), replace=False)
    scores = _snip(model)(*member(init, r), member(base, r), x[index], y[index], key)
    return np.concatenate([np.asarray(scores[layer]).ravel() for layer in LAYERS])


@functools.cache
def _snip(model):
    """SNIP's score function of one member, jitted once for the 8 calls above (eagerly,
    each call dispatched op by op: seconds)."""
    return jax.jit(lambda params, state, masks, x, y, key: SCORES["snip"](
        model, params, state, masks, LAYERS, (x, y), key))


def pooled_kernels(masks) -> np.ndarray:
    return np.concatenate([np.asarray(masks[layer]["kernel"]).ravel() for layer in LAYERS]) == 1


def test_pruning_at_init_keeps_the_top_snip_scores_of_the_initial_weights(snip_at_init):
    run = snip_at_init
    init = run.begun[0].inputs.scored  # level 0 scores the initialisation too
    for level in (1, 2):
        counts, scored, base, start = run.begun[level].inputs
        assert jax.tree.all(jax.tree.map(np.array_equal, scored, init))  # the init, not trained
        assert jax.tree.all(jax.tree.map(np.array_equal, start, init))
        assert all(np.all(leaf == 1) for leaf in jax.tree.leaves(base))  # one-shot: from dense
        ticket_masks = run.begun[level].ticket_masks
        for r in range(R):
            masks = member(ticket_masks, r)
            # the global pool keeps exactly the planned count
            assert sum(kernel_counts(masks).values()) == int(counts.pool)
            # and those are the highest SNIP scores of the masked init on its score batch
            pooled, kept = pooled_snip_scores(run, level, r), pooled_kernels(masks)
            assert pooled[kept].min() >= pooled[~kept].max()


def test_pai_densities_follow_the_oneshot_plan(snip_at_init):
    pool = sum(SMALL_WEIGHTS.values())
    summaries = snip_at_init.summaries
    plan_counts = snip_at_init.parts.counts
    assert [int(c.pool) for c in plan_counts] == helpers.expected_counts(pool, 0.2, 2)
    for level in (0, 1, 2):
        rows = summaries[summaries.level == level]
        assert set(rows.branch) == set(PAI_BRANCHES)
        np.testing.assert_allclose(rows.density, int(plan_counts[level].pool) / pool)


def test_shuffle_keeps_each_layers_count_and_moves_the_mask(snip_at_init):
    for level in (1, 2):
        begun = snip_at_init.begun[level]
        ticket_masks, params, masks = begun.ticket_masks, begun.state.params, begun.state.masks
        start = begun.inputs.start.params
        for r in range(R):
            ticket = member(ticket_masks, r)
            shuffled = member(masks, PAI_BRANCHES.index("shuffle") * R + r)
            assert kernel_counts(shuffled) == kernel_counts(ticket)
            for layer in LAYERS:
                a, b = ticket[layer]["kernel"], shuffled[layer]["kernel"]
                assert not np.array_equal(a, b)
                assert np.all(shuffled[layer]["bias"] == 1)
                # the shuffled network starts from the same weights under its own mask
                np.testing.assert_array_equal(
                    member(params, PAI_BRANCHES.index("shuffle") * R + r)[layer]["kernel"],
                    member(start, r)[layer]["kernel"] * b)


def test_inverted_is_the_method_run_with_its_scores_inverted(snip_at_init):
    """SNIP, one round, global: the inverted mask keeps the pool's planned count, and those
    are the *lowest* SNIP scores (recomputed here) of the whole pool, layer counts
    following from them, not copied from the ticket."""
    run = snip_at_init
    for level in (1, 2):
        counts = run.begun[level].inputs.counts
        masks = run.begun[level].state.masks
        for r in range(R):
            inverted = pooled_kernels(member(masks, PAI_BRANCHES.index("inverted") * R + r))
            pooled = pooled_snip_scores(run, level, r)
            assert inverted.sum() == int(counts.pool)
            assert pooled[inverted].max() <= pooled[~inverted].min()


def test_each_program_compiles_once_across_levels(snip_at_init):
    assert len(snip_at_init.begun) == 3  # three levels, three sets of counts
    assert snip_at_init.compilations["jit(begin)"] == 1
    assert snip_at_init.compilations["jit(member_chunk)"] == 1


# ---------------------------------------------------------------- ERK


def test_erk_levels_have_the_erk_counts_of_the_planned_total(tmp_path_factory):
    cfg = helpers.run_config("prune.scope=erk")
    plan = cfg.prune_plan(LAYERS)
    assert plan.erk and plan.global_layers == LAYERS and plan.pooled == ()
    counts = plan.counts(SHAPES, 3)
    total = sum(WEIGHTS.values())
    pools = helpers.expected_counts(total, 0.2, 3)
    for level, c in enumerate(counts):
        got = {layer: int(n) for layer, n in c.layers.items()}
        assert sum(got.values()) == pools[level]
        # RigL's ERK densities of the level's pool (test_erk.py ports sparse_utils.py)
        reference = rigl_reference(SHAPES, pools[level] / total, exact=True)
        for layer, n in got.items():
            assert abs(n - reference[layer] * WEIGHTS[layer]) < 1
    # ERK gives the small output layer a higher density than the big first layer
    assert counts[3].layers["out"] / WEIGHTS["out"] > counts[3].layers["fc1"] / WEIGHTS["fc1"]


@pytest.fixture(scope="module")
def erk_run(tmp_path_factory):
    return traced_run(tmp_path_factory, "erk", "prune.scope=erk")


def test_an_erk_run_prunes_each_layer_to_its_erk_count(erk_run):
    for level in (1, 2):
        expected = {layer: int(n) for layer, n in erk_run.parts.counts[level].layers.items()}
        masks = load_npz(erk_run.dir / "levels" / f"level_{level:02d}.npz")
        for r in range(R):
            assert {layer: int(masks[f"{layer}/kernel"][r].sum()) for layer in LAYERS} == expected


# ---------------------------------------------------------------- retraining modes


@pytest.fixture(scope="module")
def lr_rewinding(tmp_path_factory):
    return traced_run(tmp_path_factory, "lr", *SMALL, "rewind.mode=lr", "rewind.step=20",
                      "optimizer.milestones=[10,30]")


@pytest.fixture(scope="module")
def finetuning(tmp_path_factory):
    return traced_run(tmp_path_factory, "finetune", *SMALL, "rewind.mode=finetune",
                      "rewind.finetune_lr=1e-4")


@pytest.mark.parametrize("mode", ["lr_rewinding", "finetuning"])
def test_lr_rewinding_and_finetuning_start_from_the_trained_weights(mode, request):
    run = request.getfixturevalue(mode)
    for level in (1, 2):
        counts, scored, base, start = run.begun[level].inputs
        trained = run.tickets[level - 1]  # the ticket trained at the last level
        assert jax.tree.all(jax.tree.map(np.array_equal, start, trained))
        assert jax.tree.all(jax.tree.map(np.array_equal, scored, trained))
        ticket_masks, params = run.begun[level].ticket_masks, run.begun[level].state.params
        for r in range(R):
            expected = jax.tree.map(lambda w, m: w * m, member(trained.params, r),
                                    member(ticket_masks, r))
            assert jax.tree.all(jax.tree.map(np.array_equal, member(params, r), expected))


def test_lr_rewinding_replays_the_schedule_from_step_k(lr_rewinding):
    schedule = lr_rewinding.parts.trainer.optimizer.schedule
    starts = [c.start for c in lr_rewinding.chunks]
    assert starts == [0, 20, 20, 20]  # level 0 from 0; each pruned level from k = 20
    for chunk in lr_rewinding.chunks[2:]:
        assert float(chunk.controls["lr"]) == 0  # the schedule's rate, not a constant
        # the rate of the chunk's last step, 39: past both milestones (10, 30)
        np.testing.assert_allclose(chunk.lr, float(schedule(39)), rtol=1e-6)
        np.testing.assert_allclose(chunk.lr, 1.2e-3 * 0.01, rtol=1e-5)


def test_finetuning_holds_a_constant_rate(finetuning):
    chunks = finetuning.chunks
    assert [c.start for c in chunks] == [0, 20] * 3
    for c in chunks[:2]:  # the dense level follows the schedule
        assert float(c.controls["lr"]) == 0
    for c in chunks[2:]:
        assert float(c.controls["lr"]) == pytest.approx(1e-4)
        np.testing.assert_allclose(c.lr, 1e-4, rtol=1e-6)


def test_weight_rewinding_starts_from_the_rewind_point(erk_run):
    init = erk_run.begun[0].inputs.start
    for level in (1, 2):
        assert jax.tree.all(jax.tree.map(np.array_equal, erk_run.begun[level].inputs.start, init))


# ---------------------------------------------------------------- gradual pruning


def test_cubic_schedule_counts():
    start = Counts({"a": np.int32(1000)}, np.int32(0))
    end = Counts({"a": np.int32(100)}, np.int32(0))
    for remaining, expected in [(1.0, 1000), (0.0, 100), (0.5, 100 + 900 * 0.125),
                                (0.25, 100 + 900 / 64)]:
        assert int(interpolate(start, end, remaining).layers["a"]) == round(expected)
    geometric = [int(interpolate(start, end, 1 - j / 4, "geometric").layers["a"])
                 for j in range(5)]
    assert geometric == [1000, round(1000 * 0.1**0.25), round(1000 * 0.1**0.5),
                         round(1000 * 0.1**0.75), 100]


def test_gradual_prune_step_hits_its_targets_at_the_scheduled_steps():
    plan = PrunePlan({"fc1": 0.2, "fc2": 0.2, "out": 0.2})
    units = Weights(LAYERS)
    counts = plan.counts(SMALL_SHAPES, 2)
    prune_step = jax.jit(gradual_pruning(units, plan, counts[0], start=10, end=40, every=10))
    model = helpers.setup(helpers.run_config(*SMALL)).model
    params = model.init(jax.random.key(0))[0]
    masks = jax.tree.map(np.ones_like, params)
    controls = {"lr": np.float32(0), "counts": counts[2]}
    full = dict(SMALL_WEIGHTS)
    for step in range(0, 45):
        new = prune_step(params, masks, np.int32(step), controls, jax.random.key(step))
        if step in (10, 20, 30, 40):
            fraction = 1 - (step - 10) / 30
            target = {layer: round(int(counts[2].layers[layer])
                                   + (full[layer] - int(counts[2].layers[layer])) * fraction**3)
                      for layer in LAYERS}
            assert kernel_counts(new) == target
            # magnitude: the kept weights are the largest of the survivors
            for layer in LAYERS:
                w, m = np.abs(np.asarray(params[layer]["kernel"])), np.asarray(new[layer]["kernel"])
                if m.min() == 0:
                    assert w[m == 1].min() >= w[m == 0].max()
        else:
            assert kernel_counts(new) == kernel_counts(masks)  # no pruning between events
        masks = new
    assert {k: int(v) for k, v in counts[2].layers.items()} == kernel_counts(masks)


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory):
    return traced_run(tmp_path_factory, "gradual", *SMALL, "prune.schedule=gradual",
                      "branches=[ticket]", "train.eval_every=10", "prune.gradual.start=0",
                      "prune.gradual.end=30", "prune.gradual.every=10")


def test_a_gradual_run_records_the_schedules_densities(gradual_run):
    evals = load(gradual_run.dir, kind="eval")
    counts = gradual_run.parts.counts
    total = sum(SMALL_WEIGHTS.values())
    for level in (0, 1, 2):
        final = {layer: int(n) for layer, n in counts[level].layers.items()}
        for step in (0, 10, 20, 30, 40):
            # the evaluation at step s (after steps s - 10 .. s - 1) has seen the pruning
            # events at 0, 10, ..., s - 10; none before step 0
            fraction = 1 if step == 0 else 1 - (step - 10) / 30
            expected = sum(round(final[layer] + (SMALL_WEIGHTS[layer] - final[layer])
                                 * fraction**3)
                           for layer in LAYERS)
            rows = evals[(evals.level == level) & (evals.step == step)]
            assert len(rows) == R
            np.testing.assert_allclose(rows.density, expected / total)
        masks = load_npz(gradual_run.dir / "levels" / f"level_{level:02d}.npz")
        for r in range(R):
            assert {layer: int(masks[f"{layer}/kernel"][r].sum()) for layer in LAYERS} == final


def test_a_gradual_run_compiles_its_training_once(gradual_run):
    assert [c.start for c in gradual_run.chunks] == [0, 10, 20, 30] * 3
    assert gradual_run.compilations["jit(member_chunk)"] == 1


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, message", [
    (["prune.schedule=gradual"], r"branches=\[ticket\]"),
    (["prune.schedule=gradual", "branches=[ticket]", "prune.score=snip"], "prune.score=magnitude"),
    (["prune.structure=neurons", "prune.score=synflow"], "norm of their weights"),
    (["prune.structure=neurons", "prune.scope=erk"], "use layerwise or global"),
    (["prune.score=obd"], r"prune.score='obd' is unknown"),
    (["prune.scope=random"], r"prune.scope='random' is unknown"),
    (["prune.schedule=sometimes"], "prune.schedule"),
    (["prune.at=end"], "prune.at"),
    (["prune.structure=heads"], "prune.structure"),
    (["rewind.mode=restart"], "rewind.mode"),
    (["rewind.finetune_lr=-1"], "rewind.finetune_lr"),
    (["branches=[ticket,flipped]"], "branches"),
    (["prune.schedule=gradual", "branches=[ticket]", "prune.gradual.end=100"],
     r"start < end <= train.steps=40"),
    (["prune.schedule=gradual", "branches=[ticket]", "rewind.step=20",
      "prune.gradual.start=10"], r"rewind.step=20 <= start"),
])
def test_bad_method_choices_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        helpers.run_config(*overrides)


def test_an_erk_plan_that_empties_a_layer_is_refused():
    cfg = helpers.run_config("prune.scope=erk", "prune.rate=0.9", "prune.levels=30")
    with pytest.raises(ConfigError, match="empties the global pool"):
        build(cfg)


def test_keep_top_of_negated_scores_is_the_lowest():
    scores = np.array([3.0, 1.0, 2.0, 0.5], np.float32)
    np.testing.assert_array_equal(keep_top(-scores, np.ones(4, np.float32), 2, jax.random.key(0)), [0, 1, 0, 1])


# ---------------------------------------------------------------- structured pruning


@pytest.fixture(scope="module")
def neuron_run(tmp_path_factory):
    return traced_run(tmp_path_factory, "neurons", *SMALL, "prune.structure=neurons")


def test_neuron_pruning_removes_whole_units_at_exact_counts(neuron_run):
    units = {"fc1": helpers.expected_counts(300, 0.2, 2), "fc2": helpers.expected_counts(100, 0.2, 2)}
    summaries = neuron_run.summaries
    for level in (0, 1, 2):
        masks = load_npz(neuron_run.dir / "levels" / f"level_{level:02d}.npz")
        for r in range(R):
            fc1, fc2, out = (masks[f"{layer}/kernel"][r] for layer in LAYERS)
            alive1 = fc1.any(axis=0)  # a hidden unit of fc1 is a column of its kernel
            alive2 = fc2.any(axis=0)
            assert alive1.sum() == units["fc1"][level] and alive2.sum() == units["fc2"][level]
            # whole units: a unit's column is all kept or all removed, its bias too, and the
            # next layer reads none of a removed unit
            assert np.all(fc1[:, alive1]) and not fc1[:, ~alive1].any()
            np.testing.assert_array_equal(masks["fc1/bias"][r], alive1)
            np.testing.assert_array_equal(fc2, np.outer(alive1, alive2))
            np.testing.assert_array_equal(out, np.outer(alive2, np.ones(10, bool)))
            remaining = fc1.sum() + fc2.sum() + out.sum()
            rows = summaries[(summaries.level == level) & (summaries.replicate == r)
                             & (summaries.branch == "ticket")]
            assert rows.density.item() == pytest.approx(remaining / sum(SMALL_WEIGHTS.values()))
            assert rows.units_fc1.item() == units["fc1"][level]
            assert rows.units_fc2.item() == units["fc2"][level]


def test_structured_controls_keep_each_groups_unit_count(neuron_run):
    summaries = neuron_run.summaries
    for level in (1, 2):
        rows = summaries[summaries.level == level]
        for column in ("units_fc1", "units_fc2", "density"):
            assert rows[column].nunique() == 1  # ticket, reinit and random_prune alike
        ticket_masks, masks = neuron_run.begun[level].ticket_masks, neuron_run.begun[level].state.masks
        for r in range(R):
            random = member(masks, 2 * R + r)  # random_prune: whole random units
            kept = np.asarray(random["fc1"]["kernel"]).any(axis=0)
            ticket_kept = np.asarray(member(ticket_masks, r)["fc1"]["kernel"]).any(axis=0)
            assert kept.sum() == ticket_kept.sum() and not np.array_equal(kept, ticket_kept)
            np.testing.assert_array_equal(np.asarray(random["fc1"]["kernel"]),
                                          np.outer(np.ones(64, bool), kept))


def test_structured_pruning_refuses_a_dimension_the_model_lacks():
    """Refused by the config's checks, before any data loads (the model is built abstractly)."""
    with pytest.raises(ConfigError, match="has no channels.*: use prune.structure=neurons$"):
        helpers.run_config("prune.structure=channels")
    with pytest.raises(ConfigError, match=r"prune.layers names 'out', not a neuron group .*"
                                          r"drop it with prune.layers=null$"):
        helpers.run_config("prune.structure=neurons", "prune.layers=[out]")


def test_a_structured_tickets_masks_compact_into_a_smaller_equal_model(neuron_run):
    """The saved masks and rewind weights of a run compact into a dense model with the
    surviving units only, computing what the masked ticket computes."""
    from lottery.pruning.compact import compact
    from lottery.pruning.masks import apply_masks
    from lottery.pruning.structured import units_alive

    model, units = neuron_run.parts.model, neuron_run.parts.units
    rewind = load_npz(neuron_run.dir / "rewind.npz")
    saved = load_npz(neuron_run.dir / "levels" / "level_02.npz")
    params = {layer: {leaf: rewind[f"params/{layer}/{leaf}"][0] for leaf in ("kernel", "bias")}
              for layer in LAYERS}
    masks = {layer: {leaf: saved[f"{layer}/{leaf}"][0].astype(np.float32)
                     for leaf in ("kernel", "bias")} for layer in LAYERS}
    unit_masks = units_alive(masks, units.groups)
    small = compact(model, params, {}, unit_masks)
    assert small.params["fc1"]["kernel"].shape == (64, 192)
    assert small.params["fc2"]["kernel"].shape == (192, 64)
    x = jax.random.normal(jax.random.key(3), (16, 8, 8, 1))
    np.testing.assert_allclose(small.spec.logits(small.params, small.state, x),
                               model.logits(apply_masks(params, masks), {}, x),
                               rtol=1e-5, atol=1e-5)
