"""ResNet-18 and ResNet-50 for ImageNet (`lottery.models.resnet_imagenet`): torchvision's
published parameter counts, and the same counts derived here by hand from the architecture;
the forward pass against a NumPy reference written from torchvision's definition (PyTorch's
padding, the stride on a bottleneck's 3x3 conv); the CPU path's values and gradients against
the plain path's; the residual-coupled channel groups (compaction computes what the
unit-masked model computes); a jitted training step; the initialisation; the options.

Full-size models are only traced (`jax.eval_shape`); everything that runs uses width 1/16
(4/8/16/32 planes) on small images.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import draw
from test_structured import random_units

from lottery import platform
from lottery.config import ConfigError
from lottery.models import ModelError, build_model, lookup
from lottery.models.resnet_imagenet import ResNet18
from lottery.optim import build_optimizer
from lottery.pruning.compact import compact
from lottery.pruning.masks import apply_masks, full_masks
from lottery.pruning.structured import model_groups, unit_weight_masks

# torchvision's documentation (models/resnet18, resnet50: "num_params"), 1000 classes
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032}
BLOCKS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
IMAGENET, TINY = (224, 224, 3), 1 / 16
SMALL = ((32, 32, 3), 5, (("width", TINY),))  # the small models' input, classes, options


def by_hand(name, classes=1000, c_in=3, width=1):
    """Conv weights, batch-norm parameters (scale + shift) and the fc's, counted from He et
    al.'s Table 1 in torchvision's layout: a 7x7 stem, four stages of 64/128/256/512 planes,
    a basic block two 3x3 convs, a bottleneck 1x1, 3x3, 1x1 to 4x the planes, a 1x1
    projection where a block changes the shape (stride 2 or channels)."""
    kind, blocks = BLOCKS[name]
    base = int(64 * width)
    convs, norms, channels = 7 * 7 * c_in * base, base, base
    for stage, count in enumerate(blocks):
        planes = base * 2**stage
        out = 4 * planes if kind == "bottleneck" else planes
        for index in range(count):
            if kind == "basic":
                shapes = [(3, channels, planes), (3, planes, planes)]
            else:
                shapes = [(1, channels, planes), (3, planes, planes), (1, planes, out)]
            if (stage > 0 and index == 0) or channels != out:
                shapes.append((1, channels, out))
            convs += sum(k * k * i * o for k, i, o in shapes)
            norms += sum(o for _, _, o in shapes)
            channels = out
    return {"convs": convs, "batch_norm": 2 * norms, "fc": channels * classes + classes,
            "fc_kernel": channels * classes, "running": 2 * norms}


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@functools.cache
def abstract(name, shape=IMAGENET, classes=1000, options=()):
    spec = build_model(name, shape, classes, **dict(options))
    return (spec, *jax.eval_shape(spec.init, jax.random.key(0)))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_counts_equal_torchvisions(name):
    spec, params, state = abstract(name)
    hand = by_hand(name)
    assert hand["convs"] + hand["batch_norm"] + hand["fc"] == PUBLISHED[name]
    assert count(params) == PUBLISHED[name]  # trainable only: running statistics are state
    assert count(state) == hand["running"]
    assert sum(spec.param_counts(params).values()) == hand["convs"] + hand["fc_kernel"]
    assert spec.prunable[0] == "conv" and spec.prunable[-1] == "fc" and spec.convolves


def test_width_scales_every_layer():
    spec, params, _ = abstract("resnet50", *SMALL)
    hand = by_hand("resnet50", classes=5, width=TINY)
    assert count(params) == hand["convs"] + hand["batch_norm"] + hand["fc"]
    assert params["stage4"][2]["conv3"]["kernel"].shape == (1, 1, 32, 128)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logits_shape_for_any_input_size(name):
    """(The params do not depend on the image size: one model takes them all.)"""
    spec, params, state = abstract(name, *SMALL)
    for size in [IMAGENET[:2], (32, 32), (33, 47), (5, 3)]:
        x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
        assert jax.eval_shape(spec.logits, params, state, x).shape == (2, 5)


# ---------------------------------------------------------------- values


def weights(name, seed=0):
    """Spec, He-scaled params and nontrivial running statistics (NumPy, float32) of the
    small model (width 1/16, 5 classes; it takes images of any size)."""
    spec, params, state = abstract(name, *SMALL)
    rng = np.random.default_rng(seed)
    params = jax.tree.map_with_path(lambda p, a: draw(p, a, rng).astype(np.float32), params)
    state = jax.tree.map_with_path(
        lambda p, a: (rng.normal(0, 0.2, a.shape) if p[-1].key == "mean"
                      else rng.uniform(0.5, 2.0, a.shape)).astype(np.float32), state)
    return spec, params, state


def conv(x, layer, stride):
    """PyTorch's Conv2d(bias=False, padding=k // 2) in NHWC, float64: the k x k shifted
    (strided) views of the padded input side by side, times the flattened kernel."""
    kernel = layer["kernel"]
    k, pad = kernel.shape[0], kernel.shape[0] // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows, cols = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    views = [x[:, i:i + stride * (rows - 1) + 1:stride, j:j + stride * (cols - 1) + 1:stride]
             for i in range(k) for j in range(k)]
    return np.concatenate(views, axis=-1) @ kernel.reshape(-1, kernel.shape[-1])


def norm(x, params, state):
    return (x - state["mean"]) / np.sqrt(state["var"] + 1e-5) * params["scale"] + params["bias"]


def max_pool(x):
    """PyTorch's MaxPool2d(3, stride=2, padding=1): the padding never wins."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    rows, cols = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.max([x[:, i:i + 2 * rows - 1:2, j:j + 2 * cols - 1:2]
                   for i in range(3) for j in range(3)], axis=0)


