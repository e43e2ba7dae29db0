"""Instability analysis: the error barrier on the line between two trained copies, on its
own (`lottery.instability`) and as the engine's `instability` branch."""

import jax
import numpy as np
import pytest

import helpers
from lottery import imp
from lottery.instability import POINTS, barrier, interpolation_errors
from lottery.record import load

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
    params, model_state = jax.tree.map(lambda x: x[index], inits)
    masks = jax.tree.map(np.ones_like, params)
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), trainer.padded_size))
    keys = keys.at[1].set(keys[0])
    put = jax.device_put((params, model_state, masks, keys), trainer.stacked)
    state = trainer.start(*put[:3])
    for start in range(0, 80, parts.chunk):
        state, _ = trainer.train_chunk(state, put[3], start)
    accuracy = trainer.evaluate(state[0], state[1])["test_accuracy"]
    nets = [jax.tree.map(lambda x, m=m: x[m], (state[0], state[1])) for m in range(3)]
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
