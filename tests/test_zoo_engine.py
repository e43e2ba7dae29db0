"""The model zoo through the engine: every preset trains, learning-rate schedules follow the
global step, batch-norm statistics are carried and rewound, augmentation is deterministic and
for training only, durations in epochs, layer-name patterns.

Presets (enumerated from conf/experiment/) run on synthetic data of their dataset's real input
shape: 2 steps, one pruning level, one member, every preset end to end (`imp.run`). A full run
of a CIFAR network costs 20-100 s on the 2-core test machine (compiling `initial`, `begin`,
the training chunk and the evaluation; running `begin`'s argsort of up to 20M weights): about
5.6 minutes for all nine presets, a third of the suite. So by default some presets are
checked less far, as `CHECKS` says; `LOTTERY_FULL_PRESETS=1` runs every preset end to end:

- "run" (every preset not in `CHECKS`, every new preset's): `imp.run` end to end; the record,
  the level-1 masks' exact counts and the logged prunable-weight total are checked.
- "step": the preset's real `imp.build` (data, model, plan, schedule, trainer) and one
  compiled training chunk of its model and optimizer under pruned masks.
- "trace": the same Setup, and the training chunk traced (shapes and types) but not compiled:
  presets whose model class and engine path another preset runs (Conv-4/6: Conv-2's class;
  VGG-19: VGG-16's; resnet20_cifar10: the model of resnet20_warmup_cifar10, whose full run
  covers nested layer paths, batch norm and global pruning of a chosen subset of layers with
  the output layer left dense, as the VGG presets do).

`XLA_FLAGS=--xla_backend_optimization_level=0` was measured and does not help: it halves the
compile times but runs the conv nets' training chunks 5x slower.
"""

import dataclasses
import inspect
import os
import re
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    check_reachable,
    compose_config,
    driven_run,
    expected_counts,
    host,
    load_npz,
    run_config,
    setup,
    spied_run,
)
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from plain_loop import data_key, hand_schedule, initial_weights, ones_like, plain_training
from test_cli_errors import check_failure, launch
from test_models import EXPECTED, draw
from test_presets import PRESETS

import lottery.cli
from lottery import imp
from lottery.config import ConfigError, validate
from lottery.data import load_dataset
from lottery.data.augment import random_crop_and_flip
from lottery.data.synthetic import load_synthetic
from lottery.models import MODELS, build_model, lookup
from lottery.optim import build_optimizer, learning_rate_schedule
from lottery.setup import build
from lottery.state import MemberState, Network
from lottery.train import Trainer

CONF = Path(lottery.cli.CONF_DIR)
SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
          "mnist1d": (40,), "imagenet": (224, 224, 3),
          "image_folder": (64, 64, 3)}  # the real input shape of each file dataset
SYNTHETIC_OPTIONS = set(inspect.signature(load_synthetic).parameters)
# how far each preset runs (module docstring); "run" when not listed or LOTTERY_FULL_PRESETS=1
CHECKS = {"conv2_cifar10": "step", "vgg16_cifar10": "step", "conv4_cifar10": "trace",
          "conv6_cifar10": "trace", "vgg19_cifar10": "trace", "resnet20_cifar10": "trace",
          # the ImageNet ResNets' training step runs in tests/test_resnet_imagenet.py
          "resnet50_imagenet": "trace", "resnet18_imagefolder": "trace"}
if os.environ.get("LOTTERY_FULL_PRESETS") == "1":
    CHECKS = {}
# prunable weights of presets whose model options change the size set in conf/model/
RESIZED = {("mnist1d_mlp", (("hidden", 500), ("residual", True))): 40 * 500 + 500 * 500 + 500 * 10}


KEY = np.asarray(jax.random.key_data(jax.random.key(7)))  # raw key data, one member's


def stacked(trainer: Trainer, tree):
    """One member's tree as the trainer's padded, placed stack."""
    return jax.device_put(jax.tree.map(lambda x: np.stack([x] * trainer.padded_size), tree),
                          trainer.stacked)


