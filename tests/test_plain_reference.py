"""The engine's run against an independent reference: every saved number recomputed in the
test from the specification, by a plain JAX loop (tests/plain_loop.py) and numpy.

One run of IMP with late rewinding (k = 10 of 40 steps), a learning-rate schedule (linear
warmup over 20 steps, x0.1 at step 30), L2 weight decay, two levels, the ticket only, the
trained ticket of every level saved (`train.save_weights`). Checked against it:

- the rewind point (`rewind.npz`): a plain loop's weights after k steps from the member's
  init, Adam written with optax, masks of ones, the batches of the member's data key;
- each level's masks (`levels/level_NN.npz`): the top |w| of the previous level's trained
  ticket (`levels/trained_NN.npz`) among its survivors, layer by layer, at exact counts,
  computed in numpy;
- each level's trained ticket: the plain loop from the rewind point under those masks, at
  the learning rates of global steps k..T-1 (a hand-written schedule), on the batches of
  that level's data key; pruned weights exactly zero through Adam and weight decay.
The data order needs no test of its own here: each level's plain loop draws its batches by
`batch_indices(key, steps, n, batch)` with the member's derived key, so a wrong key, step
offset or order makes the weights differ (the last test shows by how much).
"""

import jax
import numpy as np
import pytest

import helpers
from helpers import LAYERS, WEIGHTS, expected_counts, load_npz
from lottery import imp
from lottery.data import load_dataset
from lottery.models import build_model
from plain_loop import data_key, flat, hand_schedule, initial_weights, ones_like, plain_training

R, K, T, LEVELS, SEED = 2, 10, 40, 2, 0
WARMUP, MILESTONE, DECAY = 20, 30, 0.01
OVERRIDES = ("branches=[ticket]", "train.save_weights=true", f"rewind.step={K}",
             f"optimizer.warmup={WARMUP}", f"optimizer.milestones=[{MILESTONE}]",
             f"optimizer.weight_decay={DECAY}")
# float32 training, fused differently by XLA in the engine (scan, shard_map, vmap) and here:
# every weight agrees to RTOL/ATOL but a rare few (measured: at most 2 of fc1's 235,200 per
# member; Adam divides by the root of the squared gradients, which magnifies the rounding
# of a gradient near zero), and those to MAX_ABS, a tenth of one Adam step at the full rate
# (1.2e-3). A wrong schedule or data order moves most weights by far more (last test).
RTOL, ATOL, OUTLIERS, MAX_ABS = 1e-5, 1e-7, 1e-4, 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = helpers.run_config(*OVERRIDES)
    assert (cfg.replicates, cfg.rewind.step, cfg.train.steps, cfg.prune.levels, cfg.seed) == (
        R, K, T, LEVELS, SEED)
    out = tmp_path_factory.mktemp("plain_reference") / "run"
    imp.run(cfg, out, log=lambda line: None)
    return cfg, out


@pytest.fixture(scope="module")
def reference(run):
    """The data, the model and the hand-written schedule of the run's config."""
    cfg, _ = run
    options = {key: value for key, value in cfg.dataset.items() if key != "name"}
    data = load_dataset(cfg.dataset["name"], **options)
    model = build_model(cfg.model["name"], data.input_shape, data.num_classes)
    opt = cfg.optimizer
    assert (opt["name"], opt["warmup"], list(opt["milestones"]), opt["weight_decay"]) == (
        "adam", WARMUP, [MILESTONE], DECAY)
    schedule = hand_schedule(opt["lr"], WARMUP, (MILESTONE,), opt["gamma"])
    return data, model, schedule, cfg.train.batch_size


def train_plain(reference, start, masks, level, replicate, steps, schedule=None, key_level=None):
    data, model, own_schedule, batch = reference
    key = data_key(SEED, R, level if key_level is None else key_level, "ticket", replicate)
    return plain_training(model, data, start, masks, key, steps, batch,
                          schedule or own_schedule, DECAY)


def replicate_masks(saved: dict, r: int) -> dict:
    """Replicate r's masks from a level file ({"fc1/kernel": (R, ...)}) as a params tree."""
    tree = {}
    for name, value in saved.items():
        layer, leaf = name.split("/")
        tree.setdefault(layer, {})[leaf] = value[r]
    return tree


@pytest.fixture(scope="module")
def plain(run, reference):
    """Per replicate, the plain loop's weights: at the rewind point, and each level's
    trained ticket (levels >= 1 from the rewind point under the run's saved masks)."""
    _, out = run
    _, model, _, _ = reference
    result = []
    for r in range(R):
        init = initial_weights(model, SEED, R, r)
        full = ones_like(init[0])
        rewind = train_plain(reference, init, full, 0, r, range(0, K))
        trained = [train_plain(reference, init, full, 0, r, range(0, T))]
        for level in range(1, LEVELS + 1):
            masks = replicate_masks(load_npz(out / "levels" / f"level_{level:02d}.npz"), r)
            trained.append(train_plain(reference, rewind, masks, level, r, range(K, T)))
        result.append({"rewind": rewind, "trained": trained})
    return result


