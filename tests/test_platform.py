"""Backend tuning (`lottery.platform`): the settings made before JAX's backend starts, the
CPU path's switch, the member-mode rule on a model's declared `convolves`, and forward-mode
autodiff through every registered model off the CPU path, checked against the CPU path's
kernels.

The tests run on CPU with the CPU path on (`conftest.py` calls `platform.configure()`);
a test that needs it off switches it off for its block only (`platform.cpu_path(False)`).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lottery import platform
from lottery.data.synthetic import load_synthetic
from lottery.models import MODELS, build_model
from lottery.optim import build_optimizer
from lottery.train import Trainer

# ---------------------------------------------------------------- before the backend starts


def test_use_cpu_cores_picks_the_largest_divisor_of_the_stack(monkeypatch):
    calls = []
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    for stack_size in (6, 7, 2, 12):
        platform.use_cpu_cores(stack_size)
    assert calls == [("jax_num_cpu_devices", n) for n in (3, 1, 2, 4)]
    calls.clear()
    platform.configure(6)  # the entry points' call passes the stack on
    assert calls == [("jax_num_cpu_devices", 3)]
    calls.clear()
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")  # the environment wins
    platform.use_cpu_cores(6)
    platform.configure(6)
    assert calls == []


def test_use_eigen_dots_adds_its_flag_unless_xla_flags_choose_ynnpack_fusions(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    platform.use_eigen_dots()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    platform.use_eigen_dots()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type="
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    platform.use_eigen_dots()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    monkeypatch.delenv("XLA_FLAGS")
    platform.configure(eigen_dots=False)  # the benchmark's own process: XLA's defaults
    assert "XLA_FLAGS" not in os.environ
    platform.configure()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


# ---------------------------------------------------------------- the switch


def test_configure_turns_the_cpu_path_on_for_the_cpu_backend():
    assert jax.default_backend() == "cpu"  # conftest: JAX_PLATFORMS=cpu
    assert platform.on_cpu_path()  # conftest configured it
    with platform.cpu_path(False):
        assert not platform.on_cpu_path()
        assert platform.configure() is True
        assert platform.on_cpu_path()
        platform.use_cpu_path(False)
    assert platform.on_cpu_path()  # the block restores what was before it


def test_switching_the_path_retraces_what_was_traced_on_the_other():
    paths = []

    @jax.jit
    def double(x):
        paths.append(platform.on_cpu_path())  # runs only when traced
        return 2 * x

    double(1.0)
    double(1.0)
    with platform.cpu_path(False):
        double(1.0)
        double(1.0)
    double(1.0)
    assert paths == [True, False, True]


# ---------------------------------------------------------------- member mode


def input_shape(name):
    return (40,) if name == "mnist1d_mlp" else (16, 16, 3)


def has_conv_layer(cls, shape) -> bool:
    module = nnx.eval_shape(lambda: cls(shape, 10, rngs=nnx.Rngs(0)))
    return any(isinstance(layer, nnx.Conv) for _, layer in nnx.iter_modules(module))


def test_every_registered_model_declares_whether_it_convolves():
    """The declaration agrees with the layers each model holds; the spec carries it."""
    for name, cls in MODELS.items():
        assert any(isinstance(vars(c).get("convolves"), bool) for c in cls.__mro__), name
        assert cls.convolves == has_conv_layer(cls, input_shape(name)), name
    assert build_model("conv2", (8, 8, 3), 10).convolves
    assert not build_model("lenet_300_100", (8, 8, 3), 10).convolves


# (mode, convolves, members per device) -> on the CPU path, off it; by hand from the rule:
# auto maps on the CPU path when a device holds several members or the model convolves
RULE = {("auto", False, 1): ("vmap", "vmap"), ("auto", False, 3): ("map", "vmap"),
        ("auto", True, 1): ("map", "vmap"), ("auto", True, 3): ("map", "vmap"),
        ("vmap", True, 3): ("vmap", "vmap"), ("map", False, 1): ("map", "map")}


@pytest.mark.parametrize("case", list(RULE), ids=str)
def test_member_mode_rule(case):
    on, off = RULE[case]
    assert platform.member_mode(*case) == on
    with platform.cpu_path(False):
        assert platform.member_mode(*case) == off


def test_an_unknown_member_mode_is_refused():
    with pytest.raises(ValueError, match="train.members='loop': choose one of auto, vmap, map"):
        platform.member_mode("loop", False, 1)


@pytest.mark.parametrize("name", ["lenet_300_100", "conv2"])
@pytest.mark.parametrize("stack", [2, 6])
def test_the_trainer_chooses_its_member_mode_from_the_models_declaration(name, stack):
    """Two CPU devices (conftest): a stack of 2 is one member per device, 6 is three."""
    assert len(jax.devices()) == 2
    data = load_synthetic((8, 8, 3), train_size=20, validation_size=4, test_size=4)
    model = build_model(name, data.input_shape, data.num_classes)
    optimizer = build_optimizer("sgd", 0.1, steps_per_epoch=1)
    expected = "map" if name == "conv2" or stack == 6 else "vmap"
    assert Trainer(model, optimizer, data, 4, 1, stack).members == expected
    with platform.cpu_path(False):
        assert Trainer(model, optimizer, data, 4, 1, stack).members == "vmap"


# ---------------------------------------------------------------- forward mode off the CPU path


def forward_mode(spec, key=jax.random.key(3)):
    """(params, state, x, v) -> `jax.jvp` along v of the params -> (evaluation-mode logits,
    training-mode logits: batch statistics, dropout)."""
    def outputs(params, state, x):
        return spec.logits(params, state, x), spec.apply(params, state, x, True, key)[0]

    return lambda params, state, x, v: jax.jvp(lambda p: outputs(p, state, x), (params,), (v,))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_mode_compiles_for_every_model_off_the_cpu_path(name):
    """Off the CPU path `jax.jvp` through every model lowers to an XLA program (values:
    below, one model of each family); on it, it fails: the model uses the CPU kernels."""
    spec = build_model(name, input_shape(name), 10)
    params, state = jax.eval_shape(spec.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, *input_shape(name)), jnp.float32)
    with platform.cpu_path(False):
        lowered = jax.jit(forward_mode(spec)).lower(params, state, x, params)
    assert [o.shape for o in jax.tree.leaves(lowered.out_info)] == [(2, 10)] * 4
    logits_jvp = jax.jit(lambda p, s, x: jax.jvp(lambda p: spec.logits(p, s, x), (p,), (p,)))
    with pytest.raises(TypeError, match="forward-mode"):
        logits_jvp.lower(params, state, x)


def draw(path, leaf, rng):
    """He-scaled kernels, small biases, batch-norm scales near 1, running variances 1."""
    name = path[-1].key
    if name == "kernel":
        return rng.normal(0, math.sqrt(2 / math.prod(leaf.shape[:-1])), leaf.shape)
    if name in ("scale", "var"):
        return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)


def drawn(name):
    """The model's spec, drawn params and state, a batch of 2 inputs and a tangent."""
    spec = build_model(name, input_shape(name), 10)
    rng = np.random.default_rng(0)
    params, state = (jax.tree.map_with_path(lambda p, a: draw(p, a, rng).astype(np.float32), t)
                     for t in jax.eval_shape(spec.init, jax.random.key(0)))
    x = rng.normal(size=(2, *input_shape(name))).astype(np.float32)
    v = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    return spec, params, state, x, v


