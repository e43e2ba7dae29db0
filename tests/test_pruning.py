"""Pruning one level: exact counts, only surviving weights, highest |w| kept, global pools,
biases untouched, and no recompilation when rates or masks change."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import LAYERS, WEIGHTS, check_reachable, expected_counts
from lottery.config import ConfigError
from lottery.models import build_model
from lottery.pruning.masks import (MASK_DTYPE, apply_masks, density, full_masks, kernels,
                                   remaining, with_kernels)
from lottery.pruning.prune import (Counts, PrunePlan, keep_counts, number_to_keep, random_like,
                                   survivors)
from lottery.pruning.scores import magnitude, uniform_random

LAYERWISE = PrunePlan({"fc1": 0.2, "fc2": 0.2, "out": 0.1})
GLOBAL = PrunePlan({"out": 0.1}, ("fc1", "fc2"), 0.2)
TIES = jax.random.key(0)


def rates(plan: PrunePlan, scale: float = 1.0):
    """The plan's rates as traced arrays (scale 0: prune nothing)."""
    return ({k: np.float32(v * scale) for k, v in plan.layer_rates.items()},
            np.float32(plan.global_rate * scale))


def prune(plan: PrunePlan, scores, masks, rates):
    """One iterative level: remove `rates` of each layer's (or the pool's) survivors."""
    layer_rates, global_rate = rates
    old = kernels(masks, plan.layers)
    alive = survivors(plan, old)
    counts = Counts({name: number_to_keep(alive.layers[name], layer_rates[name])
                     for name in alive.layers}, number_to_keep(alive.pool, global_rate))
    return with_kernels(masks, keep_counts(plan, scores, old, counts, TIES))


@pytest.fixture(scope="module")
def model():
    return build_model("lenet_300_100", (28, 28, 1), 10)


@pytest.fixture(scope="module")
def params(model):
    return model.init(jax.random.key(0))[0]


@pytest.fixture(scope="module")
def prune_layerwise():
    """One jitted `prune` for the layerwise plan, shared by the tests (one compilation)."""
    return jax.jit(partial(prune, LAYERWISE))


@pytest.fixture(scope="module")
def prune_global():
    return jax.jit(partial(prune, GLOBAL))


def holes(params, fraction: float, seed: int = 1):
    """Masks with about `fraction` of every kernel already pruned (biases all ones)."""
    masks = full_masks(params)
    rng = np.random.default_rng(seed)
    for layer in LAYERS:
        shape = masks[layer]["kernel"].shape
        masks[layer]["kernel"] = jnp.asarray(rng.random(shape) >= fraction, MASK_DTYPE)
    return masks


def kernel(tree, layer):
    return np.asarray(tree[layer]["kernel"])


def assert_biases_and_dtype(masks, params):
    assert jax.tree.structure(masks) == jax.tree.structure(params)
    for leaf in jax.tree.leaves(masks):
        assert leaf.dtype == MASK_DTYPE == jnp.float32
    for layer in LAYERS:
        bias = np.asarray(masks[layer]["bias"])
        assert bias.shape == params[layer]["bias"].shape
        assert np.all(bias == 1.0)


def assert_keeps_largest(kept, pruned_now, scores):
    """Every weight kept scores at least as high as every surviving weight just pruned."""
    if kept.any() and pruned_now.any():
        assert scores[kept].min() >= scores[pruned_now].max()


def test_layerwise_prunes_exact_count_of_survivors_by_magnitude(params, prune_layerwise):
    old = holes(params, 0.3)
    scores = magnitude(params, LAYERS)
    new = prune_layerwise(scores, old, rates(LAYERWISE))
    assert_biases_and_dtype(new, params)
    for layer, rate in LAYERWISE.layer_rates.items():
        o, n, w = kernel(old, layer), kernel(new, layer), np.abs(kernel(params, layer))
        assert set(np.unique(n)) <= {0.0, 1.0}
        assert np.all(n[o == 0] == 0), f"{layer}: a weight pruned earlier came back"
        surviving = int(o.sum())
        assert int(n.sum()) == expected_counts(surviving, rate, 1)[1]
        assert int(n.sum()) == surviving - int(np.round(np.float32(rate) * np.float32(surviving)))
        # old zeros include large weights: they must not count as survivors
        assert w[o == 0].max() > w[(o == 1) & (n == 0)].max()
        assert_keeps_largest(n == 1, (o == 1) & (n == 0), w)