def reference(name, params, state, x):
    """torchvision's ResNet forward pass in evaluation mode, on the pure dicts (in NumPy,
    float64)."""
    params, state = (jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
                     for tree in (params, state))
    relu = functools.partial(np.maximum, 0)

    def unit(h, path, bn, stride=1):  # conv + batch norm of the layer pair at `path`
        return norm(conv(h, lookup(params, path), stride), lookup(params, bn), lookup(state, bn))

    h = max_pool(relu(unit(np.asarray(x, np.float64), "conv", "bn", 2)))
    bottleneck = BLOCKS[name][0] == "bottleneck"
    for stage, blocks in enumerate(BLOCKS[name][1], start=1):
        for index in range(blocks):
            b, stride = f"stage{stage}.{index}", 2 if stage > 1 and index == 0 else 1
            if bottleneck:  # torchvision v1.5: the stride on the 3x3 conv
                out = relu(unit(h, f"{b}.conv1", f"{b}.bn1"))
                out = relu(unit(out, f"{b}.conv2", f"{b}.bn2", stride))
                out = unit(out, f"{b}.conv3", f"{b}.bn3")
            else:
                out = relu(unit(h, f"{b}.conv1", f"{b}.bn1", stride))
                out = unit(out, f"{b}.conv2", f"{b}.bn2")
            if stride != 1 or h.shape[-1] != out.shape[-1]:  # a 1x1 conv + BN projection
                h = unit(h, f"{b}.shortcut", f"{b}.shortcut_bn", stride)
            h = relu(out + h)
    fc = params["fc"]
    return h.mean(axis=(1, 2)) @ fc["kernel"] + fc["bias"]


