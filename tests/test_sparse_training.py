"""Sparse training beyond IMP: static sparse training, SET, RigL and straight-through pruning.

Expected values come from hand computations on tiny layers, from the published formulas
(RigL's cosine drop fraction, Evci et al. 2020), from jaxpruner's mask-update rule ported
into a few lines of numpy, and from plain `jax.grad` of a loss written here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from lottery.optim import build_optimizer
from lottery.pruning.dynamic import (DynamicSparse, drop_and_grow, drop_fraction,
                                     update_steps)
from lottery.pruning.prune import Counts, PrunePlan
from lottery.pruning.ste import StraightThrough
from lottery.pruning.units import Weights
from lottery.record import level_file

UNITS = Weights(("fc",))


def layer(kernel, bias=None):
    kernel = jnp.asarray(kernel, jnp.float32)
    return {"fc": {"kernel": kernel,
                   "bias": jnp.zeros(kernel.shape[-1]) if bias is None else bias}}


def kernel_of(tree):
    return np.asarray(tree["fc"]["kernel"])


# a 2x4 layer: 4 active weights of magnitudes 0.5, 0.1, 0.9, 0.3 (flat positions 0-3) and
# 4 inactive ones; the dense gradient's magnitudes at all 8 positions
ACTIVE = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
WEIGHTS = np.array([[0.5, -0.1, 0.9, -0.3], [0, 0, 0, 0]], np.float32)
GRADS = np.array([[0.2, -5.0, 0.1, 0.3], [0.7, 0.05, -0.9, 0.4]], np.float32)


def test_rigl_drops_the_smallest_weights_and_grows_the_largest_gradients_by_hand():
    """fraction 0.5 of 4 active: drop 2, the smallest |w| (positions 1 and 3); grow 2 among
    the other 6 (the dropped included) by |g|: position 1 (5.0) and 6 (0.9)."""
    new = drop_and_grow(jnp.asarray(ACTIVE), jnp.abs(WEIGHTS), jnp.abs(GRADS), 0.5,
                        jax.random.key(0))
    np.testing.assert_array_equal(new, [[1, 1, 1, 0], [0, 0, 1, 0]])


def test_set_keeps_the_largest_weights_and_grows_at_random():
    grown_at = set()
    for seed in range(20):
        scores = jax.random.uniform(jax.random.key(100 + seed), (2, 4))
        new = np.asarray(drop_and_grow(jnp.asarray(ACTIVE), jnp.abs(WEIGHTS), scores, 0.5,
                                       jax.random.key(seed)))
        assert new.sum() == 4 and new[0, 0] == 1 and new[0, 2] == 1  # the two largest kept
        grown_at |= set(np.flatnonzero(new.ravel() * (1 - np.array([1, 0, 1, 0, 0, 0, 0, 0]))))
    assert grown_at == {1, 3, 4, 5, 6, 7}  # every other position is grown by some draw


def test_the_drop_count_truncates_as_rigls():
    """RigL's n_prune = int(n_ones * drop_fraction): 0.3 and 0.49 of 4 active drop 1 (the
    smallest, position 0), grown at the one inactive position, 4; 0.5 drops 2."""
    active = jnp.array([[1, 1, 1, 1, 0]], jnp.float32)
    weights = jnp.array([[0.5, 0.6, 0.9, 0.7, 0.0]])
    grow = jnp.array([[0.0, 0.1, 0.0, 0.0, 1.0]])
    for fraction in (0.3, 0.49):
        new = drop_and_grow(active, weights, grow, fraction, jax.random.key(0))
        np.testing.assert_array_equal(new, [[0, 1, 1, 1, 1]])
    new = drop_and_grow(active, weights, grow, 0.5, jax.random.key(0))  # 0 and 1 dropped,
    np.testing.assert_array_equal(new, [[0, 1, 1, 1, 1]])  # 4 and 1 (the next |g|) grown


def test_equal_magnitudes_at_the_cut_are_dropped_at_random():
    """Three weights of 0.5 and one of 0.9, one dropped: each 0.5 is dropped by some key,
    never the 0.9 (grown weights start at 0, so ties at the cut are common)."""
    active, weights = jnp.ones((1, 4)), jnp.array([[0.5, 0.5, 0.9, 0.5]])
    dropped = set()
    for seed in range(30):
        new = np.asarray(drop_and_grow(jnp.asarray(active), weights, -jnp.arange(4.0)[None],
                                       0.25, jax.random.key(seed)))
        # the one dropped is grown back (the only candidate): look at the drop alone
        from lottery.pruning.prune import keep_top
        kept = np.asarray(keep_top(weights, active, 3, jax.random.key(seed)))
        assert new.sum() == 4 and kept[0, 2] == 1 and kept.sum() == 3
        dropped.add(int(np.flatnonzero(kept.ravel() == 0)[0]))
    assert dropped == {0, 1, 3}


def test_the_drop_fraction_follows_rigls_cosine_decay():
    """α (1 + cos(π t / T_end)) / 2, by hand at t = 0, T/4, T/2, T."""
    for t, expected in ((0, 0.3), (250, 0.3 * (1 + math.sqrt(0.5)) / 2), (500, 0.15),
                        (1000, 0.0)):
        assert float(drop_fraction(t, 0.3, 1000)) == pytest.approx(expected, abs=1e-7)


def adam():
    return build_optimizer("adam", 0.01, steps_per_epoch=1)


def rigl(every=10, stop=45, fraction=0.3, optimizer=None):
    return DynamicSparse(UNITS, optimizer or adam(), "gradient", every, fraction, stop)


def test_updates_happen_every_delta_t_steps_before_the_stop_step_with_exact_counts():
    """Driven step by step (optimizer updates of zero): the mask changes after steps s with
    t = s + 1 a multiple of ΔT = 10 and t < 45, each time replacing floor(f(t) · 40) of the
    40 active weights (the gradient is largest on inactive weights, so every grown weight is
    new); the per-layer count stays 40; the record slots hold each update's numbers."""
    hooks, optimizer = rigl(), adam()
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(10, 10)).astype(np.float32)
    mask = np.zeros(100, np.float32)
    mask[rng.permutation(100)[:40]] = 1
    masks = layer(mask.reshape(10, 10), jnp.ones(10))
    params = layer(weights * mask.reshape(10, 10))
    opt_state = optimizer.init(params)
    extra = hooks.start(params, masks)
    assert update_steps(10, 45) == 4 and extra.changed.shape == (4,)

    def no_update(grads, opt_state, weights):
        return jax.tree.map(jnp.zeros_like, grads), opt_state

    changed_at, replaced = [], []
    for step in range(60):
        before = kernel_of(masks)
        grads = layer((1 - before) * (1 + rng.random((10, 10))))
        params, opt_state, masks, extra = hooks.update(no_update, grads, params, opt_state,
                                                       masks, extra, jnp.int32(step), {},
                                                       jax.random.key(step))
        after = kernel_of(masks)
        assert after.sum() == 40
        np.testing.assert_array_equal(kernel_of(params) * (1 - after), 0)
        if (after != before).any():
            changed_at.append(step + 1)
            replaced.append(int((after * (1 - before)).sum()))
    due = [10, 20, 30, 40]  # multiples of 10 below 45
    counts = [math.floor(0.3 * (1 + math.cos(math.pi * t / 45)) / 2 * 40 + 1e-9)
              for t in due]  # at t = 30 exactly 3 (cos(2π/3) = -1/2)
    assert counts == [10, 7, 3, 0]  # the last update replaces nothing
    assert changed_at == due[:3] and replaced == counts[:3]
    np.testing.assert_allclose(extra.replaced, np.array(counts) / 40, rtol=1e-6)
    np.testing.assert_allclose(extra.changed, 2 * np.array(counts) / 100, rtol=1e-6)


