"""N:M structured sparsity (`prune.structure=nm`): the keep rule, its ties, the controls,
gradual pruning's N':M states, a 2:4 IMP level, the compressed layout and the config's
refusals. Expected masks come from NumPy written here (per group, `np.argsort`) and from
jaxpruner's N:M rule ported as a few lines; bytes from hand counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from lottery.config import ConfigError
from lottery.models import build_model
from lottery.pruning.nm import compress, decompress, index_bits, layout_bytes
from lottery.pruning.prune import Counts, PrunePlan, keep_counts
from lottery.pruning.schedules import gradual_pruning
from lottery.pruning.units import NM
from lottery.record import load
from lottery.record.arrays import level_file, load_arrays, trained_file
from lottery.setup import _units

LAYERS = ("fc1", "fc2", "out")


def distinct_scores(shape, seed=0):
    """Scores with no ties (a permutation of 1..size), signs mixed as weights' are."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    return (rng.permutation(size) + 1.0).reshape(shape) * rng.choice([-1, 1], shape)


def grouped(x, m):
    """(..., in, out) -> (..., out, in / m, m): each group of m inputs on the last axis."""
    x = np.moveaxis(np.asarray(x), -2, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def reference(scores, n, m):
    """The N:M mask by hand: in each group of m consecutive inputs (axis -2, for each output
    and position), the n highest scores by `np.argsort`."""
    s = np.moveaxis(np.asarray(scores), -2, -1)
    keep = np.zeros(s.shape, bool)
    for index in np.ndindex(*s.shape[:-1]):
        for start in range(0, s.shape[-1], m):
            keep[index][start + np.argsort(-s[index][start:start + m])[:n]] = True
    return np.moveaxis(keep, -1, -2)


def jaxpruner_rule(scores, n, m, axis):
    """jaxpruner's N:M rule (google-research/jaxpruner, jaxpruner/mask_calculator.py,
    `topk_n_by_m_mask_calculator`), restated: cut `axis` into groups of m, rank each group's
    entries ascending by argsort of the argsort, keep the ranks >= m - n."""
    s = np.moveaxis(np.asarray(scores), axis, -1)
    s = s.reshape(*s.shape[:-1], -1, m)
    keep = s.argsort(axis=-1).argsort(axis=-1) >= m - n
    return np.moveaxis(keep.reshape(*keep.shape[:-2], -1), -1, axis)


def engine(scores, n, m, base=None, key=0):
    """The engine's keep of an N:M plan's layer (`keep_counts`), at the level's count."""
    scores = jnp.asarray(scores, jnp.float32)
    base = jnp.ones_like(scores) if base is None else jnp.asarray(base, jnp.float32)
    plan = PrunePlan({"k": 1 - n / m}, nm=(n, m))
    count = plan.counts({"k": scores.shape}, 1)[1]
    return np.asarray(keep_counts(plan, {"k": scores}, {"k": base}, count,
                                  jax.random.key(key))["k"]) > 0


def per_group(mask, m):
    return grouped(mask, m).sum(axis=-1)


SHAPES = [(8, 4), (3, 3, 8, 6)]  # a Dense kernel (in, out), a Conv kernel (h, w, in, out)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_masks_keep_the_n_best_of_every_m_inputs(shape, n, m):
    scores = np.abs(distinct_scores(shape))
    mask = engine(scores, n, m)
    np.testing.assert_array_equal(mask, reference(scores, n, m))
    assert np.all(per_group(mask, m) == n)
    plan = PrunePlan({"k": 0.5}, nm=(n, m))
    assert [int(c.layers["k"]) for c in plan.counts({"k": shape}, 1)] == [
        np.prod(shape), np.prod(shape) // m * n]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4)])
def test_masks_agree_with_jaxpruners_rule(shape, n, m):
    scores = distinct_scores(shape, seed=3)
    np.testing.assert_array_equal(engine(scores, n, m), jaxpruner_rule(scores, n, m, axis=-2))


def test_equal_scores_keep_n_chosen_at_random_not_by_position():
    kept = np.stack([engine(np.ones((4, 16)), 2, 4, key=key) for key in range(8)])
    assert np.all(kept.sum(axis=1) == 2)  # 16 groups x 8 keys, each keeping exactly 2
    pairs = {tuple(np.flatnonzero(kept[k, :, j])) for k in range(8) for j in range(16)}
    assert len(pairs) == 6  # every pair of the 4 positions is chosen somewhere
    assert np.mean(kept[:, :2].all(axis=1)) < 0.5  # not the first positions


def test_nan_ranks_below_every_number_and_pruned_weights_last():
    scores = np.array([[np.nan, -3.0, np.nan, 0.5, 0.1, 0.2, 9.0, 8.0, 9.0, 1.0, 3.0, 2.0]]).T
    base = np.array([[1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]]).T
    mask = engine(scores, 2, 4, base)[:, 0]
    assert mask.astype(int).tolist() == [0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    # a group of NaNs and one number keeps the number and one NaN, never a pruned weight
    for key in range(4):
        mask = engine(np.array([[np.nan, np.nan, -np.inf, np.nan]]).T, 2, 4,
                      np.array([[1, 1, 1, 0]]).T, key)[:, 0]
        assert mask[2] and mask.sum() == 2 and not mask[3]


def test_controls_draw_random_nm_masks_among_the_candidates():
    units = NM(("k",), 2, 4)
    ticket = {"k": jnp.asarray(engine(np.abs(distinct_scores((16, 6))), 2, 4), jnp.float32)}
    candidates = np.ones((16, 6), np.float32)
    candidates[0, :] = candidates[5, 2:] = candidates[10, 1] = 0  # each group keeps >= 3
    draws = [np.asarray(units.random_like(jax.random.key(k), ticket,
                                          {"k": jnp.asarray(candidates)})["k"]) for k in range(3)]
    for draw in draws:
        assert np.all(per_group(draw, 4) == 2)
        assert np.all(draw[candidates == 0] == 0)
        assert not np.array_equal(draw, ticket["k"])
    assert not np.array_equal(draws[0], draws[1])
    shuffled = np.asarray(units.shuffled(jax.random.key(0), ticket)["k"])
    assert np.all(per_group(shuffled, 4) == 2) and not np.array_equal(shuffled, ticket["k"])


def test_gradual_pruning_steps_through_n_prime_m_states():
    units, plan = NM(("fc1", "fc2"), 2, 4), PrunePlan({"fc1": 0.5, "fc2": 0.5}, nm=(2, 4))
    shapes = {"fc1": (16, 8), "fc2": (8, 4)}
    params = {layer: {"kernel": jnp.asarray(distinct_scores(shape, i), jnp.float32)}
              for i, (layer, shape) in enumerate(shapes.items())}
    counts = plan.counts(shapes, 1)
    step = jax.jit(gradual_pruning(units, plan, counts[0], 0, 30, 10))
    masks = jax.tree.map(jnp.ones_like, params)
    states = []
    for t in range(40):
        masks = step(params, masks, t, {"counts": counts[1]}, jax.random.key(0))
        if t % 10 == 0:
            for layer in shapes:
                kept = per_group(masks[layer]["kernel"], 4)
                assert np.all(kept == kept.flat[0])  # every group at the same N'
            states.append(int(kept.flat[0]))
    assert states == [4, 3, 2, 2]  # cubic: 4 + ... -> 2.59 -> 2.07 -> 2, rounded per group
    np.testing.assert_array_equal(masks["fc1"]["kernel"] > 0,
                                  reference(np.abs(params["fc1"]["kernel"]), 2, 4))


def test_compressed_layout_round_trips_and_counts_its_bytes():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(8, 4)).astype(np.float32)
    mask = engine(np.abs(kernel), 2, 4)
    packed = compress(kernel, mask, 2, 4)
    assert packed.values.shape == (4, 4) and packed.values.dtype == np.float32
    assert packed.values.nbytes == 16 * 4 and packed.indices.nbytes == 16 * 2 // 8
    assert packed.nbytes == 68 == layout_bytes(16, 4) and kernel.nbytes == 128
    np.testing.assert_array_equal(decompress(packed), np.where(mask, kernel, 0))
    # positions 1 and 3 of one group: 2 bits each, little-endian: 0b11_01 = 13
    one = compress(np.array([[5.0], [6], [7], [8]], np.float32), np.array([[0, 1, 0, 1]]).T, 2, 4)
    assert one.values.ravel().tolist() == [6, 8] and one.indices.tolist() == [13]
    conv = rng.normal(size=(3, 3, 16, 5)).astype(np.float32)
    mask = engine(np.abs(conv), 3, 8)
    packed = compress(conv, mask, 3, 8)
    assert index_bits(8) == 3 and packed.indices.nbytes == -(-3 * 3 * 6 * 5 * 3 // 8)
    np.testing.assert_array_equal(decompress(packed), np.where(mask, conv, 0))
    with pytest.raises(ValueError, match="not 2:4"):
        compress(kernel, np.ones_like(kernel), 2, 4)


def kernel(arrays, layer):
    """Replicate 0's kernel of `layer` in a level file (masks) or a weights file."""
    return arrays.get(f"{layer}/kernel", arrays.get(f"params/{layer}/kernel"))[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2:4 IMP level of a small LeNet (64, 32 and 16 inputs) with its controls."""
    cfg = helpers.run_config(
        "prune.structure=nm", "prune.levels=1", "replicates=1", "dataset.shape=[8,8,1]",
        "model.hidden=[32,16]", "train.steps=20", "train.eval_every=10",
        "branches=[ticket,random_prune,inverted,shuffle]", "train.save_weights=true")
    out = tmp_path_factory.mktemp("nm") / "run"
    helpers.spied_run(cfg, out)
    return out


def test_a_2_4_imp_level_keeps_its_pattern_through_training(run):
    dense, trained = load_arrays(trained_file(run, 0)), load_arrays(trained_file(run, 1))
    masks = {b: load_arrays(level_file(run, 1, b)) for b in
             ("ticket", "random_prune", "inverted", "shuffle")}
    for layer in LAYERS:
        ticket = kernel(masks["ticket"], layer) > 0
        np.testing.assert_array_equal(ticket, reference(np.abs(kernel(dense, layer)), 2, 4))
        assert np.all(kernel(trained, layer)[~ticket] == 0)
        assert np.mean(kernel(trained, layer)[ticket] != 0) > 0.9
        np.testing.assert_array_equal(kernel(masks["inverted"], layer) > 0,
                                      reference(-np.abs(kernel(dense, layer)), 2, 4))
        for branch, mask in masks.items():
            assert np.all(per_group(kernel(mask, layer), 4) == 2), (branch, layer)
        assert not np.array_equal(kernel(masks["random_prune"], layer) > 0, ticket)
    summary = load(run, kind="summary")
    ticket = summary[summary.branch == "ticket"].set_index("level")
    assert ticket.loc[1, "density"] == 0.5
    assert ticket.loc[1, "nm_bytes"] == sum(
        compress(kernel(trained, layer), kernel(masks["ticket"], layer), 2, 4).nbytes
        for layer in LAYERS)
    weights = 64 * 32 + 32 * 16 + 16 * 10
    assert ticket.loc[1, "nm_bytes"] == weights // 2 * 4 + weights // 2 * 2 // 8
    assert set(summary.dense_bytes) == {weights * 4}
    assert ticket.loc[0, "nm_bytes"] == weights * 4 + weights * 2 // 8  # dense: 4:4


@pytest.mark.parametrize("overrides, message", [
    (["prune.nm=[2,8]"], r"prune\.nm=\[2,8\] .* layer fc2 has 300 inputs, not a multiple of 8"),
    (["model=conv2", "dataset.shape=[8,8,3]"],
     r"layer convs\.0 has 3 inputs, not a multiple of 4: leave it dense with "
     r"\+prune\.layer_rates\.convs\.0=0"),
    (["prune.scope=global"], r"prune\.scope=global .* use prune\.scope=layerwise"),
    (["prune.scope=erk"], r"prune\.scope=erk"),
    (["prune.levels=2"], r"prune\.levels=2: .* use prune\.levels=1"),
    (["+prune.layer_rates.out=0.1"], r"prune\.layer_rates gives out the rate 0\.1"),
])
def test_configs_nm_cannot_run_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        helpers.run_config("prune.structure=nm", "prune.levels=1", *overrides)
    assert "\n" not in str(error.value)


def test_a_layer_left_dense_needs_no_groups():
    cfg = helpers.run_config("prune.structure=nm", "prune.levels=1", "prune.nm=[2,8]",
                             "+prune.layer_rates.fc2=0", "+prune.layer_rates.out=0")
    plan, units, measured = _units(cfg, build_model("lenet_300_100", (28, 28, 1), 10))
    assert plan == PrunePlan({"fc1": 0.75}, nm=(2, 8)) and units == NM(("fc1",), 2, 8)
    assert measured == LAYERS  # the density counts the layers left dense, as for weights