@pytest.mark.parametrize("name, shape", [("resnet18", (32, 32, 3)), ("resnet50", (30, 26, 3))])
def test_evaluation_logits_equal_torchvisions_definition(name, shape):
    """Even sizes are where PyTorch's padding (3 each side of a 7x7 stride-2 conv) and
    XLA's "SAME" (2 before, 3 after) disagree."""
    spec, params, state = weights(name)
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    logits = jax.jit(spec.logits)(params, state, x)
    want = reference(name, params, state, x)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_cpu_path_values_and_gradients_equal_the_plain_path():
    """The stem in training mode (batch statistics): the 7x7 stride-2 conv with PyTorch's
    padding (the CPU path's im2col gradient), batch norm, the padded max pool; its value
    and its gradients in the conv, the batch norm and the input. (The blocks' strided 3x3
    and 1x1 convs take the same im2col gradient; ResNet-18's whole training step runs on
    the CPU path below.)"""
    spec, params, state = weights("resnet18")
    model = nnx.merge(spec.graphdef, params, jax.tree.map(jnp.asarray, state))  # batch norm
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)  # assigns its statistics: JAX arrays
    rest = nnx.to_pure_dict(rest)
    stem = {"conv": params["conv"], "bn": params["bn"]}

    def loss(stem, x):
        out = nnx.merge(graphdef, {**params, **stem}, rest).stem(x, True)
        return jnp.sum(jnp.tanh(out) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    results = {}
    for on in (True, False):
        with platform.cpu_path(on):
            results[on] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(stem, x)
            if on:  # the CPU kernel is in use: it takes no forward mode
                with pytest.raises(TypeError, match="forward-mode"):
                    jax.jvp(loss, (stem, x), (stem, x))
    (cpu, cpu_grads), (plain, plain_grads) = results[True], results[False]
    np.testing.assert_allclose(cpu, plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(plain_grads)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("name, want", [
    ("resnet18", {"stage1.stream": ({"conv", "stage1.0.conv2", "stage1.1.conv2"},
                                    {"stage1.0.conv1", "stage1.1.conv1", "stage2.0.conv1",
                                     "stage2.0.shortcut"}),
                  "stage4.stream": ({"stage4.0.shortcut", "stage4.0.conv2", "stage4.1.conv2"},
                                    {"stage4.1.conv1", "fc"})}),
    ("resnet50", {"conv": ({"conv"}, {"stage1.0.conv1", "stage1.0.shortcut"}),
                  "stage1.stream": ({"stage1.0.shortcut", "stage1.0.conv3", "stage1.1.conv3",
                                     "stage1.2.conv3"},
                                    {"stage1.1.conv1", "stage1.2.conv1", "stage2.0.conv1",
                                     "stage2.0.shortcut"}),
                  "stage3.1.conv2": ({"stage3.1.conv2"}, {"stage3.1.conv3"})}),
])
def test_residual_streams_and_block_groups(name, want):
    spec = abstract(name, *SMALL)[0]
    groups = {g.name: g for g in model_groups(spec, "channels")}
    kind, blocks = BLOCKS[name]
    inner = [f"stage{s}.{i}.conv{c}" for s, n in enumerate(blocks, start=1) for i in range(n)
             for c in ((1,) if kind == "basic" else (1, 2))]
    streams = [f"stage{s}.stream" for s in range(1, 5)]
    assert sorted(groups) == sorted(inner + streams + (["conv"] if kind != "basic" else []))
    for group_name, (producers, consumers) in want.items():
        assert set(groups[group_name].layers) == producers
        assert {s.layer for s in groups[group_name].consumers} == consumers
    assert groups["stage4.stream"].size == 32 * (4 if kind != "basic" else 1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_compaction_computes_what_the_unit_masked_model_computes(name):
    """Half of every group's channels removed (streams included): the smaller model is
    consistent (it traces) and, in torchvision's forward pass above, computes what the
    full model with those channels' weights masked computes."""
    spec, params, state = weights(name)
    groups = model_groups(spec, "channels")
    units = random_units(groups)
    small = compact(spec, params, state, units)
    x = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
    assert jax.eval_shape(small.spec.logits, small.params, small.state, x).shape == (2, 5)
    masked = jax.jit(lambda params, units: apply_masks(
        params, unit_weight_masks(full_masks(params), groups, units)))(params, units)
    want = reference(name, masked, state, x)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(reference(name, small.params, small.state, x), want,
                               rtol=1e-6, atol=1e-6 * np.abs(want).max())
    for g in groups:  # every producer shrinks to the kept units
        for leaf in g.producers:
            tree = small.state if leaf.in_state else small.params
            assert lookup(tree, leaf.layer)[leaf.leaf].shape[leaf.axis] == units[g.name].sum()


# ---------------------------------------------------------------- training, init, options


def test_a_jitted_training_step_learns_and_keeps_pruned_weights_zero():
    """One member on the CPU path: SGD with momentum, gradients masked before the update
    and params after it (as the engine trains), batch statistics carried along."""
    spec, params, state = weights("resnet18")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    masks = jax.tree.map(lambda p: np.ones(p.shape, np.float32), params)
    masks["stage2"][0]["conv1"]["kernel"] = (rng.random((3, 3, 4, 8)) < 0.5).astype(np.float32)
    params = jax.tree.map(np.multiply, params, masks)
    optimizer = build_optimizer("sgd", 0.05, steps_per_epoch=1, momentum=0.9)

    @jax.jit
    def step(params, state, opt_state, masks, step):
        def loss(params):
            logits, new_state = spec.apply(params, state, x, train=True)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y]), new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(apply_masks(grads, masks), opt_state, params, step)
        params = apply_masks(jax.tree.map(jnp.add, params, updates), masks)
        return params, new_state, opt_state, value

    running, opt_state, losses = state, optimizer.init(params), []
    for i in range(5):
        params, running, opt_state, value = step(params, running, opt_state, masks, i)
        losses.append(float(value))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    pruned = masks["stage2"][0]["conv1"]["kernel"] == 0
    assert np.all(np.asarray(params["stage2"][0]["conv1"]["kernel"])[pruned] == 0)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), running, state)
    assert all(jax.tree.leaves(moved))  # every running statistic updated


