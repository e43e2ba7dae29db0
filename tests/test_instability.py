"""Instability analysis: the error barrier on the line between two trained copies, on its
own (`lottery.instability`) and as the engine's `instability` branch."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

import helpers
from lottery import imp
from lottery.instability import POINTS, barrier, interpolation_errors, recompute_statistics
from lottery.record import load
from lottery.state import Network

R = 2


@pytest.fixture(scope="module")
def parts():
    return helpers.setup(helpers.run_config())


@pytest.fixture(scope="module")
def errors_between(parts):
    test = parts.trainer.eval_data[1]
    return jax.jit(lambda a, b: interpolation_errors(parts.model, a, b, test))


@pytest.fixture(scope="module")
def trained(parts):
    """Three trained LeNets (80 steps): 0 and 1 from the same init with the same data key,
    2 from another init and data order."""
    trainer, model = parts.trainer, parts.model
    inits = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
    index = np.array([0, 0, 1] + [1] * (trainer.padded_size - 3))
    network = Network(*jax.tree.map(lambda x: x[index], inits))
    masks = jax.tree.map(np.ones_like, network.params)
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), trainer.padded_size))
    keys = keys.at[1].set(keys[0])
    network, masks, keys = jax.device_put((network, masks, keys), trainer.stacked)
    state = trainer.start(network, masks)
    for start in range(0, 80, parts.chunk):
        state, _ = trainer.train_chunk(state, keys, start)
    accuracy = trainer.evaluate(state.network)["test_accuracy"]
    nets = [jax.tree.map(lambda x, m=m: x[m], state.network) for m in range(3)]
    return nets, accuracy


def test_the_barrier_of_a_network_with_itself_is_zero(trained, errors_between):
    nets, _ = trained
    errors = np.asarray(errors_between(nets[2], nets[2]))
    assert errors.shape == (POINTS,)
    np.testing.assert_allclose(errors, errors[0], atol=1e-6)
    assert float(barrier(errors)) == pytest.approx(0, abs=1e-6)


def test_copies_with_the_same_data_order_and_seed_have_no_barrier(trained, errors_between):
    nets, _ = trained
    for a, b in zip(jax.tree.leaves(nets[0]), jax.tree.leaves(nets[1])):
        np.testing.assert_array_equal(a, b)  # trained identically
    assert float(barrier(errors_between(nets[0], nets[1]))) == pytest.approx(0, abs=1e-6)


def test_independent_networks_have_a_large_barrier(trained, errors_between):
    nets, accuracy = trained
    errors = np.asarray(errors_between(nets[0], nets[2]))
    assert accuracy[0] > 0.9 and accuracy[2] > 0.9  # both ends learned the task
    assert float(barrier(errors)) > 0.2
    assert errors.argmax() not in (0, POINTS - 1)  # the peak is inside the path


def test_the_end_points_are_the_networks_own_errors(trained, errors_between):
    nets, accuracy = trained
    errors = np.asarray(errors_between(nets[0], nets[2]))
    assert errors[0] == pytest.approx(1 - accuracy[0], abs=1e-6)
    assert errors[-1] == pytest.approx(1 - accuracy[2], abs=1e-6)


@pytest.fixture(scope="module")
def instability_run(tmp_path_factory):
    cfg = helpers.run_config("branches=[ticket,instability]", "rewind.step=20")
    out = tmp_path_factory.mktemp("instability") / "run"
    imp.run(cfg, out, log=lambda line: None)
    return out


def test_the_instability_branch_records_the_barrier_and_its_curve(instability_run):
    rows = load(instability_run, kind="instability")
    assert sorted(zip(rows.level, rows.replicate)) == [(lv, r) for lv in range(3) for r in range(R)]
    for row in rows.itertuples():
        assert len(row.errors) == len(row.alphas) == POINTS and row.rewind_step == 20
        assert row.barrier == pytest.approx(max(row.errors) - (row.errors[0] + row.errors[-1]) / 2)
    summaries = load(instability_run, kind="summary")
    pair = summaries[summaries.branch == "instability"].sort_values(["level", "replicate"])
    np.testing.assert_allclose(pair.barrier, rows.sort_values(["level", "replicate"]).barrier)
    assert set(summaries.branch) == {"ticket", "instability", "instability_b"}


def test_at_level_zero_the_copies_leave_the_dense_run_at_step_k(instability_run):
    evals = load(instability_run, kind="eval")
    dense = evals[evals.level == 0]
    at_k = dense[dense.step == 20].set_index(["branch", "replicate"])
    for r in range(R):  # at step k all three are the dense run's network
        for branch in ("instability", "instability_b"):
            assert at_k.loc[(branch, r), "test_loss"] == pytest.approx(
                at_k.loc[("ticket", r), "test_loss"], rel=1e-6)
    end = dense[dense.step == 40].set_index(["branch", "replicate"])
    assert any(end.loc[("instability", r), "test_loss"] != end.loc[("instability_b", r),
                                                                    "test_loss"]
               for r in range(R))  # and then differ by their data order



# -- batch norm: statistics re-estimated along the path, checked by a plain loop -------------

BN_POINTS = 5  # alpha = 0, 0.25, 0.5, 0.75, 1


@pytest.fixture(scope="module")
def bn_pair():
    """Two ResNet-20s (8x8x3 inputs, 10 classes) with different random weights, each with
    its own random running statistics, far from what the statistics batches give; those
    batches (3 of 32) and 128 test images; the engine's interpolation (5 points) with and
    without re-estimation, jitted once each (the networks and the split are arguments)."""
    from lottery.models import build_model

    model = build_model("resnet20", (8, 8, 3), 10)
    rng = np.random.default_rng(0)

    def draw(path, leaf):  # as the model's init draws (Kaiming normal, BN scale U[0, 1)),
        name, shape = path[-1].key, leaf.shape  # without compiling the init (eager: 10 s)
        if name == "kernel":
            gain = 10 if path[1].key == "fc" else 1  # wider logit margins
            return gain * rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        return {"scale": rng.uniform(0, 1, shape), "bias": np.zeros(shape),
                "mean": rng.normal(0, 0.5, shape), "var": rng.uniform(0.3, 3.0, shape)}[name]

    def network():  # (params, state)
        shapes = jax.eval_shape(model.init, jax.random.key(0))
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: draw(path, leaf).astype(np.float32), shapes)

    def images(n):  # per-image channel offsets, so that images differ after global pooling
        offsets = rng.normal(0, 2, (n, 1, 1, 3))
        return (offsets + rng.normal(0, 1, (n, 8, 8, 3))).astype(np.float32)

    a, b = network(), network()
    statistics = images(3 * 32).reshape(3, 32, 8, 8, 3)
    along = jax.jit(lambda a, b, split, batches: interpolation_errors(
        model, a, b, split, batches, points=BN_POINTS))
    without = jax.jit(lambda a, b, split: interpolation_errors(model, a, b, split,
                                                               points=BN_POINTS))
    return SimpleNamespace(model=model, a=a, b=b, statistics=statistics, inputs=images(128),
                           along=along, without=without,
                           logits=jax.jit(lambda p, s, x: model.apply(p, s, x)[0]),
                           # a fresh state dict per call (eager `apply` writes the new
                           # statistics into the state dict it is given)
                           train_step=jax.jit(lambda p, s, x: model.apply(p, s, x,
                                                                          train=True)[1]))


def _re_estimated(bn, params, state):
    """The test's own loop: training-mode passes over the statistics batches, in order."""
    for x in bn.statistics:
        state = bn.train_step(params, state, x)
    return state