def inner(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", ["lenet_300_100", "mnist1d_mlp", "lenet5", "conv2", "vgg11",
                                  "resnet20"])
def test_forward_mode_values_off_the_cpu_path(name):
    """Off the CPU path, the evaluation-mode logits equal the CPU path's, and their
    directional derivative J v from `jax.jvp` equals a central difference along v."""
    spec, params, state, x, v = drawn(name)

    def values(params, v, eps=3e-3):
        step = eps / jnp.sqrt(inner(v, v))
        shifted = jax.tree.map(lambda p, t: jnp.stack([p + step * t, p - step * t]), params, v)
        ahead, behind = jax.vmap(lambda p: spec.logits(p, state, x))(shifted)
        logits, jv = jax.jvp(lambda p: spec.logits(p, state, x), (params,), (v,))
        return logits, jv, (ahead - behind) / (2 * step)

    with platform.cpu_path(False):
        plain, jv, difference = jax.jit(values)(params, v)
    kernels = jax.jit(spec.logits)(params, state, x)  # the CPU path's
    np.testing.assert_allclose(plain, kernels, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(jv - difference) <= 0.03 * np.linalg.norm(jv)


@pytest.mark.parametrize("name", ["lenet_300_100", "conv2"])
def test_forward_mode_agrees_with_the_cpu_kernels_reverse_mode(name):
    """u . (J v) from plain forward mode equals (J^T u) . v from the CPU kernels' VJPs (the
    custom-VJP matmul; the im2col convolution gradient)."""
    spec, params, state, x, v = drawn(name)
    u = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)
    with platform.cpu_path(False):
        _, jv = jax.jit(lambda p, v: jax.jvp(lambda p: spec.logits(p, state, x), (p,), (v,)))(
            params, v)
    jtu = jax.jit(lambda p: jax.vjp(lambda p: spec.logits(p, state, x), p)[1](u)[0])(params)
    np.testing.assert_allclose(jnp.vdot(u, jv), inner(jtu, v), rtol=1e-3)
