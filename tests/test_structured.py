"""Structured pruning: the declared groups of every model, the pure unit functions, and
compaction into a smaller dense model that computes what the unit-masked model computes.

Small inputs (8x8 images, batch 4), weights drawn with NumPy in the abstract params' shapes
(compiling `init` costs more than the forward passes), forward passes jitted.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lottery.models import MODELS, build_model, lookup
from lottery.pruning.compact import compact, param_count
from lottery.pruning.masks import apply_masks, full_masks
from lottery.pruning.structured import (
    StructureError,
    group_scores,
    keep_fraction,
    model_groups,
    unit_weight_masks,
    units_alive,
)

SHAPES = {"lenet_300_100": (8, 8, 1), "mnist1d_mlp": (40,), "lenet5": (12, 12, 1),
          "lenet5_caffe": (16, 16, 1), "vgg11": (16, 16, 3), "vgg16": (32, 32, 3),
          "vgg19": (32, 32, 3)}
OUTPUT = {"resnet": "fc", "vgg": "fc"}  # every other model's output layer is "out"


def spec_and_weights(name, seed=0, **options):
    """A spec with random params and random nonzero batch-norm running statistics."""
    spec = build_model(name, SHAPES.get(name, (8, 8, 3)), 10, **options)
    params, state = jax.eval_shape(spec.init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32), params)
    state = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32),
                         state)
    state = jax.tree.map_with_path(  # running means around 0
        lambda path, a: a - 1 if path[-1].key == "mean" else a, state)
    return spec, params, state


def random_units(groups, seed=1, keep=0.5):
    """Unit masks keeping a random half (at least one) of each group's units."""
    rng = np.random.default_rng(seed)
    return {g.name: jnp.asarray(rng.permutation(np.arange(g.size) < max(1, round(keep * g.size))),
                                jnp.float32) for g in groups}


def output_layer(name):
    return next((layer for prefix, layer in OUTPUT.items() if name.startswith(prefix)), "out")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_declares_its_groups(name):
    spec = build_model(name, SHAPES.get(name, (8, 8, 3)), 10)
    params, state = jax.eval_shape(spec.init, jax.random.key(0))
    names = [g.name for g in spec.groups]
    assert len(set(names)) == len(names)
    producers = [layer for g in spec.groups for layer in g.layers]
    assert len(set(producers)) == len(producers)  # each layer writes one group
    # every prunable layer but the output produces a group; the output's units are the classes
    assert sorted(producers) == sorted(set(spec.prunable) - {output_layer(name)})
    for g in spec.groups:
        assert g.kind in ("neurons", "channels")
        for s in g.producers:
            leaf = lookup(state if s.in_state else params, s.layer)[s.leaf]
            assert leaf.shape[s.axis] == g.size
        for s in g.consumers:
            assert lookup(params, s.layer)[s.leaf].shape[s.axis] % g.size == 0
    with pytest.raises(StructureError, match="classes"):
        model_groups(spec, "neurons" if spec.groups[-1].kind == "neurons" else "channels",
                     [output_layer(name)])


def test_resnet_streams_and_block_groups():
    spec = build_model("resnet20", (8, 8, 3), 10)
    groups = {g.name: g for g in model_groups(spec, "channels")}
    assert sorted(groups)[:3] == ["stage1.0.conv1", "stage1.1.conv1", "stage1.2.conv1"]
    stream = groups["stage2.stream"]
    assert set(stream.layers) == {"stage2.0.shortcut", "stage2.0.conv2", "stage2.1.conv2",
                                  "stage2.2.conv2"}
    assert {s.layer for s in stream.consumers} == {"stage2.1.conv1", "stage2.2.conv1",
                                                   "stage3.0.conv1", "stage3.0.shortcut"}
    assert {s.layer for s in groups["stage3.stream"].consumers} >= {"fc"}
    assert model_groups(spec, "channels", ["stage1.1.conv2"]) == (groups["stage1.stream"],)
    assert model_groups(spec, "channels", ["conv"]) == (groups["stage1.stream"],)
    with pytest.raises(StructureError, match="resnet20 has no neurons to remove; it has channels"):
        model_groups(spec, "neurons")