def compose_list(overrides: list[str]):
    """The composed config for Hydra overrides as given (deletions `~key` included)."""
    with initialize_config_dir(config_dir=lottery.cli.CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def options(section: dict) -> dict:
    return {key: value for key, value in section.items() if key != "name"}


def expected_prunable(model: dict) -> int:
    """The model's exact prunable-weight count (tests/test_models.py) at the preset's options."""
    defaults = options(OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{model['name']}.yaml")))
    if options(model) == defaults:
        return EXPECTED[model["name"]][1]
    return RESIZED[(model["name"], tuple(sorted(options(model).items())))]


def smoke_overrides(name: str) -> list[str]:
    """The preset on synthetic data of its dataset's shape: 2 steps, 1 level, 1 member."""
    shape = SHAPES[compose_list([f"experiment={name}"]).dataset.name]
    on_synthetic = compose_list([f"experiment={name}", "dataset=synthetic"]).dataset
    extra = sorted(set(on_synthetic) - SYNTHETIC_OPTIONS - {"name"})  # e.g. augment
    return [f"experiment={name}", "dataset=synthetic",
            f"dataset.shape=[{','.join(map(str, shape))}]", "dataset.train_size=4",
            "dataset.validation_size=2", "dataset.test_size=2", "train.steps=2",
            "train.eval_every=2", "train.batch_size=2", "train.eval_batch_size=2",
            "prune.levels=1", "replicates=1", "branches=[ticket]", "rewind.step=0",
            *SHORT.get(name, ()), *(f"~dataset.{key}" for key in extra)]


# presets whose schedule needs its own durations shortened to fit 2 steps
SHORT = {"rigl_lenet_mnist": ("prune.dst.every=1", "prune.dst.stop=2")}


def kernel_of(tree, layer):
    return lookup(tree, layer)["kernel"]


def replaced(overrides: list[str], *changes: str) -> list[str]:
    """`overrides` with the keys of `changes` ("key=value") replaced or added."""
    merged = dict(arg.split("=", 1) if "=" in arg else (arg, None) for arg in overrides)
    merged.update(change.split("=", 1) for change in changes)
    return [key if value is None else f"{key}={value}" for key, value in merged.items()]


def npz_key(layer: str, leaf: str = "kernel") -> str:
    return f"{layer.replace('.', '/')}/{leaf}"


def level_one_counts(plan, weights) -> dict:
    """Exact surviving weights after one level: per layer, and `None` for the global pool."""
    counts = {layer: expected_counts(weights[layer], rate, 1)[1]
              for layer, rate in plan.layer_rates.items()}
    if plan.global_layers:
        counts[None] = expected_counts(sum(weights[layer] for layer in plan.global_layers),
                                       plan.global_rate, 1)[1]
    return counts


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_two_steps_and_prunes_one_level(name, tmp_path):
    cfg = validate(compose_list(smoke_overrides(name)))
    assert cfg.name == name and cfg.dataset["shape"] == list(SHAPES[
        compose_list([f"experiment={name}"]).dataset.name])
    if CHECKS.get(name, "run") != "run":
        return check_train_step(cfg, compiled=CHECKS[name] == "step")
    run = spied_run(cfg, tmp_path / "run")
    total = expected_prunable(cfg.model)
    assert re.search(rf", {total:,} prunable weights[;( ]", run.logs[0]), run.logs[0]
    weights = build(cfg).weights
    assert sum(weights.values()) == total
    plan = cfg.prune_plan(tuple(weights))

    summaries = run.summaries
    assert summaries["level"].tolist() == [0, 1] and (summaries["final_step"] == 2).all()
    dense, pruned = summaries.iloc[0], summaries.iloc[1]
    assert dense["density"] == 1.0 and pruned["density"] < 1.0
    masks = load_npz(run.dir / "levels" / "level_01.npz")
    alive = {layer: int(masks[npz_key(layer)].sum()) for layer in weights}
    expected = level_one_counts(plan, weights)
    for layer in plan.layer_rates:  # layerwise: the exact count of every layer
        assert alive[layer] == expected[layer], layer
        assert pruned[f"density_{layer}"] == pytest.approx(alive[layer] / weights[layer])
    if plan.global_layers:  # global: the exact count of the pool
        assert sum(alive[layer] for layer in plan.global_layers) == expected[None]
    for layer in set(weights) - set(plan.layers):  # left out by the preset: dense, unreported
        assert alive[layer] == weights[layer], layer
        assert f"density_{layer}" not in summaries
    assert pruned["density"] == pytest.approx(
        sum(alive[layer] for layer in plan.layers) / sum(weights[layer] for layer in plan.layers),
        rel=1e-6)
    assert np.isfinite(summaries["final_val_loss"]).all()


def check_train_step(cfg, compiled: bool):
    """The preset's real Setup and one training chunk from drawn weights under masks pruned
    to level 1's densities: compiled and run (finite loss, pruned weights stay zero, the
    others move, batch-norm statistics move), or only traced (the state keeps its shapes)."""
    parts = build(cfg)
    assert sum(parts.weights.values()) == expected_prunable(cfg.model)
    assert parts.cfg.train.steps == 2 and parts.chunk == 2
    check_reachable(parts.plan, parts.weights, cfg.prune.levels)
    abstract = jax.eval_shape(parts.model.init, jax.random.key(0))
    n = parts.trainer.padded_size
    if not compiled:
        def member_stack(tree):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), tree)

        params, model_state = member_stack(abstract)
        opt_state = jax.eval_shape(jax.vmap(parts.trainer.optimizer.init), params)
        keys = jax.ShapeDtypeStruct((n, *KEY.shape), KEY.dtype)
        state = MemberState(params, model_state, opt_state, params)
        new, loss = jax.eval_shape(lambda s, k: parts.trainer.train_chunk(s, k, 0), state, keys)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), new) == jax.tree.map(
            lambda a: (a.shape, a.dtype), state)
        assert loss.shape == (n,)
        return
    rng = np.random.default_rng(0)
    params, model_state = (
        jax.tree.map_with_path(lambda p, a: draw(p, a, rng).astype(np.float32), tree)
        for tree in abstract)
    masks = jax.tree.map(np.ones_like, params)
    rates = {**dict.fromkeys(parts.plan.global_layers, parts.plan.global_rate),
             **parts.plan.layer_rates}
    for layer, rate in rates.items():  # random masks, each layer at its level-1 density
        kernel = kernel_of(masks, layer)
        kernel.reshape(-1)[rng.permutation(kernel.size)[expected_counts(kernel.size, rate, 1)[1]:]] = 0
    start = parts.trainer.start(stacked(parts.trainer, Network(params, model_state)),
                                stacked(parts.trainer, masks))
    new, loss = parts.trainer.train_chunk(start, stacked(parts.trainer, KEY), 0)
    new = host(new)
    assert np.isfinite(loss).all()
    for layer in parts.plan.layers:
        kernel, mask = kernel_of(new.params, layer)[0], kernel_of(masks, layer)
        assert (kernel[mask == 0] == 0).all(), layer
        assert (kernel[mask == 1] != kernel_of(params, layer)[mask == 1]).any(), layer
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a[0] != b).any()), new.model_state,
                                         model_state))
    assert all(moved)  # every running statistic (none without batch norm)