def test_grown_weights_start_at_zero_with_zero_moments_and_regrown_ones_keep_theirs():
    """The hand-made layer of the first test, after an Adam step on a dense gradient (so every
    moment is nonzero): position 6 (grown, inactive before) has weight 0 and zero mu and nu;
    position 1 (dropped and grown again) keeps its weight and moments; the dropped position
    3 is zero; every other moment is unchanged."""
    optimizer = adam()
    params, masks = layer(WEIGHTS), layer(ACTIVE, jnp.ones(4))
    opt_state = optimizer.init(params)
    _, opt_state = optimizer.update(layer(GRADS + 1.0), opt_state, params, 0)
    hooks = rigl(every=1, stop=1000, fraction=1.0, optimizer=optimizer)
    t = 500  # f = (1 + cos(π / 2)) / 2 = 0.5: drop 2, grow 2
    new_params, new_state, new_masks, _ = hooks.mask_update(
        layer(GRADS), params, opt_state, masks, hooks.start(params, masks), jnp.int32(t),
        jax.random.key(0))
    np.testing.assert_array_equal(kernel_of(new_masks), [[1, 1, 1, 0], [0, 0, 1, 0]])
    expected = WEIGHTS.copy()
    expected[0, 3] = 0  # dropped
    np.testing.assert_array_equal(kernel_of(new_params), expected)  # [1, 2] grown at 0
    for name in ("mu", "nu"):
        old = np.asarray(optax.tree_utils.tree_get(opt_state, name)["fc"]["kernel"])
        new = np.asarray(optax.tree_utils.tree_get(new_state, name)["fc"]["kernel"])
        assert (old != 0).all()
        reset = np.zeros((2, 4), bool)
        reset[1, 2] = True
        np.testing.assert_array_equal(new[reset], 0)
        np.testing.assert_array_equal(new[~reset], old[~reset])