def test_clear_errors():
    spec = build_model("lenet_300_100", (8, 8, 1), 10)
    with pytest.raises(StructureError, match="lenet_300_100 has no channels to remove; it has "
                                             "neurons") as error:
        model_groups(spec, "channels")
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    with pytest.raises(StructureError, match=r"'out' is no group of neurons .*classes.*fc1, fc2"):
        model_groups(spec, "neurons", ["out"])
    with pytest.raises(StructureError, match="kind='filters'"):
        model_groups(spec, "filters")
    conv = build_model("conv2", (8, 8, 3), 10)
    with pytest.raises(StructureError, match="it produces neurons"):
        model_groups(conv, "channels", ["fc1"])
    groups = model_groups(spec, "neurons")
    with pytest.raises(StructureError, match="shape"):
        unit_weight_masks(full_masks(jax.eval_shape(spec.init, jax.random.key(0))[0]), groups,
                          {"fc1": jnp.ones(3)})
    params, state = spec_and_weights("lenet_300_100")[1:]
    with pytest.raises(StructureError, match="removes every unit"):
        compact(spec, params, state, {"fc2": jnp.zeros(100)})


def test_mnist1d_residual_stream_and_plain_layers():
    assert [g.name for g in build_model("mnist1d_mlp", (40,), 10).groups] == ["stream"]
    plain = build_model("mnist1d_mlp", (40,), 10, residual=False)
    assert [g.name for g in plain.groups] == ["fc1", "fc2"]