# ---------------------------------------------------------------- learning-rate schedules


def values(schedule, steps) -> np.ndarray:
    return np.asarray([schedule(jnp.int32(step)) for step in steps], np.float32)


def test_schedule_warms_up_linearly_from_zero_then_decays_at_each_milestone():
    warm = learning_rate_schedule(0.1, milestones=[6, 8], gamma=0.1, warmup=4)
    np.testing.assert_allclose(values(warm, range(10)),
                               [0, .025, .05, .075, .1, .1, .01, .01, .001, .001], rtol=1e-6)
    plain = learning_rate_schedule(0.1, milestones=[6, 8], gamma=0.5)
    np.testing.assert_allclose(values(plain, range(10)), [.1] * 6 + [.05] * 2 + [.025] * 2,
                               rtol=1e-6)
    assert values(learning_rate_schedule(1e-3), [0, 10**6]).tolist() == [np.float32(1e-3)] * 2


def test_epoch_milestones_and_warmup_convert_with_steps_per_epoch():
    epoch = 351
    schedule = build_optimizer("sgd", 0.1, steps_per_epoch=epoch, milestones=["120ep", "80ep"],
                               warmup="1ep").schedule
    steps = [0, 117, epoch, 80 * epoch - 1, 80 * epoch, 120 * epoch - 1, 120 * epoch]
    expected = [0, 0.1 * 117 / epoch, 0.1, 0.1, 0.01, 0.01, 0.001]
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6)
    in_steps = build_optimizer("sgd", 0.1, steps_per_epoch=epoch,
                               milestones=[80 * epoch, "120ep"], warmup=epoch).schedule
    np.testing.assert_array_equal(values(in_steps, steps), values(schedule, steps))
    # through the engine: the preset's "80ep" at the data's steps per epoch (40 // 4 = 10)
    parts = build(validate(compose_list(replaced(
        smoke_overrides("resnet20_cifar10"), "dataset.train_size=40", "train.batch_size=4",
        "train.steps=160ep", "train.eval_every=4ep"))))
    assert (parts.cfg.train.steps, parts.cfg.train.eval_every) == (1600, 40)
    np.testing.assert_allclose(values(parts.trainer.optimizer.schedule, [799, 800, 1199, 1200]),
                               [0.1, 0.01, 0.01, 0.001], rtol=1e-6)