# jaxpruner's SET/RigL mask update (google-research/jaxpruner, jaxpruner/algorithms/
# sparse_trainers.py `SET._update_masks`, with `topk_mask_calculator` of mask_calculator.py),
# ported as a rule: keep the round(size·density·(1-f)) highest drop scores (inactive ones
# lowered below every score), then the round(size·density) highest grow scores with the
# kept ones raised above every score; equal scores by lower index (argsort order).
def jaxpruner_update(active, drop_score, grow_score, fraction):
    size = active.size
    density = active.sum() / size

    def topk(scores, density):
        keep = max(1, int(np.round(size * density)))
        order = np.argsort(-scores.ravel(), kind="stable")
        mask = np.zeros(size)
        mask[order[:keep]] = 1
        return mask.reshape(scores.shape)

    dropped = topk(np.where(active == 0, drop_score.min() - 1e-5, drop_score),
                   density * (1 - fraction))
    return topk(np.where(dropped == 1, grow_score.max() + 1e-5, grow_score), density)


@pytest.mark.parametrize("grow", ["random", "gradient"])
def test_the_update_drops_and_grows_the_weights_jaxpruner_does(grow):
    """Identical inputs without ties, on layers where f · n_active is a whole number (where
    jaxpruner's rounding and RigL's truncation agree): the same mask."""
    rng = np.random.default_rng(1)
    for trial in range(10):
        shape = (16, 12)
        active = np.zeros(192, np.float32)
        active[rng.permutation(192)[:64]] = 1
        active = active.reshape(shape)
        weights = rng.normal(size=shape).astype(np.float32) * active
        grow_score = (np.abs(rng.normal(size=shape)) if grow == "gradient"
                      else rng.random(shape)).astype(np.float32)
        fraction = (1, 3, 8, 16, 32)[trial % 5] / 64  # exact in binary
        ours = drop_and_grow(jnp.asarray(active), jnp.abs(weights), jnp.asarray(grow_score),
                             fraction, jax.random.key(trial))
        theirs = jaxpruner_update(active, np.abs(weights), grow_score, fraction)
        np.testing.assert_array_equal(ours, theirs)