def test_layerwise_iterated_levels_follow_exact_count_sequence(model, prune_layerwise):
    levels = 8
    masks = full_masks(model.init(jax.random.key(0))[0])
    expected = {layer: expected_counts(WEIGHTS[layer], rate, levels)
                for layer, rate in LAYERWISE.layer_rates.items()}
    assert expected["out"][:4] == [1000, 900, 810, 729]
    assert expected["fc1"][:3] == [235200, 188160, 150528]
    for level in range(1, levels + 1):
        trained = model.init(jax.random.key(100 + level))[0]  # new weights: new ranking
        new = prune_layerwise(magnitude(trained, LAYERS), masks, rates(LAYERWISE))
        counts = {layer: int(c) for layer, c in remaining(new, LAYERS).items()}
        assert counts == {layer: seq[level] for layer, seq in expected.items()}, level
        for layer in LAYERS:
            o, n = kernel(masks, layer), kernel(new, layer)
            assert np.all(n <= o)
            assert_keeps_largest(n == 1, (o == 1) & (n == 0), np.abs(kernel(trained, layer)))
        assert_biases_and_dtype(new, trained)
        masks = new
    total = sum(seq[levels] for seq in expected.values())
    assert float(density(masks, LAYERS)) == pytest.approx(total / sum(WEIGHTS.values()), rel=1e-6)


def test_global_scope_keeps_pooled_top_k_and_exceptions_at_their_own_rate(params, prune_global):
    old = holes(params, 0.25, seed=3)
    scores = magnitude(params, LAYERS)
    new = prune_global(scores, old, rates(GLOBAL))
    assert_biases_and_dtype(new, params)
    pool = GLOBAL.global_layers
    o = np.concatenate([kernel(old, layer).ravel() for layer in pool])
    n = np.concatenate([kernel(new, layer).ravel() for layer in pool])
    w = np.concatenate([np.abs(kernel(params, layer)).ravel() for layer in pool])
    assert np.all(n[o == 0] == 0)
    surviving = int(o.sum())
    assert int(n.sum()) == expected_counts(surviving, 0.2, 1)[1]
    assert_keeps_largest(n == 1, (o == 1) & (n == 0), w)
    # one threshold for the pool: fc1 (smaller Glorot std) loses more than 20%, fc2 less
    kept = {layer: kernel(new, layer).sum() / kernel(old, layer).sum() for layer in pool}
    assert kept["fc1"] < 0.8 < kept["fc2"]
    # the exception is pruned on its own, at its own rate
    o_out, n_out = kernel(old, "out"), kernel(new, "out")
    assert int(n_out.sum()) == expected_counts(int(o_out.sum()), 0.1, 1)[1]
    assert np.all(n_out[o_out == 0] == 0)
    assert_keeps_largest(n_out == 1, (o_out == 1) & (n_out == 0), np.abs(kernel(params, "out")))


