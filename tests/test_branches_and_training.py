"""How each branch starts a level (`lottery.level_start`), the compiled training step under
masks (`Trainer`), one compilation per run, and determinism."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

import helpers
from helpers import BRANCHES, LAYERS, METRICS, WEIGHTS, expected_counts, host
from lottery import imp
from lottery.record import load
from lottery.optim import Optimizer, OptimizerError, build_optimizer
from lottery.state import Network
from lottery.train import Trainer

R = 2  # replicates of the TINY config; member m = branch_index * R + replicate


@pytest.fixture(scope="module")
def parts():
    """Data, model, plan and trainer of the TINY config, built as `imp.run` builds them (so
    the programs are the ones the session's runs compile)."""
    return helpers.setup(helpers.run_config())


@pytest.fixture(scope="module")
def programs(parts):
    assert parts.layout.branches == BRANCHES
    return parts.programs


@pytest.fixture(scope="module")
def init_stack(parts):
    """Stacked fresh (params, model state), placed like the engine's trained ticket."""
    init = jax.jit(jax.vmap(parts.model.init), out_shardings=parts.trainer.replicated)

    def init_stack(seed_or_keys):
        if isinstance(seed_or_keys, int):
            seed_or_keys = jax.random.split(jax.random.key(seed_or_keys), R)
        return init(seed_or_keys)

    return init_stack


@pytest.fixture(scope="module")
def start(parts, programs, init_stack):
    """Level 0 (rates scaled by 0) and level 1 started from a stand-in trained ticket."""
    rewind, full = programs.initial(0)
    assert rewind.model_state == {}  # LeNet-300-100 has no batch norm: no model state
    trained = init_stack(123)[0]
    level0 = programs.begin(0, 0, parts.counts[0], rewind, full, rewind)
    level1 = programs.begin(0, 1, parts.counts[1], Network(trained, rewind.model_state), full,
                            rewind)
    return dict(rewind=host(rewind.params), full=host(full), trained=host(trained),
                level0=host(level0), level1=host(level1),
                alive0=host(programs.measure(level0.masks)[0]),
                alive1=host(programs.measure(level1.masks)[0]))


def member(tree, branch, replicate):
    m = BRANCHES.index(branch) * R + replicate
    return jax.tree.map(lambda x: x[m], tree)


def replicate_of(tree, r):
    return jax.tree.map(lambda x: x[r], tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def counts(masks):
    return {layer: int(masks[layer]["kernel"].sum()) for layer in LAYERS}


# ---------------------------------------------------------------- branches (level_programs)


def test_stack_is_branch_major_and_padded_to_the_devices(start, parts):
    begun, alive = start["level1"], start["alive1"]
    ticket_masks, params, masks, keys = begun.ticket_masks, begun.network.params, begun.masks, begun.keys
    assert parts.trainer.stack_size == 6
    assert parts.trainer.padded_size % len(jax.devices()) == 0
    for tree in (params, masks):
        for leaf in jax.tree.leaves(tree):
            assert leaf.shape[0] == parts.trainer.padded_size
    assert ticket_masks["fc1"]["kernel"].shape == (R, 784, 300)
    assert {layer: a.shape for layer, a in alive.items()} == {
        layer: (parts.trainer.padded_size,) for layer in LAYERS}
    data = keys  # raw key data (helpers.host)
    assert len({row.tobytes() for row in data[:6]}) == 6  # every member shuffles on its own


def test_ticket_masks_prune_the_trained_ticket_at_the_plan_rates(start):
    ticket_masks = start["level1"].ticket_masks
    for r in range(R):
        masks, trained = replicate_of(ticket_masks, r), replicate_of(start["trained"], r)
        assert counts(masks) == {layer: expected_counts(WEIGHTS[layer], rate, 1)[1]
                                 for layer, rate in {"fc1": 0.2, "fc2": 0.2, "out": 0.2}.items()}
        for layer in LAYERS:
            m, w = masks[layer]["kernel"], np.abs(trained[layer]["kernel"])
            assert w[m == 1].min() >= w[m == 0].max()
            assert np.all(masks[layer]["bias"] == 1)
    assert not np.array_equal(ticket_masks["fc1"]["kernel"][0], ticket_masks["fc1"]["kernel"][1])


def test_ticket_starts_from_rewind_weights_under_its_masks(start):
    begun, alive = start["level1"], start["alive1"]
    ticket_masks, params, masks = begun.ticket_masks, begun.network.params, begun.masks
    for r in range(R):
        tm = replicate_of(ticket_masks, r)
        assert_trees_equal(member(masks, "ticket", r), tm)
        expected = jax.tree.map(lambda w, m: w * m, replicate_of(start["rewind"], r), tm)
        assert_trees_equal(member(params, "ticket", r), expected)
        assert {layer: int(alive[layer][r]) for layer in LAYERS} == counts(tm)


def test_reinit_has_ticket_masks_on_fresh_weights(start):
    begun = start["level1"]
    ticket_masks, params, masks = begun.ticket_masks, begun.network.params, begun.masks
    for r in range(R):
        tm = replicate_of(ticket_masks, r)
        assert_trees_equal(member(masks, "reinit", r), tm)
        p, rewind = member(params, "reinit", r), replicate_of(start["rewind"], r)
        for layer in LAYERS:
            m, w, w0 = tm[layer]["kernel"], p[layer]["kernel"], rewind[layer]["kernel"]
            assert np.all(w[m == 0] == 0)
            assert np.mean(w[m == 1] == w0[m == 1]) < 1e-3
            # same init distribution (Gaussian Glorot): same scale as the rewind weights
            assert np.std(w[m == 1]) == pytest.approx(np.std(w0[m == 1]), rel=0.1)
    a = member(params, "reinit", 0)["fc2"]["kernel"]
    b = member(params, "reinit", 1)["fc2"]["kernel"]
    assert not np.array_equal(a, b)


def test_random_prune_has_ticket_counts_but_other_masks(start):
    begun, alive = start["level1"], start["alive1"]
    ticket_masks, params, masks = begun.ticket_masks, begun.network.params, begun.masks
    for r in range(R):
        tm, rm = replicate_of(ticket_masks, r), member(masks, "random_prune", r)
        assert counts(rm) == counts(tm)
        m = BRANCHES.index("random_prune") * R + r
        assert {layer: int(alive[layer][m]) for layer in LAYERS} == counts(tm)
        for layer in LAYERS:
            assert not np.array_equal(rm[layer]["kernel"], tm[layer]["kernel"])
            assert np.all(rm[layer]["bias"] == 1)
        expected = jax.tree.map(lambda w, k: w * k, replicate_of(start["rewind"], r), rm)
        assert_trees_equal(member(params, "random_prune", r), expected)
    a = member(masks, "random_prune", 0)["fc1"]["kernel"]
    b = member(masks, "random_prune", 1)["fc1"]["kernel"]
    assert not np.array_equal(a, b)


def test_level_zero_is_dense_for_every_branch(start):
    begun, alive = start["level0"], start["alive0"]
    ticket_masks, params, masks = begun.ticket_masks, begun.network.params, begun.masks
    for leaf in jax.tree.leaves((ticket_masks, masks)):
        assert np.all(leaf == 1)
    assert {layer: a[:6].tolist() for layer, a in alive.items()} == {
        layer: [WEIGHTS[layer]] * 6 for layer in LAYERS}
    for r in range(R):
        rewind = replicate_of(start["rewind"], r)
        assert_trees_equal(member(params, "ticket", r), rewind)
        assert_trees_equal(member(params, "random_prune", r), rewind)
        fresh = member(params, "reinit", r)["fc1"]["kernel"]
        assert np.mean(fresh == rewind["fc1"]["kernel"]) < 1e-3


def test_initial_weights_come_from_the_member_seeds(start, init_stack):
    from lottery.seeds import member_keys

    keys = member_keys(0, R, 0, "ticket", "init")
    assert_trees_equal(start["rewind"], host(init_stack(keys)[0]))
    # replicate r's keys do not depend on how many replicates run beside it
    for other in (1, 3):
        np.testing.assert_array_equal(
            host(member_keys(0, other, 0, "ticket", "init"))[0], host(keys)[0])
    assert not np.array_equal(host(member_keys(1, R, 0, "ticket", "init")), host(keys))


def test_begin_is_deterministic_and_compiled_once(parts, programs, start, init_stack):
    begin, initial = programs.begin, programs.initial
    rewind, full = initial(0)
    trained = Network(init_stack(123)[0], rewind.model_state)
    again = host(begin(0, 1, parts.counts[1], trained, full, rewind))
    assert_trees_equal(again, start["level1"])
    other_seed = host(begin(1, 1, parts.counts[1], trained, full, rewind))
    # same trained ticket, same masks; other reinit weights
    assert_trees_equal(other_seed.ticket_masks, start["level1"].ticket_masks)
    assert not np.array_equal(other_seed.network.params["fc2"]["kernel"][2],
                              start["level1"].network.params["fc2"]["kernel"][2])
    assert begin._cache_size() == 1
    assert initial._cache_size() == 1


# ---------------------------------------------------------------- training under masks


@pytest.fixture(scope="module")
def trained(parts, programs, init_stack):
    """Level 1's stack (masks with 20% zeros) trained for two chunks (40 steps)."""
    rewind, full = programs.initial(0)
    trained_ticket = init_stack(5)[0]
    begun = programs.begin(0, 1, parts.counts[1], Network(trained_ticket, rewind.model_state),
                           full, rewind)
    before = host(begun.network.params)
    state = parts.trainer.start(begun.network, begun.masks)
    before_eval = parts.trainer.evaluate(state.network)
    state, loss_first = parts.trainer.train_chunk(state, begun.keys, 0)
    state, loss_second = parts.trainer.train_chunk(state, begun.keys, parts.chunk)
    return dict(before=before, masks=host(begun.masks), params=host(state.params),
                opt_state=host(state.opt_state), loss_first=np.asarray(loss_first),
                loss_second=np.asarray(loss_second), before_eval=before_eval,
                after_eval=parts.trainer.evaluate(state.network))


def test_pruned_weights_and_adam_moments_stay_exactly_zero(trained):
    adam = trained["opt_state"].inner_state[0]
    assert isinstance(adam, optax.ScaleByAdamState)
    assert np.all(adam.count == 40)
    for layer in LAYERS:
        m = trained["masks"][layer]["kernel"]
        assert (m == 0).any() and (m == 1).any()
        for name, tree in (("params", trained["params"]), ("mu", adam.mu), ("nu", adam.nu)):
            assert np.all(tree[layer]["kernel"][m == 0] == 0), (name, layer)
        assert np.mean(adam.nu[layer]["kernel"][m == 1] != 0) > 0.5
        moved = trained["params"][layer]["kernel"] != trained["before"][layer]["kernel"]
        assert np.mean(moved[m == 1]) > 0.5  # surviving weights do train
        assert np.mean(trained["params"][layer]["bias"] != 0) > 0.9  # biases are never masked


def test_training_lowers_the_loss(trained, parts):
    n = parts.trainer.stack_size
    assert trained["loss_first"].shape == (parts.trainer.padded_size,)
    assert np.all(trained["loss_second"][:n] < trained["loss_first"][:n])
    for metric in METRICS:
        assert trained["after_eval"][metric].shape == (n,)
    assert np.all(trained["after_eval"]["val_loss"] < trained["before_eval"]["val_loss"])
    assert np.all(trained["after_eval"]["val_accuracy"] > trained["before_eval"]["val_accuracy"])


def test_train_chunk_compiles_once(trained, parts):
    assert parts.trainer._train._cache_size() == 1
    assert parts.trainer._opt_init._cache_size() == 1


def test_padding_repeats_the_last_member(parts):
    trainer = Trainer(parts.model, build_optimizer("adam", 1e-3, steps_per_epoch=1), parts.data, 20, 20, 3)
    devices = len(jax.devices())
    assert trainer.padded_size == -(-3 // devices) * devices
    padded = np.asarray(trainer.pad(np.arange(3.0)))
    assert padded.tolist() == [0.0, 1.0, 2.0] + [2.0] * (trainer.padded_size - 3)


def test_trainer_refuses_a_batch_larger_than_the_training_set(parts):
    with pytest.raises(ValueError, match="batch_size=601 exceeds the 600 training examples"):
        Trainer(parts.model, build_optimizer("adam", 1e-3, steps_per_epoch=1), parts.data, 601, 20, 6)


def test_build_optimizer_rejects_bad_names_and_options():
    with pytest.raises(OptimizerError, match="unknown optimizer 'rmsprop'"):
        build_optimizer("rmsprop", 0.1, steps_per_epoch=1)
    with pytest.raises(OptimizerError, match="optimizer adam"):
        build_optimizer("adam", 0.1, momentum=0.9, steps_per_epoch=1)
    with pytest.raises(OptimizerError, match="optimizer.milestones='80ep'"):
        build_optimizer("sgd", 0.1, milestones="80ep", steps_per_epoch=1)
    with pytest.raises(OptimizerError, match="optimizer.warmup='soon'"):
        build_optimizer("sgd", 0.1, warmup="soon", steps_per_epoch=1)
    with pytest.raises(OptimizerError, match="optimizer.lr=0"):
        build_optimizer("sgd", 0, steps_per_epoch=1)
    assert isinstance(build_optimizer("sgd", 0.1, momentum=0.9, weight_decay=1e-4,
                                      steps_per_epoch=1), Optimizer)


def test_cosine_schedule_and_clipping_follow_their_formulas():
    """cosine_steps: linear warmup from 0 over w steps, then lr (g + (1 - g)(1 + cos(pi (t - w)
    / (T - w))) / 2), held at g lr from T (Loshchilov & Hutter 2017's half cosine, to a floor);
    clip: the gradient scaled to global norm c when it is longer (Pascanu et al. 2013)."""
    lr, g, w, T = 0.5, 0.1, 4, 20
    opt = build_optimizer("sgd", lr, steps_per_epoch=1, warmup=w, cosine_steps=T, gamma=g,
                          clip=2.0)

    def rate(t):
        if t < w:
            return lr * t / w
        t = min(t, T)
        return lr * (g + (1 - g) * (1 + math.cos(math.pi * (t - w) / (T - w))) / 2)

    for t in (0, 1, 3, 4, 5, 12, 19, 20, 25):
        assert float(opt.schedule(t)) == pytest.approx(rate(t), rel=1e-6, abs=1e-8), t
    params = {"a": jnp.zeros(3), "b": jnp.zeros(1)}
    state = opt.init(params)
    for grads, norm in (({"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([12.0])}, 13.0),
                        ({"a": jnp.array([0.6, 0.0, 0.8]), "b": jnp.array([0.0])}, 1.0)):
        updates, _ = opt.update(grads, state, params, 12)
        scale = min(1.0, 2.0 / norm)  # plain SGD: the update is -rate * the clipped gradient
        for name in grads:
            np.testing.assert_allclose(updates[name], -rate(12) * scale * grads[name],
                                       rtol=1e-6)
    with pytest.raises(OptimizerError, match="cosine_steps=10 must be at least 1 step, and "
                                             "milestones empty"):
        build_optimizer("sgd", 0.1, steps_per_epoch=1, milestones=[5], cosine_steps=10)
    with pytest.raises(OptimizerError, match="optimizer.clip=0 must be a positive number"):
        build_optimizer("sgd", 0.1, steps_per_epoch=1, clip=0)


# ---------------------------------------------------------------- whole runs


def test_one_compilation_of_each_program_across_levels(main_run):
    """3 levels, new masks and rates each level: every program is lowered and compiled
    exactly once in the run."""
    assert load(main_run.dir, kind="summary")["level"].max() == 2  # it did run 3 levels
    compiled = main_run.compilations
    for name in ("member_chunk", "member_eval", "init", "begin", "initial", "measure"):
        assert compiled.get(f"jit({name})") == 1, (name, compiled)
    # the ticket's rows of two trees: networks (rewind point, trained) and masks
    assert compiled.get("jit(ticket_rows)") == 2, compiled
    # each dispatch cache holds at most its one entry (none once a test in the same worker
    # process has switched the CPU path, which clears JAX's caches: pytest-xdist orders the
    # files of a worker as it likes)
    trainer = main_run.trainer
    assert trainer._eval._cache_size() <= 1
    assert trainer._opt_init._cache_size() <= 1
    for program in (main_run.programs.begin, main_run.programs.initial,
                    main_run.programs.measure):
        assert program._cache_size() <= 1
    assert main_run.programs.ticket_of._cache_size() <= 2


def test_train_dispatch_cache_has_one_entry_after_a_run(main_run):
    assert main_run.trainer._train._cache_size() <= 1  # 0: cleared (above)
    assert main_run.compilations["jit(member_chunk)"] == 1


def test_training_lowers_the_loss_in_a_run(main_run):
    evals = load(main_run.dir, kind="eval")
    for (level, branch, replicate), rows in evals.groupby(["level", "branch", "replicate"]):
        rows = rows.sort_values("step")
        assert rows["val_loss"].iloc[-1] < rows["val_loss"].iloc[0], (level, branch, replicate)
        assert rows["test_accuracy"].iloc[-1] > 0.8
        assert rows["train_loss"].isna().tolist() == [True] + [False] * (len(rows) - 1)


def test_dense_branches_start_level_zero_identically(main_run):
    evals = load(main_run.dir, kind="eval")
    first = evals[(evals.level == 0) & (evals.step == 0)].set_index(["branch", "replicate"])
    for r in range(R):
        for metric in METRICS:
            assert first.loc[("ticket", r), metric] == first.loc[("random_prune", r), metric]
        assert first.loc[("ticket", r), "val_loss"] != first.loc[("reinit", r), "val_loss"]
    # after training they differ: each branch has its own data order
    last = evals[(evals.level == 0) & (evals.step == 40)].set_index(["branch", "replicate"])
    assert last.loc[("ticket", 0), "val_loss"] != last.loc[("random_prune", 0), "val_loss"]


def test_identical_runs_give_identical_records(main_run, main_run_repeat):
    a, b = load(main_run.dir), load(main_run_repeat.dir)
    assert len(a) == len(b)
    evals_a, evals_b = a[a.kind == "eval"], b[b.kind == "eval"]
    pd.testing.assert_frame_equal(evals_a.dropna(axis=1, how="all"),
                                  evals_b.dropna(axis=1, how="all"))
    summary_a = a[a.kind == "summary"].dropna(axis=1, how="all").drop(columns="seconds")
    summary_b = b[b.kind == "summary"].dropna(axis=1, how="all").drop(columns="seconds")
    pd.testing.assert_frame_equal(summary_a, summary_b)
    assert a[a.kind == "run"]["config"].iloc[0] == b[b.kind == "run"]["config"].iloc[0]
    for name in ["rewind.npz"] + [f"levels/level_{level:02d}.npz" for level in range(3)]:
        x, y = helpers.load_npz(main_run.dir / name), helpers.load_npz(main_run_repeat.dir / name)
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ---------------------------------------------------------------- how a device runs its members


def test_member_modes_train_the_same_networks(parts, programs):
    """`map` (one member at a time) and `vmap` (batched) give the same training to float
    tolerance; `auto` maps on CPU when a device holds several members."""
    rewind, full = programs.initial(0)
    trained = {}
    for mode in ("vmap", "map"):
        trainer = Trainer(parts.model, build_optimizer("adam", 1e-3, steps_per_epoch=1),
                          parts.data, 20, parts.chunk, parts.trainer.stack_size, members=mode)
        assert trainer.members == mode
        begun = programs.begin(0, 1, parts.counts[1], rewind, full, rewind)
        state, loss = trainer.train_chunk(trainer.start(begun.network, begun.masks), begun.keys, 0)
        trained[mode] = host((state.params, loss, trainer.evaluate(state.network)))
    for a, b in zip(jax.tree.leaves(trained["vmap"]), jax.tree.leaves(trained["map"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    per_device = parts.trainer.padded_size // len(jax.devices())
    assert parts.trainer.members == ("map" if per_device > 1 else "vmap")  # LeNet on CPU


def test_an_unknown_member_mode_is_refused(parts):
    with pytest.raises(ValueError, match="train.members='loop'"):
        Trainer(parts.model, build_optimizer("adam", 1e-3, steps_per_epoch=1), parts.data,
                20, 20, 6, members="loop")
    from lottery.config import ConfigError

    with pytest.raises(ConfigError, match="train.members='loop' is unknown"):
        helpers.run_config("train.members=loop")