def drawn_at_init():
    """Some of ResNet-18's (width 1/4) initial params, drawn by the model itself, without and
    with `zero_init_residual`: jitted, the draws of the leaves not returned are dropped (an
    eager init compiles every draw)."""
    def init(key, zero):
        model = ResNet18((32, 32, 3), 10, rngs=nnx.Rngs(key), width=0.25,
                         zero_init_residual=zero)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        norms = {path: lookup(params, path) for path in ("bn", "stage2.0.bn1", "stage2.0.bn2",
                                                         "stage2.0.shortcut_bn", "stage4.1.bn2")}
        kernels = {path: lookup(params, path)["kernel"] for path in ("conv", "stage2.0.conv1")}
        return kernels, norms, params["fc"]

    return jax.jit(lambda key: [init(key, zero) for zero in (False, True)])(jax.random.key(0))


def test_initialisation_follows_torchvision():
    for zero, (kernels, norms, fc) in zip((False, True), drawn_at_init()):
        # Kaiming normal on the fan-out: the 7x7 3 -> 16 stem, a 3x3 16 -> 32 conv
        for path, kernel in kernels.items():
            fan_out = math.prod(kernel.shape[:2]) * kernel.shape[3]
            assert abs(np.std(kernel) / math.sqrt(2 / fan_out) - 1) < 0.05, path
        for path, bn in norms.items():  # scale 1 (a block's last: 0 with zero_init_residual)
            last = zero and path.endswith(".bn2")
            np.testing.assert_array_equal(bn["scale"], 0.0 if last else 1.0)
            np.testing.assert_array_equal(bn["bias"], 0.0)
        bound = 1 / math.sqrt(128)  # PyTorch's nn.Linear: uniform in +-1/sqrt(fan-in)
        assert fc["kernel"].shape == (128, 10)
        assert np.abs(fc["kernel"]).max() <= bound
        assert abs(np.std(fc["kernel"]) * math.sqrt(3) / bound - 1) < 0.05
        assert np.abs(fc["bias"]).max() <= bound and np.all(fc["bias"] != 0)


@pytest.mark.parametrize("name, shape, options, match", [
    ("resnet18", (32, 32, 3), {"width": 0}, "width"),
    ("resnet18", (32, 32, 3), {"width": 0.1}, "64 \\* width"),
    ("resnet50", (32, 32, 3), {"width": True}, "width"),
    ("resnet50", (32, 32, 3), {"zero_init_residual": "yes"}, "zero_init_residual"),
    ("resnet50", (32, 32, 3), {"depth": 101}, "depth"),
    ("resnet18", (40,), {}, "input_shape"),
])
def test_bad_options_are_model_errors(name, shape, options, match):
    with pytest.raises(ModelError, match=match):
        build_model(name, shape, 10, **options)


def test_the_config_files_select_the_models():
    from helpers import run_config

    cfg = run_config("model=resnet18", "model.width=0.0625", "dataset.shape=[32,32,3]")
    assert cfg.model == {"name": "resnet18", "width": 0.0625, "zero_init_residual": False}
    with pytest.raises(ConfigError, match="width"):
        run_config("model=resnet50", "model.width=0.1", "dataset.shape=[32,32,3]")