def test_zero_rates_prune_nothing(params, prune_layerwise):
    old = holes(params, 0.5, seed=4)
    new = prune_layerwise(magnitude(params, LAYERS), old, rates(LAYERWISE, 0.0))
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_changing_rates_or_masks_does_not_recompile(params, prune_layerwise):
    scores = magnitude(params, LAYERS)
    full = full_masks(params)
    all_rates = [rates(LAYERWISE), rates(LAYERWISE, 0.0), rates(LAYERWISE, 2.5),
             ({"fc1": np.float32(0.5), "fc2": np.float32(0.0), "out": np.float32(0.9)},
              np.float32(0.0))]
    results = [prune_layerwise(scores, masks, r) for r in all_rates for masks in (full, holes(params, 0.1))]
    assert prune_layerwise._cache_size() == 1
    custom = {layer: int(c) for layer, c in remaining(results[-2], LAYERS).items()}
    assert custom == {"fc1": 117600, "fc2": 30000, "out": 100}
    half = {layer: int(c) for layer, c in remaining(results[4], LAYERS).items()}
    assert half == {"fc1": 235200 - 117600, "fc2": 30000 - 15000, "out": 1000 - 250}


def test_number_to_keep_rounds_half_to_even():
    keep = [int(number_to_keep(np.int32(n), np.float32(r)))
            for n, r in [(10, 0.25), (6, 0.25), (2, 0.2), (1, 0.5), (1, 0.6), (3, 0.5)]]
    assert keep == [8, 4, 2, 1, 0, 1]  # 2.5 -> 2, 1.5 -> 2, 0.4 -> 0, 0.5 -> 0, 0.6 -> 1


def test_random_masks_have_exact_counts_and_differ(params):
    masks = holes(params, 0.6, seed=5)
    random = jax.jit(lambda key, masks: with_kernels(
        masks, random_like(key, kernels(masks, LAYERS))))(jax.random.key(7), masks)
    assert_biases_and_dtype(random, params)
    for layer in LAYERS:
        a, b = kernel(masks, layer), kernel(random, layer)
        assert a.sum() == b.sum()
        assert not np.array_equal(a, b)
        overlap = (a * b).sum() / a.sum()  # about the density (0.4) for independent masks
        assert 0.3 < overlap < 0.5


def test_scores_cover_only_kernels(params):
    scores = magnitude(params, LAYERS)
    assert set(scores) == set(LAYERS)
    for layer in LAYERS:
        np.testing.assert_array_equal(np.asarray(scores[layer]), np.abs(kernel(params, layer)))
    uniform = jax.eval_shape(partial(uniform_random, layers=LAYERS), jax.random.key(0), params)
    assert {layer: u.shape for layer, u in uniform.items()} == {
        layer: params[layer]["kernel"].shape for layer in LAYERS}


def test_apply_masks_zeroes_exactly_the_masked_entries(params):
    masks = holes(params, 0.5, seed=6)
    masked = apply_masks(params, masks)
    for layer in LAYERS:
        m, p = kernel(masks, layer), kernel(masked, layer)
        assert np.all(p[m == 0] == 0)
        np.testing.assert_array_equal(p[m == 1], kernel(params, layer)[m == 1])
        np.testing.assert_array_equal(np.asarray(masked[layer]["bias"]),
                                      np.asarray(params[layer]["bias"]))


def test_check_reachable_refuses_a_schedule_that_empties_a_layer():
    with pytest.raises(ConfigError, match=r"empties layer out at level 4"):
        check_reachable(PrunePlan({"fc1": 0.9, "fc2": 0.9, "out": 0.9}), WEIGHTS, 200)
    with pytest.raises(ConfigError, match="empties the global pool"):
        check_reachable(PrunePlan({}, ("fc1", "fc2", "out"), 0.9), WEIGHTS, 200)
    # the paper's schedule is fine: 15 levels at 20% (10% for the output layer)
    check_reachable(PrunePlan({"fc1": 0.2, "fc2": 0.2, "out": 0.1}), WEIGHTS, 15)


def test_nan_scores_never_revive_pruned_weights():
    from lottery.pruning.prune import keep_top

    scores = jnp.array([jnp.nan, 0.5, 1.0, 2.0])
    mask = jnp.array([1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(keep_top(scores, mask, 1, TIES), [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(keep_top(scores, mask, 2, TIES), [1.0, 1.0, 0.0, 0.0])
