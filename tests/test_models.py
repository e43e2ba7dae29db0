"""The model zoo: every registered model's output shape, exact weight counts, prunable layers,
batch-norm state and dropout, and its option checks.

Shapes and counts come from `jax.eval_shape` (no weights are drawn); real forward passes run
at batch 2 only for the small networks, ResNet-20 (batch norm) and Conv-2 (dropout), on weights
drawn with NumPy in the abstract params' shapes: compiling `init`'s many random draws costs far
more on CPU than the forward pass itself, and `init` is traced by `eval_shape` above.
"""

import functools
import math

import jax
import numpy as np
import pytest

from lottery.models import MODELS, ModelError, build_model

MNIST, CIFAR, MNIST1D = (28, 28, 1), (32, 32, 3), (40,)
BATCH, CLASSES = 2, 10

# name: (input shape, exact prunable weights, exact parameters incl. biases and BN scale/shift)
EXPECTED = {
    "lenet_300_100": (MNIST, 266_200, 266_610),  # Frankle & Carbin 2019, Fig. 2: 266K
    "lenet5": (MNIST, 61_470, 61_706),  # LeCun et al. 1998 layout on 28x28: ~60K
    "lenet5_caffe": (MNIST, 430_500, 431_080),  # SNIP / GraSP: 431K
    "conv2": (CIFAR, 4_300_992, 4_301_642),  # Frankle & Carbin, Fig. 2: 4.3M
    "conv4": (CIFAR, 2_425_024, 2_425_930),  # Fig. 2: 2.4M
    # Fig. 2 prints 1.7M; its conv part (1.1M = 1,144,512) matches, the total is a typo
    "conv6": (CIFAR, 2_261_184, 2_262_602),
    "vgg11": (CIFAR, 9_222_848, 9_231_114),  # OpenLTH's test: 9,231,114 parameters
    "vgg16": (CIFAR, 14_715_584, 14_728_266),  # OpenLTH: 14,728,266; papers: 14.7M
    "vgg19": (CIFAR, 20_024_000, 20_040_522),  # OpenLTH: 20,040,522; papers: 20.0M
    "resnet20": (CIFAR, 270_896, 272_474),  # OpenLTH: 272,474; He et al. 2016: 0.27M
    "resnet32": (CIFAR, 464_432, 466_906),  # He et al.: 0.46M
    "resnet56": (CIFAR, 851_504, 855_770),  # He et al.: 0.85M
    # torchvision: 11,689,512 / 25,557,032 at 1000 classes; here 10: the fc's 513,000 /
    # 2,049,000 become 5,130 / 20,490; batch norm 9,600 / 53,120 (scale + shift per channel)
    "resnet18": (CIFAR, 11_172_032, 11_181_642),
    "resnet50": (CIFAR, 23_475_392, 23_528_522),
    "mnist1d_mlp": (MNIST1D, 15_000, 15_210),  # Greydanus & Kobak's MLPBase, hidden 100
}
BATCH_NORM = {"vgg11", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56", "resnet18",
              "resnet50"}
DEEP = {"resnet32", "resnet56", "resnet50"}
SMALL = ["lenet_300_100", "lenet5", "lenet5_caffe", "mnist1d_mlp", "conv2", "resnet20"]


@functools.cache
def abstract(name, **options):
    """The spec and the abstract (shape-only) params and state of a model."""
    spec = build_model(name, EXPECTED[name][0], CLASSES, **options)
    params, state = jax.eval_shape(spec.init, jax.random.key(0))
    return spec, params, state


def draw(path, leaf, rng):
    """A value for one abstract leaf: He-scaled kernels, random biases, BN scales near 1,
    fresh running statistics (mean 0, variance 1)."""
    name = path[-1].key
    if name == "kernel":
        return rng.normal(0, math.sqrt(2 / math.prod(leaf.shape[:-1])), leaf.shape)
    if name == "scale":
        return rng.uniform(0.5, 1.5, leaf.shape)
    if name == "var":
        return np.ones(leaf.shape)
    if name == "mean":
        return np.zeros(leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)  # biases


@functools.cache
def concrete(name, **options):
    """The spec, params and state (NumPy), a batch of inputs and the jitted apply."""
    spec, params, state = abstract(name, **options)
    rng = np.random.default_rng(0)
    params, state = (
        jax.tree.map_with_path(lambda p, a: draw(p, a, rng).astype(np.float32), tree)
        for tree in (params, state))
    x = np.random.default_rng(1).normal(size=(BATCH, *EXPECTED[name][0])).astype(np.float32)
    return spec, params, state, x, jax.jit(spec.apply, static_argnames="train")


def kernel_paths(tree, prefix=""):
    """The dotted paths of every dict holding a `kernel` in a pure params dict."""
    paths = [prefix[:-1]] if "kernel" in tree else []
    for key, value in tree.items():
        if isinstance(value, dict):
            paths += kernel_paths(value, f"{prefix}{key}.")
    return paths