# SGD without momentum (its state holds no history: a fresh one equals a carried one);
# learning rates 0, .05 (warmup over 2 steps), .1, then .01 from the milestone at step 3 on
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "milestones": [3], "gamma": 0.1, "warmup": 2}
SGD_RATE = hand_schedule(0.1, warmup=2, milestones=(3,), gamma=0.1)  # written in the test


@pytest.fixture(scope="module")
def one_example():
    """The mnist1d MLP on one training example, batch 1: every step trains on the same batch,
    so two trainings from the same weights differ only by their learning rates."""
    data = load_synthetic(shape=(40,), train_size=1, validation_size=1, test_size=1)
    model = build_model("mnist1d_mlp", (40,), 10)
    params, state = host(jax.jit(model.init)(jax.random.key(0)))
    return data, model, params, state


def sgd_trainer(data, model, chunk: int) -> Trainer:
    return Trainer(model, build_optimizer(**SGD, steps_per_epoch=1), data, batch_size=1,
                   chunk=chunk, stack_size=1, eval_batch_size=1)


def train(trainer: Trainer, params, model_state, start: int, chunks: int):
    """`chunks` chunks from global step `start`, from a fresh optimizer state and full masks
    (as a level starts); the final (params, model state, opt state, masks) on the host."""
    state = trainer.start(stacked(trainer, Network(params, model_state)),
                          stacked(trainer, jax.tree.map(np.ones_like, params)))
    for chunk in range(chunks):
        state, _ = trainer.train_chunk(state, stacked(trainer, KEY), start + chunk * trainer.chunk)
    return host(state)


def learning_rate(state) -> np.ndarray:
    return state.opt_state.hyperparams["learning_rate"]