def mismatched(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return ~np.isclose(got, want, rtol=RTOL, atol=ATOL)


def assert_close(saved: dict, expected: dict, r: int, what: str):
    assert saved.keys() == expected.keys(), what
    for name, want in expected.items():
        got = saved[name][r]
        message = f"{what}: {name}, replicate {r}"
        assert mismatched(got, want).sum() <= OUTLIERS * got.size, message
        np.testing.assert_allclose(got, want, rtol=0, atol=MAX_ABS, err_msg=message)


def test_the_rewind_point_is_the_plain_loops_weights_after_k_steps(run, reference, plain):
    _, out = run
    _, model, _, _ = reference
    saved = load_npz(out / "rewind.npz")
    for r in range(R):
        assert_close(saved, flat(plain[r]["rewind"][0], "params"), r, "rewind")
        init = initial_weights(model, SEED, R, r)
        for layer in LAYERS:  # k steps did move the weights (the warmup starts at rate 0)
            moved = saved[f"params/{layer}/kernel"][r] != init[0][layer]["kernel"]
            assert moved.mean() > 0.5


def top_magnitudes(weights: np.ndarray, survivors: np.ndarray, count: int) -> np.ndarray:
    """The `count` survivors of largest |w|, as a bool array like `weights`."""
    score = np.where(survivors, np.abs(weights), -np.inf).ravel()
    keep = np.zeros(score.size, bool)
    keep[np.argsort(-score, kind="stable")[:count]] = True
    assert np.isfinite(score[keep]).all()
    return keep.reshape(weights.shape)


def test_each_levels_masks_are_the_top_magnitudes_of_the_last_trained_ticket(run):
    cfg, out = run
    rate = cfg.resolved["prune"]["rate"]
    assert cfg.resolved["prune"]["scope"] == "layerwise" and not cfg.resolved["prune"][
        "layer_rates"]
    survivors = {layer: np.ones((R, *shape), bool) for layer, shape in
                 {"fc1": (784, 300), "fc2": (300, 100), "out": (100, 10)}.items()}
    for level in range(1, LEVELS + 1):
        trained = load_npz(out / "levels" / f"trained_{level - 1:02d}.npz")
        masks = load_npz(out / "levels" / f"level_{level:02d}.npz")
        assert set(masks) == {f"{layer}/{leaf}" for layer in LAYERS for leaf in ("kernel", "bias")}
        for layer in LAYERS:
            count = expected_counts(WEIGHTS[layer], rate, level)[level]
            for r in range(R):
                weights = trained[f"params/{layer}/kernel"][r]
                expected = top_magnitudes(weights, survivors[layer][r], count)
                assert expected.sum() == count
                np.testing.assert_array_equal(masks[f"{layer}/kernel"][r], expected,
                                              err_msg=f"level {level} {layer} replicate {r}")
            assert masks[f"{layer}/bias"].all()
            survivors[layer] = masks[f"{layer}/kernel"]


def test_pruned_weights_stay_exactly_zero_through_adam_and_weight_decay(run):
    _, out = run
    for level in range(1, LEVELS + 1):
        masks = load_npz(out / "levels" / f"level_{level:02d}.npz")
        trained = load_npz(out / "levels" / f"trained_{level:02d}.npz")
        for layer in LAYERS:
            mask, weights = masks[f"{layer}/kernel"], trained[f"params/{layer}/kernel"]
            assert (~mask).any() and mask.any()
            assert (weights[~mask] == 0).all(), (level, layer)
            assert (weights[mask] != 0).mean() > 0.999, (level, layer)  # survivors live
            assert (trained[f"params/{layer}/bias"] != 0).mean() > 0.9  # biases never pruned


def test_each_levels_trained_ticket_is_the_plain_loops(run, plain):
    """Level 0 from the init over steps 0..T-1; levels >= 1 from the rewind point under
    their masks over steps k..T-1 at the schedule's rates of those global steps (warmup
    half done at k, x0.1 from step 30), each with its own data key, a fresh Adam state,
    weight decay: the engine's trained tickets equal the plain loop's."""
    _, out = run
    for level in range(LEVELS + 1):
        saved = load_npz(out / "levels" / f"trained_{level:02d}.npz")
        for r in range(R):
            assert_close(saved, flat(plain[r]["trained"][level][0], "params"), r,
                         f"trained level {level}")


def test_the_plain_loop_tells_a_wrong_schedule_or_data_order_apart(run, reference, plain):
    """The comparisons above can fail: level 1 trained at the schedule restarted from 0
    at the rewind point (the optimizer's own step count), or on level 0's data order,
    differs from the engine's ticket by far more than the tolerance."""
    _, out = run
    saved = load_npz(out / "levels" / "trained_01.npz")["params/fc2/kernel"][0]
    masks = replicate_masks(load_npz(out / "levels" / "level_01.npz"), 0)
    rewind = plain[0]["rewind"]
    _, _, schedule, _ = reference
    restarted = train_plain(reference, rewind, masks, 1, 0, range(K, T),
                            schedule=lambda step: schedule(step - K))
    other_order = train_plain(reference, rewind, masks, 1, 0, range(K, T), key_level=0)
    assert mismatched(saved, plain[0]["trained"][1][0]["fc2"]["kernel"]).mean() <= OUTLIERS
    for wrong in (restarted, other_order):
        off = mismatched(saved, wrong[0]["fc2"]["kernel"])
        assert off.mean() > 0.5  # most weights, where the test allows 1 in 10,000
        assert np.abs(saved - wrong[0]["fc2"]["kernel"]).max() > 10 * MAX_ABS