def test_group_scores_by_hand():
    spec = build_model("lenet_300_100", (2,), 2, hidden=(3, 2))
    params = {"fc1": {"kernel": jnp.array([[3.0, 0, 1], [4, -2, -1]]), "bias": jnp.ones(3)},
              "fc2": {"kernel": jnp.array([[1.0, 0], [0, -2], [2, 0]]), "bias": jnp.ones(2)},
              "out": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    groups = model_groups(spec, "neurons")
    l2 = group_scores(params, groups)
    np.testing.assert_allclose(l2["fc1"], [5, 2, np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(l2["fc2"], [np.sqrt(5), 2], rtol=1e-6)
    l1 = group_scores(params, groups, norm="l1")
    np.testing.assert_allclose(l1["fc1"], [7, 2, 2])
    assert [float(v) for v in keep_fraction(l2, 0.34)["fc1"]] == [1, 0, 0]
    assert [float(v) for v in keep_fraction(l2, 0.6)["fc1"]] == [1, 1, 0]
    # a residual stream: all its producers' kernels count (fc1 and fc2 columns)
    mlp = build_model("mnist1d_mlp", (3,), 2, hidden=2)
    params = {"fc1": {"kernel": jnp.array([[1.0, 0], [2, 0], [2, 1]]), "bias": jnp.ones(2)},
              "fc2": {"kernel": jnp.array([[0.0, 3], [4, 0]]), "bias": jnp.ones(2)},
              "out": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    np.testing.assert_allclose(group_scores(params, mlp.groups)["stream"], [5, np.sqrt(10)],
                               rtol=1e-6)


def test_unit_weight_masks_zero_exactly_the_units_slices():
    spec, params, _ = spec_and_weights("conv2")  # 8x8x3: one pool, fc1 reads 4*4*64 inputs
    groups = model_groups(spec, "channels")
    gone0, gone1 = [3, 10, 40], [0, 5, 6, 63]
    units = {"convs.0": jnp.ones(64).at[jnp.array(gone0)].set(0),
             "convs.1": jnp.ones(64).at[jnp.array(gone1)].set(0)}
    base = full_masks(params)
    base["fc1"]["kernel"] = base["fc1"]["kernel"].at[1, 0].set(0)  # unstructured zeros stay
    masks = unit_weight_masks(base, groups, units)
    zeros = jax.tree.map(lambda m: int(np.sum(np.asarray(m) == 0)), masks)
    k, j = len(gone0), len(gone1)
    assert zeros["convs"][0] == {"kernel": 27 * k, "bias": k}
    assert zeros["convs"][1] == {"kernel": 9 * 64 * (k + j) - 9 * k * j, "bias": j}
    assert zeros["fc1"] == {"kernel": 16 * j * 256 + 1, "bias": 0}  # row 1 is kept unit 1's
    assert zeros["fc2"] == zeros["out"] == {"kernel": 0, "bias": 0}
    rows = np.flatnonzero(np.asarray(masks["fc1"]["kernel"]).sum(axis=1) == 0)
    assert set(rows % 64) == set(gone1) and len(rows) == 16 * j  # (h, w, C), C fastest
    assert np.all(np.asarray(masks["convs"][0]["kernel"])[..., gone0] == 0)
    assert np.all(np.asarray(masks["convs"][1]["kernel"])[:, :, gone0, :] == 0)
    alive = units_alive(masks, groups)
    np.testing.assert_array_equal(alive["convs.0"], units["convs.0"])
    np.testing.assert_array_equal(alive["convs.1"], units["convs.1"])


def test_unit_functions_jit_and_vmap():
    spec, params, _ = spec_and_weights("lenet_300_100")
    groups = model_groups(spec, "neurons")
    stack = jax.tree.map(lambda p: jnp.stack([p, -2 * p]), params)

    @jax.jit
    @jax.vmap
    def level(params, fraction):
        masks = full_masks(params)
        units = keep_fraction(group_scores(apply_masks(params, masks), groups), fraction)
        masks = unit_weight_masks(masks, groups, units)
        return masks, units_alive(masks, groups)

    _, alive = level(stack, jnp.array([0.5, 0.1]))
    assert alive["fc1"].shape == (2, 300)
    np.testing.assert_array_equal(alive["fc1"].sum(axis=1), [150, 30])
    np.testing.assert_array_equal(alive["fc2"].sum(axis=1), [50, 10])
    assert np.all(alive["fc1"][1] <= alive["fc1"][0])  # proportional norms: the best 10% of
    assert np.all(alive["fc2"][1] <= alive["fc2"][0])  # the units are among the best 50%


def outputs(spec, params, state, x):
    """Evaluation-mode logits, and training-mode (batch statistics) logits and new state."""
    return spec.logits(params, state, x), spec.apply(params, state, x, train=True)


def masked(spec, groups):
    """`outputs` of the model with the unit masks' weight masks applied."""
    def run(params, state, units, x):
        masks = unit_weight_masks(full_masks(params), groups, units)
        return outputs(spec, apply_masks(params, masks), state, x)
    return run


def check_compaction(name, kind, **options):
    spec, params, state = spec_and_weights(name, **options)
    groups = model_groups(spec, kind)
    units = random_units(groups)
    small = compact(spec, params, state, units)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, *SHAPES.get(name, (8, 8, 3)))),
                    jnp.float32)
    want, (want_train, want_state) = jax.jit(masked(spec, groups))(params, state, units, x)
    got, (got_train, got_state) = jax.jit(functools.partial(outputs, small.spec))(
        small.params, small.state, x)
    assert np.max(np.abs(want)) > 0.1  # outputs are not trivially zero
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # training mode too (no dropout here: batch norm on batch statistics)
    np.testing.assert_allclose(got_train, want_train, atol=1e-4, rtol=1e-4)
    for g in groups:  # every producer and consumer axis shrinks to the units kept
        kept = int(units[g.name].sum())
        assert small.kept[g.name].tolist() == np.flatnonzero(units[g.name]).tolist()
        for s in g.producers:
            leaf = lookup(small.state if s.in_state else small.params, s.layer)[s.leaf]
            assert leaf.shape[s.axis] == kept
        for s in g.consumers:
            before = lookup(params, s.layer)[s.leaf].shape[s.axis]
            assert lookup(small.params, s.layer)[s.leaf].shape[s.axis] == before // g.size * kept
    assert small.param_count == param_count(small.params) < param_count(params)
    return spec, small, (want_state, got_state)


def test_compact_lenet_neurons_is_a_smaller_consistent_nnx_model():
    spec, small, _ = check_compaction("lenet_300_100", "neurons")
    params, state = spec_and_weights("lenet_300_100")[1:]
    units = random_units(spec.groups)
    x = jnp.ones((4, 8, 8, 1))
    assert isinstance(small.module, nnx.Module)
    assert (small.module.fc1.in_features, small.module.fc1.out_features) == (64, 150)
    assert (small.module.fc2.in_features, small.module.fc2.out_features) == (150, 50)
    assert small.param_count == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    np.testing.assert_allclose(small.module(x), small.spec.logits(small.params, small.state, x),
                               atol=1e-5)
    assert small.spec.init(jax.random.key(5))[0] is small.params
    # the compact model's groups are the smaller ones, and can be compacted again
    assert [g.size for g in small.spec.groups] == [150, 50]
    again = compact(small.spec, small.params, small.state, {"fc1": jnp.arange(150) < 15})
    assert again.params["fc1"]["kernel"].shape == (64, 15)
    # unstructured masks passed along are applied before slicing
    masks = full_masks(params)
    masks["out"]["kernel"] = jnp.zeros_like(masks["out"]["kernel"])
    dead = compact(spec, params, state, units, masks=masks)
    np.testing.assert_allclose(dead.spec.logits(dead.params, dead.state, x),
                               jnp.broadcast_to(params["out"]["bias"], (4, 10)), atol=1e-6)


def test_compact_conv_channels_through_the_flatten():
    _, small, _ = check_compaction("conv2", "channels")
    assert small.params["fc1"]["kernel"].shape == (16 * 32, 256)
    assert small.module.convs[1].out_features == 32


def test_compact_conv_neurons_and_mnist1d_stream():
    check_compaction("conv2", "neurons")
    _, small, _ = check_compaction("mnist1d_mlp", "neurons")
    assert small.params["fc2"]["kernel"].shape == (50, 50)


def test_compact_resnet20_channels_with_streams_and_batch_norm():
    _, small, (want_state, got_state) = check_compaction("resnet20", "channels")
    assert small.module.stage2[0].shortcut_bn.num_features == 16
    assert small.state["stage2"][0]["shortcut_bn"]["mean"].shape == (16,)
    # the kept units' running statistics are updated alike in training mode
    kept = small.kept["stage3.stream"]
    np.testing.assert_allclose(got_state["stage3"][2]["bn2"]["var"],
                               want_state["stage3"][2]["bn2"]["var"][kept], rtol=1e-5)


def test_the_benchmark_section_reports_every_model_and_fraction(capsys):
    from lottery import bench

    models = (("lenet_300_100", (8, 8, 1), "neurons", 2),)
    rows = bench.compact_rates(models, kept=(0.5,), batch=4, inference_batches=(8,), repeats=1,
                               min_time=0)
    assert [(r["model"], r["kind"], r["kept"]) for r in rows] == [
        ("lenet_300_100", "neurons", 1.0), ("lenet_300_100", "neurons", 0.5)]
    assert rows[0]["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert rows[1]["params"] == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    assert all(r["train_steps_per_s"] > 0 and r["inference_per_s"][8] > 0 for r in rows)
    bench.print_compact(rows, 4, 1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(rows) and "x dense" in lines[1]
    assert lines[2].split()[-1] == lines[2].split()[-3] == "1.00x"  # dense against itself