def first_member(tree):
    return jax.tree.map(lambda x: x[0], tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_rewound_chunk_sees_the_dense_runs_learning_rates(one_example):
    data, model, params, model_state = one_example
    trainer = sgd_trainer(data, model, chunk=2)
    first = train(trainer, params, model_state, start=0, chunks=1)  # steps 0, 1
    dense = train(trainer, params, model_state, start=0, chunks=2)  # steps 0-3
    # rewound to step 2 with the dense weights at step 2: steps 2, 3, a fresh optimizer state
    rewound = train(trainer, first_member(first.params), model_state, start=2, chunks=1)
    for state, last in ((first, 1), (dense, 3), (rewound, 3)):  # the chunk's last step's rate
        np.testing.assert_allclose(learning_rate(state), SGD_RATE(last), rtol=1e-6)
    assert SGD_RATE(1) == pytest.approx(0.05) and SGD_RATE(3) == pytest.approx(0.01)
    assert_trees_equal(rewound.params, dense.params)  # the same rates .1, .01 as the dense run
    # counted from the optimizer's own step instead, the chunk would use rates 0, .05
    restarted = train(trainer, first_member(first.params), model_state, start=0, chunks=1)
    assert not np.array_equal(restarted.params["fc1"]["kernel"], dense.params["fc1"]["kernel"])


def test_one_step_from_the_same_weights_scales_with_the_schedule(one_example):
    """Plain SGD, one step from the same weights on the same batch: the update is
    -schedule(step) * gradient, so updates at different global steps are proportional to
    the schedule's rates: 0 at step 0 (warmup from 0), x0.1 across the milestone."""
    data, model, params, model_state = one_example
    trainer = sgd_trainer(data, model, chunk=1)
    flat = np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(params)])
    updates = {}
    for step in range(5):
        after = first_member(train(trainer, params, model_state, start=step, chunks=1).params)
        updates[step] = np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(after)]) - flat
    assert not updates[0].any()  # learning rate 0: the weights are unchanged, bit for bit
    assert np.abs(updates[2]).max() > 1e-4
    for step in (1, 3, 4):
        ratio = SGD_RATE(step) / SGD_RATE(2)
        np.testing.assert_allclose(updates[step], ratio * updates[2], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(updates[3], updates[4])  # past the milestone: constant


# ---------------------------------------------------------------- batch norm through the engine


class TinyBN(nnx.Module):
    """conv (4 filters) -> batch norm -> ReLU -> dense: the smallest net with running statistics."""

    prunable = ("conv", "out")

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs):
        height, width, channels = input_shape
        self.conv = nnx.Conv(channels, 4, (3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.out = nnx.Linear(height * width * 4, num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        return self.out(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def tiny_bn():
    """TinyBN registered as model `tiny_bn` (validate and build_model read the same dict)."""
    import lottery.config

    assert lottery.config.MODELS is MODELS
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MODELS, "tiny_bn", TinyBN)
        yield "tiny_bn"


K, R = 2, 2  # rewind step, replicates
BN_RUN = ["dataset=synthetic", "dataset.shape=[8,8,1]", "dataset.train_size=40",
          "dataset.validation_size=10", "dataset.test_size=10", "model.name=tiny_bn",
          "~model.hidden", "train.steps=4", "train.eval_every=2", "train.batch_size=8",
          "train.eval_batch_size=10", "prune.levels=2", f"replicates={R}", f"rewind.step={K}",
          "seed=0"]


@pytest.fixture(scope="module")
def bn_run(tiny_bn, tmp_path_factory):
    """Late rewinding (k = 2 of 4 steps), 2 levels, 3 branches x 2 replicates of TinyBN,
    keeping what `begin` returned at each level (on the host)."""
    cfg = validate(compose_list(BN_RUN))
    return driven_run(cfg, tmp_path_factory.mktemp("bn") / "run")


@pytest.fixture(scope="module")
def dense_after_k(bn_run):
    """The dense ticket's (params, model state) at init and after k steps, stacked over the
    replicates, computed by a plain loop (tests/plain_loop.py: the model's init from each
    replicate's derived key, its apply in training mode, optax's Adam, masks of ones, the
    batches of the replicate's data key), and a fresh init state."""
    cfg = bn_run.cfg
    assert cfg.optimizer["name"] == "adam" and not cfg.optimizer["warmup"]
    assert not cfg.optimizer["milestones"] and not cfg.optimizer["weight_decay"]
    data = load_dataset(cfg.dataset["name"], **{key: value for key, value in cfg.dataset.items()
                                                if key != "name"})
    model = build_model(cfg.model["name"], data.input_shape, data.num_classes)
    inits, after_k = [], []
    for r in range(R):
        inits.append(initial_weights(model, cfg.seed, R, r))
        after_k.append(plain_training(model, data, inits[-1], ones_like(inits[-1][0]),
                                      data_key(cfg.seed, R, 0, "ticket", r), range(K),
                                      cfg.train.batch_size, hand_schedule(cfg.optimizer["lr"])))
    fresh = host(jax.jit(model.init)(jax.random.key(123))[1])
    stack = partial(jax.tree.map, lambda *xs: np.stack(xs))
    return stack(*inits), stack(*after_k), fresh


@pytest.fixture(scope="module")
def saved_rewind(bn_run):
    """The run's rewind point (`rewind.npz`) as stacked (params, model state) trees."""
    tree = {}
    for name, value in load_npz(bn_run.dir / "rewind.npz").items():
        *path, leaf = name.split("/")
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree["params"], tree["state"]


def flat_npz(tree, prefix):
    return {f"{prefix}/{'/'.join(str(k.key) for k in path)}": leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def rows(tree, start, stop):
    return jax.tree.map(lambda x: x[start:stop], tree)


def test_rewind_holds_the_dense_tickets_statistics_after_k_steps(bn_run, dense_after_k):
    """The saved rewind point, batch-norm statistics included, is the plain loop's after k
    steps (to float tolerance: XLA fuses the engine's steps differently)."""
    init, (params_k, state_k), _ = dense_after_k
    saved = load_npz(bn_run.dir / "rewind.npz")
    assert {key for key in saved if key.startswith("state/")} == {"state/bn/mean", "state/bn/var"}
    expected = {**flat_npz(params_k, "params"), **flat_npz(state_k, "state")}
    assert saved.keys() == expected.keys()
    for key, value in saved.items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # k steps of training moved the running statistics from their init (mean 0, variance 1)
    np.testing.assert_array_equal(init[1]["bn"]["mean"], 0)
    np.testing.assert_array_equal(init[1]["bn"]["var"], 1)
    assert (state_k["bn"]["mean"] != 0).all() and (state_k["bn"]["var"] != 1).all()


def test_pruned_levels_start_from_the_rewound_statistics(bn_run, saved_rewind, dense_after_k):
    params_k, state_k = saved_rewind  # the plain loop's after k steps (test above)
    fresh = dense_after_k[2]
    assert bn_run.cfg.branches == ("ticket", "reinit", "random_prune")
    assert len(bn_run.begun) == 3  # levels 0, 1, 2
    for level in (1, 2):
        begun = bn_run.begun[level]
        ticket_masks, state = begun.ticket_masks, begun.state
        params, model_state, masks = state.params, state.model_state, state.masks
        ticket, reinit, random = (rows(model_state, b * R, (b + 1) * R) for b in range(3))
        assert_trees_equal(ticket, state_k)
        assert_trees_equal(random, state_k)
        for r in range(R):  # a fresh init state, not the rewound one
            assert_trees_equal(first_member(rows(reinit, r, r + 1)), fresh)
        assert not np.array_equal(reinit["bn"]["mean"], state_k["bn"]["mean"])
        # the ticket's weights are the rewound ones under its masks
        assert_trees_equal(rows(params, 0, R),
                           jax.tree.map(lambda p, m: p * m, params_k, ticket_masks))
        assert_trees_equal(rows(masks, 0, R), ticket_masks)


def test_batch_norm_is_never_pruned(bn_run, saved_rewind):
    params_k, _ = saved_rewind
    for level in (1, 2):
        params, masks = bn_run.begun[level].state.params, bn_run.begun[level].state.masks
        assert jax.tree.structure(masks) == jax.tree.structure(params)  # no mask for the state
        for leaf in ("scale", "bias"):
            assert (masks["bn"][leaf] == 1).all()
            np.testing.assert_array_equal(rows(params, 0, R)["bn"][leaf], params_k["bn"][leaf])
        for layer in ("conv", "out"):
            assert (masks[layer]["bias"] == 1).all()
            assert (masks[layer]["kernel"] == 0).any()
        saved = load_npz(bn_run.dir / "levels" / f"level_{level:02d}.npz")
        assert saved["bn/scale"].all() and saved["bn/bias"].all()
        assert not saved["conv/kernel"].all()
    # only the kernels count: conv 3*3*1*4 = 36 weights, out 8*8*4*10 = 2,560, 20% per level
    summaries = bn_run.summaries
    for layer, weights in (("conv", 36), ("out", 2560)):
        counts = expected_counts(weights, 0.2, 2)
        for level in (0, 1, 2):
            densities = summaries[summaries.level == level][f"density_{layer}"]
            assert (densities == counts[level] / weights).all(), (layer, level)


# ---------------------------------------------------------------- augmentation


def test_augmentation_is_deterministic_and_for_training_only(tiny_bn):
    data = dataclasses.replace(
        load_synthetic(shape=(8, 8, 1), train_size=16, validation_size=8, test_size=8),
        augment=random_crop_and_flip(pad=2, fill=(-1.0,)))
    model = build_model(tiny_bn, (8, 8, 1), 10)
    params, model_state = host(jax.jit(model.init)(jax.random.key(0)))
    optimizer = build_optimizer("adam", 1e-2, steps_per_epoch=4)

    def trained(augment):
        trainer = Trainer(model, optimizer, dataclasses.replace(data, augment=augment),
                          batch_size=4, chunk=4, stack_size=1, eval_batch_size=8)
        return trainer, train(trainer, params, model_state, start=0, chunks=1)

    augmenting, once = trained(data.augment)
    _, again = trained(data.augment)
    plain, unaugmented = trained(None)
    _, identity = trained(lambda key, x: x)
    assert_trees_equal(once.network, again.network)  # same keys, same crops and flips
    assert_trees_equal(identity.network, unaugmented.network)  # the hook changes nothing else
    assert not np.array_equal(once.params["conv"]["kernel"], unaugmented.params["conv"]["kernel"])
    assert not np.array_equal(once.model_state["bn"]["mean"],
                              unaugmented.model_state["bn"]["mean"])
    # evaluation never augments: the same weights score the same with or without it
    weights = stacked(augmenting, first_member(once.network))
    with_augment, without = augmenting.evaluate(weights), plain.evaluate(weights)
    assert with_augment.keys() == without.keys()
    for metric in with_augment:
        np.testing.assert_array_equal(with_augment[metric], without[metric])


# ---------------------------------------------------------------- durations


def test_durations_in_epochs_resolve_in_steps():
    cfg = run_config("train.steps=3ep", "train.eval_every=1ep", "rewind.step=1ep")
    assert (cfg.train.steps, cfg.train.eval_every, cfg.rewind.step) == ("3ep", "1ep", "1ep")
    resolved = cfg.in_steps(30)
    assert (resolved.train.steps, resolved.train.eval_every, resolved.rewind.step) == (90, 30, 30)
    parts = setup(cfg)  # TINY: 600 training examples, batch 20: 30 steps per epoch
    assert (parts.cfg.train.steps, parts.cfg.train.eval_every, parts.cfg.rewind.step,
            parts.chunk) == (90, 30, 30, 30)
    mixed = run_config("train.steps=2ep", "train.eval_every=20", "rewind.step=10it").in_steps(30)
    assert (mixed.train.steps, mixed.train.eval_every, mixed.rewind.step) == (60, 20, 10)
    assert run_config("train.steps=45it").in_steps(30).train.steps == 45


def test_rewinding_past_the_end_in_epochs_names_the_steps_per_epoch(tmp_path):
    cfg = run_config("rewind.step=2ep", "train.steps=1ep")  # epochs: checked once data loads
    message = r"rewind\.step=60 must be below train\.steps=30 \(30 steps per epoch\)"
    with pytest.raises(ConfigError, match=message):
        cfg.in_steps(30)
    with pytest.raises(ConfigError, match=message):
        imp.run(cfg, tmp_path / "run", log=lambda line: None)
    assert not (tmp_path / "run" / "record.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("train.steps=3epochs", (r"train\.steps='3epochs' must be a step count or a string like "
                             r"'160ep' \(epochs\) or '500it' \(steps\)")),
    ("train.eval_every=ten", r"train\.eval_every='ten' must be a step count"),
    ("rewind.step=1.5ep", r"rewind\.step='1\.5ep' must be a step count"),
    ("train.eval_every=0ep", r"train\.eval_every='0ep' must be at least 1"),
    ("optimizer.milestones=[80eps]", r"optimizer\.milestones='80eps' must be a step count"),
    ("optimizer.warmup=soon", r"optimizer\.warmup='soon' must be a step count"),
])
def test_a_bad_duration_is_one_clear_config_error(override, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(override))
    assert "\n" not in str(error.value)
    assert re.fullmatch(message + r".*", str(error.value)), str(error.value)


def test_the_cli_refuses_a_bad_duration_with_status_2(tmp_path):
    result, run_dir, case_root = launch(
        "banana", ["dataset=synthetic", "train.steps=banana"], None, tmp_path,
        [sys.executable, "-m", "lottery.cli"])
    check_failure(result, run_dir, case_root, r"train\.steps='banana' must be a step count")


# ---------------------------------------------------------------- layer names and patterns

CONV2 = MODELS["conv2"].prunable


def conv2_rates(*overrides: str) -> dict:
    return validate(compose_list(["model=conv2", *overrides])).prune.layer_rates


def test_a_pattern_sets_the_rate_of_every_layer_it_matches():
    assert CONV2 == ("convs.0", "convs.1", "fc1", "fc2", "out")
    cfg = validate(compose_list(["model=conv2", "prune.layer_rates={convs.*: 0.1}"]))
    assert cfg.prune.layer_rates == {"convs.0": 0.1, "convs.1": 0.1}
    assert cfg.prune_plan(CONV2).layer_rates == {
        "convs.0": 0.1, "convs.1": 0.1, "fc1": 0.2, "fc2": 0.2, "out": 0.2}
    assert conv2_rates("prune.layer_rates={fc?: 0.3, convs.*: 0.1}") == {
        "fc1": 0.3, "fc2": 0.3, "convs.0": 0.1, "convs.1": 0.1}
    # Hydra's override grammar takes the pattern as a bare key; a quoted key does not parse
    # (quote it in YAML, as the presets do)
    with pytest.raises(Exception, match="no viable alternative"):
        compose_list(["model=conv2", 'prune.layer_rates={"convs.*": 0.1}'])


@pytest.mark.parametrize("overrides", [
    ["prune.layer_rates={convs.*: 0.1, convs.1: 0.3}"],
    ["prune.layer_rates={convs.1: 0.3, convs.*: 0.1}"],
    ["prune.layer_rates={convs: {1: 0.3}, convs.*: 0.1}"],  # nested, listed first
    ["prune.layer_rates={convs.*: 0.1}", "+prune.layer_rates.convs.1=0.3"],
], ids=["pattern_first", "exact_first", "nested_exact_first", "nested_exact_added"])
def test_an_exact_name_beats_a_pattern_wherever_it_is_listed(overrides):
    assert conv2_rates(*overrides) == {"convs.0": 0.1, "convs.1": 0.3}


def test_a_nested_override_is_one_dotted_layer_name():
    composed = compose_list(["model=conv2", "+prune.layer_rates.convs.0=0.3"])
    assert OmegaConf.to_container(composed.prune.layer_rates) == {"convs": {"0": 0.3}}
    assert validate(composed).prune.layer_rates == {"convs.0": 0.3}
    # a pattern is a mapping key (`*` does not lex in an override's key path)
    resnet = validate(compose_list(["model=resnet20", "prune.layer_rates={stage3.*.conv1: 0.1}",
                                    "+prune.layer_rates.stage2.0.shortcut=0.05"]))
    assert resnet.prune.layer_rates == {"stage2.0.shortcut": 0.05, "stage3.0.conv1": 0.1,
                                        "stage3.1.conv1": 0.1, "stage3.2.conv1": 0.1}
    # over a preset's pattern: the named conv changes, the other keeps the pattern's rate
    preset = validate(compose_list(["experiment=conv2_cifar10", "+prune.layer_rates.convs.0=0.3"]))
    assert preset.prune.layer_rates == {"convs.0": 0.3, "convs.1": 0.1, "out": 0.1}
    # without the leading + Hydra refuses a key that is not in the config yet
    with pytest.raises(ConfigCompositionException, match=r"prune\.layer_rates\.convs\.0"):
        compose_list(["model=conv2", "prune.layer_rates.convs.0=0.3"])


@pytest.mark.parametrize("override", ["prune.layer_rates={stage*: 0.1}",
                                      "+prune.layer_rates.convs.2=0.1", "prune.layers=[layers.*]"])
def test_a_name_or_pattern_matching_no_layer_is_refused(override):
    with pytest.raises(ConfigError, match=r"prune\.layer(_rate)?s names '[^']+', not a prunable "
                                          r"layer of conv2 \(its prunable layers are convs\.0, "
                                          r"convs\.1, fc1, fc2, out\)"):
        validate(compose_list(["model=conv2", override]))


def test_patterns_choose_the_pruned_layers():
    cfg = validate(compose_list(["model=conv2", "prune.layers=[convs.*, out]"]))
    assert cfg.prune.layers == ("convs.0", "convs.1", "out")
    assert cfg.prune_plan(CONV2).layers == ("convs.0", "convs.1", "out")
    with pytest.raises(ConfigError, match=r"prune\.layer_rates names fc\*, which prune\.layers="):
        validate(compose_list(["model=conv2", "prune.layers=[convs.*]",
                               "prune.layer_rates={fc*: 0.1}"]))