def loss_of(params, x, y):
    """A one-layer softmax regression, written here."""
    logits = x @ params["fc"]["kernel"] + params["fc"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_the_straight_through_step_moves_the_dense_weights_by_the_dense_gradient(decay):
    """Before the step the masks keep the 5 largest of the dense weights (by hand: numpy
    argsort); the forward pass uses the dense weights under them; SGD (lr 0.1) then moves
    every dense weight, pruned ones too, by the gradient at the pruned network (plain
    jax.grad here), plus decay · (1 - mask) · W for SR-STE."""
    rng = np.random.default_rng(2)
    dense = layer(rng.normal(size=(4, 3)).astype(np.float32), jnp.asarray([0.1, -0.2, 0.3]))
    x, y = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))
    plan = PrunePlan({"fc": 0.5})
    hooks = StraightThrough(UNITS, plan, lambda step, controls: controls["counts"], decay)
    controls = {"counts": Counts({"fc": np.int32(5)}, np.int32(0))}
    full = jax.tree.map(jnp.ones_like, dense)
    params, masks, extra = hooks.before(dense, full, hooks.start(dense, full), jnp.int32(0),
                                        controls, jax.random.key(0))
    expected_mask = np.zeros(12)
    expected_mask[np.argsort(-np.abs(kernel_of(dense)).ravel())[:5]] = 1
    np.testing.assert_array_equal(kernel_of(masks).ravel(), expected_mask)
    pruned = jax.tree.map(lambda w, m: w * m, dense, masks)
    np.testing.assert_array_equal(kernel_of(params), kernel_of(pruned))
    grads = jax.grad(loss_of)(params, x, y)
    sgd = optax.sgd(0.1)

    def optimize(grads, opt_state, weights):
        return sgd.update(grads, opt_state, weights)

    _, _, _, new_dense = hooks.update(optimize, grads, params, sgd.init(dense), masks, extra,
                                      jnp.int32(0), controls, jax.random.key(0))
    straight = jax.grad(loss_of)(pruned, x, y)  # the gradient at the pruned network, whole
    m = expected_mask.reshape(4, 3)
    expected = kernel_of(dense) - 0.1 * (np.asarray(straight["fc"]["kernel"])
                                         + decay * (1 - m) * kernel_of(dense))
    np.testing.assert_allclose(kernel_of(new_dense), expected, rtol=1e-6, atol=1e-7)
    assert (np.asarray(straight["fc"]["kernel"])[m == 0] != 0).all()  # pruned weights move