def _with_bias(params, bias):
    return {**params, "fc": {**params["fc"], "bias": np.asarray(bias, np.float32)}}


def _centred(bn, params, state):
    """The fc bias that centres the network's logits on the test images (so that its
    predictions spread over the classes); the statistics do not depend on the fc layer."""
    return -np.asarray(bn.logits(_with_bias(params, np.zeros(10)), state, bn.inputs)).mean(0)


def _labelled_split(bn, params, state):
    """The test images labelled with the network's own predictions, as (x, y, weight) in 2
    batches; images whose two largest logits are within 1e-3 get weight 0 (no float tie
    decides the test)."""
    logits = np.asarray(bn.logits(params, state, bn.inputs))
    top = np.sort(logits, -1)
    y = logits.argmax(-1).astype(np.int32)
    w = (top[:, -1] - top[:, -2] > 1e-3).astype(np.float32)
    assert w.sum() > 0.9 * len(w) and len(np.unique(y)) >= 5  # varied, untied predictions
    return bn.inputs.reshape(2, 64, 8, 8, 3), y.reshape(2, 64), w.reshape(2, 64)


def _plain_error(bn, params, state, split):
    """1 - accuracy: an evaluation-mode pass over the split, weighted as the split says."""
    x, y, w = (np.concatenate(list(part)) for part in split)
    hits = (np.asarray(bn.logits(params, state, x)).argmax(-1) == y) * w
    return 1 - float(hits.sum() / w.sum())


def test_batch_norm_statistics_are_re_estimated_inside_the_path_only(bn_pair):
    """At alpha = 0.25 the error is the mixed network's with the statistics the test's loop
    re-estimates from the mixed ones; at alpha = 0 and 1 each network's own (statistics
    not re-estimated); without `statistics_batches` the inner error is another."""
    bn, alpha = bn_pair, 0.25  # not 0.5: a swapped alpha shows
    mix = lambda u, v: jax.tree.map(lambda s, t: (1 - alpha) * s + alpha * t, u, v)  # noqa: E731
    params, mixed = mix(bn.a[0], bn.b[0]), mix(bn.a[1], bn.b[1])
    state = _re_estimated(bn, params, mixed)
    for got, want, start in zip(jax.tree.leaves(recompute_statistics(
            bn.model, params, mixed, bn.statistics, jax.random.key(0))),
            jax.tree.leaves(state), jax.tree.leaves(mixed)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(want, start, atol=1e-2)  # the statistics did move

    # the inner point: both ends' fc bias centres the mixed network's logits (so does the
    # mix); labels = the mixed network's predictions with the loop's statistics
    bias = _centred(bn, params, state)
    a, b = ((_with_bias(net[0], bias), net[1]) for net in (bn.a, bn.b))
    params = _with_bias(params, bias)
    mid = _labelled_split(bn, params, state)
    expected = _plain_error(bn, params, state, mid)  # 0 by construction
    errors = np.asarray(bn.along(a, b, mid, bn.statistics))
    assert errors[1] == pytest.approx(expected, abs=1e-6)  # alphas[1] = 0.25
    # with the averaged statistics (no re-estimation) the predictions are others
    assert float(bn.without(a, b, mid)[1]) > expected + 0.3
    assert _plain_error(bn, params, mixed, mid) > expected + 0.3

    # the ends: each network with its own statistics, labelled by its own predictions
    for end, net in ((0, bn.a), (-1, bn.b)):
        net = (_with_bias(net[0], _centred(bn, *net)), net[1])
        split = _labelled_split(bn, *net)
        own = _plain_error(bn, *net, split)
        pair = (net, bn.b) if end == 0 else (bn.a, net)
        assert np.asarray(bn.along(*pair, split, bn.statistics))[end] == pytest.approx(
            own, abs=1e-6)
        # re-estimated there, the statistics would give other predictions
        assert _plain_error(bn, net[0], _re_estimated(bn, *net), split) > own + 0.3