def size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_every_registered_model_is_covered():
    assert set(EXPECTED) == set(MODELS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_prunable_layers_and_output_shape(name):
    shape, weights, total = EXPECTED[name]
    spec, params, state = abstract(name)
    counts = spec.param_counts(params)  # every prunable path resolves to a kernel
    assert sum(counts.values()) == weights
    assert size(params) == total
    assert len(set(spec.prunable)) == len(spec.prunable)
    assert sorted(kernel_paths(params)) == sorted(spec.prunable)  # every kernel is declared
    assert (size(state) > 0) == (name in BATCH_NORM)
    x = jax.ShapeDtypeStruct((BATCH, *shape), np.float32)
    # Tracing batch-norm updates is slow in flax (a tracer's `sharding` lookup per running
    # statistic); the deep ResNets' training path is ResNet-20's, which is checked.
    for train in (False,) if name in DEEP else (False, True):
        logits, new_state = jax.eval_shape(
            functools.partial(spec.apply, train=train, key=jax.random.key(1)), params, state, x)
        assert logits.shape == (BATCH, CLASSES)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize("name", SMALL)
def test_forward_pass(name):
    _, params, state, x, apply = concrete(name)
    logits, _ = apply(params, state, x, train=False)
    assert logits.shape == (BATCH, CLASSES)
    assert np.isfinite(np.asarray(logits)).all()


def test_batch_norm_updates_running_statistics_only_in_training():
    _, params, state, x, apply = concrete("resnet20")
    logits, kept = apply(params, state, x, train=False)
    jax.tree.map(np.testing.assert_array_equal, kept, state)
    train_logits, moved = apply(params, state, x, train=True, key=jax.random.key(2))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), moved, state))
    assert all(changed)  # every running mean and variance moved
    assert not np.allclose(train_logits, logits)  # batch statistics, not running ones


def test_dropout_draws_from_the_key_in_training_only():
    _, params, state, x, apply = concrete("conv2", dropout=0.5)
    one = apply(params, state, x, train=True, key=jax.random.key(1))[0]
    two = apply(params, state, x, train=True, key=jax.random.key(2))[0]
    again = apply(params, state, x, train=True, key=jax.random.key(1))[0]
    assert not np.allclose(one, two)
    np.testing.assert_array_equal(one, again)
    evaluation = apply(params, state, x, train=False)[0]
    np.testing.assert_array_equal(evaluation, apply(params, state, x, train=False,
                                                    key=jax.random.key(3))[0])
    assert not np.allclose(evaluation, one)


@pytest.mark.parametrize("name, options, weights", [
    ("mnist1d_mlp", {"hidden": 500}, 40 * 500 + 500 * 500 + 500 * 10),
    ("mnist1d_mlp", {"residual": False}, 15_000),
    ("resnet20", {"width": 2}, 4 * (270_896 - 432 - 640) + 2 * (432 + 640)),
    ("conv6", {"dropout": 0.5}, 2_261_184),
])
def test_options(name, options, weights):
    spec, params, _ = abstract(name, **options)
    assert sum(spec.param_counts(params).values()) == weights


@pytest.mark.parametrize("name, shape, options, match", [
    ("conv2", CIFAR, {"dropout": 1.0}, "dropout"),
    ("conv4", CIFAR, {"dropout": -0.1}, "dropout"),
    ("conv6", CIFAR, {"dropout": "half"}, "dropout"),
    ("resnet20", CIFAR, {"width": 0}, "width"),
    ("resnet32", CIFAR, {"width": 1.5}, "width"),
    ("mnist1d_mlp", MNIST1D, {"hidden": 0}, "hidden"),
    ("mnist1d_mlp", MNIST1D, {"hidden": True}, "hidden"),
    ("mnist1d_mlp", MNIST1D, {"residual": "yes"}, "residual"),
    ("vgg16", CIFAR, {"depth": 13}, "depth"),  # unknown option
    ("lenet5", MNIST, {"hidden": 100}, "hidden"),
    ("lenet5", MNIST1D, {}, "input_shape"),
    ("lenet5_caffe", (12, 12, 1), {}, "too small"),
    ("conv6", (4, 4, 3), {}, "too small"),
    ("vgg11", (8, 8, 3), {}, "too small"),
    ("resnet56", MNIST1D, {}, "input_shape"),
])
def test_bad_options_are_model_errors(name, shape, options, match):
    with pytest.raises(ModelError, match=match):
        build_model(name, shape, CLASSES, **options)


def test_apply_in_training_mode_leaves_the_callers_statistics_alone():
    """An eager training-mode call returns new batch-norm statistics and leaves the ones it
    was given unchanged, also when they are numpy arrays (as notebooks load them from a
    run's npz files): batch norm assigns its statistics in place."""
    from flax import nnx

    from lottery.models import spec_of

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x, *, train=False, rngs=None):
            return self.bn(self.fc(x), use_running_average=not train)

    def init(key):
        _, params, state = nnx.split(Net(nnx.Rngs(key)), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(state)

    model = spec_of("net", nnx.eval_shape(lambda: Net(nnx.Rngs(0))), init, ("fc",))
    params, state = init(jax.random.key(0))
    state = jax.tree.map(np.array, state)  # writable numpy leaves
    before = state["bn"]["mean"].copy()
    x = jax.random.normal(jax.random.key(1), (8, 3)) + 5.0
    _, new_state = model.apply(params, state, x, train=True)
    np.testing.assert_array_equal(np.asarray(state["bn"]["mean"]), before)  # all zeros
    assert not np.allclose(np.asarray(new_state["bn"]["mean"]), before)