METHODS = {
    "static": ("prune.schedule=static",),
    "set": ("prune.schedule=set", "prune.dst.every=10"),
    "rigl": ("prune.schedule=rigl", "prune.dst.every=10", "prune.dst.init=uniform"),
    "ste": ("prune.schedule=oneshot", "prune.ste=true"),
    "sr-ste gradual": ("prune.schedule=gradual", "prune.ste=sr", "prune.gradual.every=10"),
    "sr-ste 2:4": ("prune.schedule=oneshot", "prune.ste=sr", "prune.structure=nm",
                   "prune.levels=1"),
    "2:4 imp": ("prune.structure=nm", "prune.levels=1"),
    "2:4 gradual": ("prune.schedule=gradual", "prune.structure=nm", "prune.levels=1",
                    "prune.gradual.every=10"),
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_compiles_once_and_keeps_every_level_at_its_counts(method, tmp_path):
    """A 2-level run (2:4: one level): one compilation of the training and evaluation
    functions; each level's final ticket masks keep exactly the plan's per-layer counts, and
    under 2:4 exactly 2 of every 4 consecutive inputs of every output."""
    cfg = helpers.run_config("branches=[ticket]", "prune.rate=0.5", *METHODS[method])
    run = helpers.spied_run(cfg, tmp_path)
    assert run.compilations["jit(member_chunk)"] == 1
    assert run.compilations["jit(member_eval)"] == 1
    built = helpers.setup(cfg)
    for level in range(1, cfg.prune.levels + 1):
        masks = helpers.load_npz(level_file(tmp_path, level))
        for name, count in built.counts[level].layers.items():
            kernel = masks[f"{name}/kernel"]
            np.testing.assert_array_equal(kernel.reshape(cfg.replicates, -1).sum(1), count)
            if cfg.prune.structure == "nm":  # (replicate, in, out): groups of 4 inputs
                groups = kernel.reshape(cfg.replicates, -1, 4, kernel.shape[-1]).sum(2)
                assert (groups == 2).all()


def test_a_rigl_run_killed_mid_level_resumes_to_the_same_record(tmp_path):
    """The members' extra state (weights ever active, the update records) goes through the
    in-level checkpoint: a RigL run killed after its last chunk (level 1 resumes from its
    step-30 checkpoint, past the updates at t = 15, 20 and 25) writes the record of a run never
    killed. 2 devices: the stack of one member is padded."""
    from test_resume import lottery as run, rows

    config = [*helpers.overrides("dataset.shape=[8,8,1]", "replicates=1", "prune.levels=1",
                                 "branches=[ticket]", "prune.schedule=rigl",
                                 "prune.dst.every=5", "rewind.step=10", "train.eval_every=10",
                                 "train.checkpoint_every=20")]

    def lottery(run_dir, crash=None):
        return run(run_dir, crash, config=config)

    assert lottery(tmp_path / "reference").returncode == 0
    # level 0: chunks 1-4 (to step 40); level 1: 5 (-> 20), 6 (-> 30, checkpoint), 7 (-> 40)
    crashed = lottery(tmp_path / "run", "chunk:7")
    assert crashed.returncode != 0
    resumed = lottery(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 30 of level 1" in resumed.stdout + resumed.stderr
    reference = rows(tmp_path / "reference")
    assert rows(tmp_path / "run") == reference
    updates = [row for row in reference if row["kind"] == "mask_update"]
    assert [row["step"] for row in updates] == [15, 20, 25]
    summary = [row for row in reference if row["kind"] == "summary" and row["level"] == 1]
    assert summary[0]["itop_rate"] > summary[0]["density"]


def test_a_nan_weight_is_dropped_first_and_a_nan_gradient_grown_last():
    """A diverged weight (NaN) ranks below every magnitude: dropped before the 0.1; a NaN
    gradient ranks below every gradient: the inactive position with |g| = 0.2 is grown."""
    active = jnp.array([[1, 1, 1, 0, 0]], jnp.float32)
    weights = jnp.array([[jnp.nan, 0.1, 0.9, 0.0, 0.0]])
    grads = jnp.array([[0.0, 0.0, 0.0, jnp.nan, 0.2]])
    new = drop_and_grow(active, jnp.abs(weights), jnp.abs(grads), 1 / 3, jax.random.key(0))
    np.testing.assert_array_equal(new, [[0, 1, 1, 0, 1]])


@pytest.mark.parametrize("overrides, message", [
    (("prune.schedule=rigl", "branches=[ticket]", "prune.dst.every=40"),
     "prune.dst.every=40 makes no mask update between rewind.step=0 and prune.dst.stop=30"),
    (("prune.schedule=set", "branches=[ticket]", "prune.dst.stop=41"),
     "prune.dst.stop=41 .* must satisfy"),
    (("prune.schedule=rigl", "branches=[ticket,reinit]"), "use branches=\\[ticket\\]"),
    (("prune.schedule=static", "branches=[ticket]", "prune.scope=global"),
     "prune.scope are not used"),
    (("prune.schedule=rigl", "branches=[ticket]", "rewind.mode=lr"), "rewind.mode=weights"),
    (("prune.schedule=rigl", "branches=[ticket]", "prune.structure=nm", "prune.levels=1"),
     "drops and grows single weights"),
    (("prune.schedule=iterative", "branches=[ticket]", "prune.ste=true"),
     "use prune.schedule=oneshot"),
    (("prune.schedule=oneshot", "branches=[ticket]", "prune.ste=maybe"),
     "prune.ste='maybe' must be false, true or sr"),
])
def test_sparse_training_configs_that_cannot_run_are_refused_in_one_line(overrides, message):
    from lottery.config import ConfigError
    from lottery.setup import build

    with pytest.raises(ConfigError, match=message) as error:
        build(helpers.run_config(*overrides))
    assert "\n" not in str(error.value)
