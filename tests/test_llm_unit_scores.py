"""Importance scores of a pretrained model's units (`lottery.llm.unit_scores`).

Expected values come from other paths than the function's: Taylor from explicit gates
written here (the units' output rows of o_proj / down_proj (GPT-2: attn.c_proj,
mlp.c_proj) and, for a layer, its output biases multiplied by a gate g in the weights, the
model run with `model.apply`, `jax.grad` w.r.t. g at g = 1 one example at a time, the loss
written here with `jax.nn.log_softmax`), not from the function's <W, dL/dW> identity; weight
and wanda for one unit of each kind from the raw weight slices written out by hand (head
group 1 of layer 1: query heads 2 and 3, columns 16:32; key/value head 1, columns 8:16),
wanda's input norms captured here block by block. Fixtures: tests/fixtures/hf/ (llama and
qwen2: 4 query / 2 key/value heads, head_dim 8, FFN 64, 2 layers; gpt2: 4 heads of 8,
FFN 128).
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery.llm import hf, model
from lottery.llm.compact import compact, uniform_request
from lottery.llm.unit_scores import METHODS, ScoreError, scores

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("llama", "qwen2", "gpt2")
OUTPUTS = {"llama": ("self_attn.o_proj", "mlp.down_proj"),
           "gpt2": ("attn.c_proj", "mlp.c_proj")}


@functools.cache
def loaded(name: str):
    spec, params = hf.load(FIXTURES / name)
    reference = np.load(FIXTURES / name / "reference.npz")["tokens"].astype(np.int32)
    other = np.random.default_rng(1).integers(0, spec.vocab, (2, 24)).astype(np.int32)
    return spec, params, [reference, other]


@functools.cache
def computed(name: str, method: str):
    spec, params, batches = loaded(name)
    return scores(method, spec, params, batches)


def linear(spec, params, layer, path):
    return model.at(model.blocks_of(spec, params)[layer], path)


# --- taylor: explicit gates ---------------------------------------------------------------

def gated_params(spec, params, gates):
    """params with each unit's output rows multiplied by its gate and both sublayers'
    output projections (kernel and bias) by the layer gate. gates: {"heads": (L, n_heads)
    one gate per query head, "ffn": (L, ffn), "layers": (L,)}."""
    a, b = model.block_path(spec)
    attn, mlp = OUTPUTS[spec.family]
    blocks = {}
    for layer, block in params[a][b].items():
        block = jax.tree.map(jnp.asarray, block)
        head_of_row = np.arange(spec.heads * spec.head_dim) // spec.head_dim
        scale = {attn: gates["heads"][layer][head_of_row], mlp: gates["ffn"][layer]}
        for path in (attn, mlp):
            *parents, leaf = path.split(".")
            parent = model.at(block, ".".join(parents))
            new = {"kernel": parent[leaf]["kernel"] * scale[path][:, None]
                   * gates["layers"][layer]}
            if "bias" in parent[leaf]:
                new["bias"] = parent[leaf]["bias"] * gates["layers"][layer]
            block = {**block, parents[0]: {**parent, leaf: new}}
        blocks[layer] = block
    return {**params, a: {**params[a], b: blocks}}


@functools.partial(jax.jit, static_argnums=0)
def gate_gradient(spec, params, gates, sequence):
    """d(mean next-token cross entropy of one sequence) / d gates."""
    def loss(g):
        logits = model.apply(spec, gated_params(spec, params, g), sequence[None])[0, :-1]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), sequence[1:, None], 1).mean()
    return jax.grad(loss)(gates)


@functools.cache
def explicit_gate_gradients(name: str):
    """Per-example gradients w.r.t. one gate per query head, per channel, per layer."""
    spec, params, batches = loaded(name)
    L = spec.layers
    ones = {"heads": jnp.ones((L, spec.heads)), "ffn": jnp.ones((L, spec.ffn)),
            "layers": jnp.ones(L)}
    return [jax.tree.map(np.asarray, gate_gradient(spec, params, ones, jnp.asarray(sequence)))
            for batch in batches for sequence in batch]


def assert_close(actual, expected):
    """Equal up to float32 rounding of a backward pass: 1e-4 relative to the largest."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", NAMES)
def test_taylor_is_the_mean_absolute_gradient_of_explicit_gates(name):
    spec = loaded(name)[0]
    got = computed(name, "taylor")
    per_example = explicit_gate_gradients(name)
    assert len(per_example) == 4
    # a group's gate is its query heads' gates tied: the sum of their gradients
    group = [g["heads"].reshape(spec.layers, spec.kv_heads, spec.groups).sum(-1)
             for g in per_example]
    expected_heads = np.mean(np.abs(group), axis=0)
    for layer in range(spec.layers):
        assert got["heads"][layer].shape == (spec.kv_heads,)  # llama, qwen2: 2 groups of 2
        assert got["heads"][layer].dtype == np.float64
        assert_close(got["heads"][layer], expected_heads[layer])
        assert_close(got["ffn"][layer], np.mean([np.abs(g["ffn"][layer]) for g in per_example],
                                                axis=0))
    assert_close(got["layers"], np.mean([np.abs(g["layers"]) for g in per_example], axis=0))
    if spec.groups > 1:  # the tied gate is not the two heads scored apart
        apart = np.mean(np.abs([g["heads"] for g in per_example]), axis=0)
        apart = apart.reshape(spec.layers, spec.kv_heads, spec.groups).sum(-1)
        assert not np.allclose(apart, expected_heads, rtol=1e-3)


def test_taylor_layer_gate_includes_the_output_biases():
    """GPT-2 has output biases: its layer gate's gradient is not its units' gates' sum."""
    per_example = explicit_gate_gradients("gpt2")
    for g in per_example:
        units = g["heads"].sum(1) + g["ffn"].sum(1)
        assert np.abs(g["layers"] - units).max() > 1e-3 * np.abs(g["layers"]).max()


def test_taylor_group_gradient_by_finite_difference():
    """One group's gate in llama's layer 1, by a central difference (float32: 1e-2)."""
    spec, params, batches = loaded("llama")
    sequence = jnp.asarray(batches[0][0])
    L = spec.layers

    def loss(g):
        heads = jnp.ones((L, spec.heads)).at[1, 2:4].set(g)  # group 1: query heads 2, 3
        gates = {"heads": heads, "ffn": jnp.ones((L, spec.ffn)), "layers": jnp.ones(L)}
        logits = model.apply(spec, gated_params(spec, params, gates), sequence[None])[0, :-1]
        shifted = np.asarray(logits, np.float64) - np.asarray(logits).max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))  # in float64
        return -np.take_along_axis(logp, np.asarray(sequence)[1:, None], 1).mean()

    eps = 1e-2
    difference = (loss(1 + eps) - loss(1 - eps)) / (2 * eps)
    exact = explicit_gate_gradients("llama")[0]["heads"][1, 2:4].sum()
    assert difference == pytest.approx(exact, rel=1e-2, abs=1e-4)


# --- weight: by hand ----------------------------------------------------------------------

def hand_slices(spec, params, name):
    """{unit: [arrays]}: the weights of head group (or head) 1, channel 5 and all units of
    layer 1, written out. Group 1: llama's query heads 2, 3 (columns 16:32), key/value
    head 1 (columns 8:16); GPT-2's head 1: columns 8:16 of each of q, k, v (offsets 0, 32,
    64 in c_attn)."""
    def w(path, leaf="kernel"):
        return np.asarray(linear(spec, params, 1, path).get(leaf))
    if name == "gpt2":
        qkv, bias = w("attn.c_attn"), w("attn.c_attn", "bias")
        cols = np.r_[8:16, 40:48, 72:80]
        head = [qkv[:, cols], bias[cols], w("attn.c_proj")[8:16]]
        channel = [w("mlp.c_fc")[:, 5], w("mlp.c_fc", "bias")[5], w("mlp.c_proj")[5]]
        layer = [qkv, bias, w("attn.c_proj"), w("mlp.c_fc"), w("mlp.c_fc", "bias"),
                 w("mlp.c_proj")]
        return {"head": head, "channel": channel, "layer": layer}
    q, k, v, o = (w(f"self_attn.{p}_proj") for p in "qkvo")
    head = [q[:, 16:32], k[:, 8:16], v[:, 8:16], o[16:32]]
    layer = [q, k, v, o]
    if name == "qwen2":
        biases = [w(f"self_attn.{p}_proj", "bias") for p in "qkv"]
        head += [biases[0][16:32], biases[1][8:16], biases[2][8:16]]
        layer += biases
    gate, up, down = (w(f"mlp.{p}_proj") for p in ("gate", "up", "down"))
    return {"head": head, "channel": [gate[:, 5], up[:, 5], down[5]],
            "layer": layer + [gate, up, down]}


def norm(arrays):
    return np.sqrt(sum((np.asarray(a, np.float64) ** 2).sum() for a in arrays))


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_the_l2_norm_of_the_units_slices(name):
    spec, params, _ = loaded(name)
    got, hand = computed(name, "weight"), hand_slices(spec, params, name)
    assert got["heads"][1][1] == pytest.approx(norm(hand["head"]), rel=1e-12)
    assert got["ffn"][1][5] == pytest.approx(norm(hand["channel"]), rel=1e-12)
    assert got["layers"][1] == pytest.approx(norm(hand["layer"]), rel=1e-12)


# --- wanda: one unit in NumPy -------------------------------------------------------------

def captured_norms(spec, params, batches, layer):
    """Input name -> each feature's L2 norm over all tokens, at `layer`, block by block."""
    squares = {}
    for tokens in batches:
        x = model.embed(spec, model.outer(spec, params), jnp.asarray(tokens))
        for i in range(layer + 1):
            x, inputs = model.block(spec, model.blocks_of(spec, params)[i], x, True)
        for key, value in inputs.items():
            value = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
            squares[key] = squares.get(key, 0) + (value ** 2).sum(0)
    return {key: np.sqrt(s) for key, s in squares.items()}


@pytest.mark.parametrize("name", NAMES)
def test_wanda_one_unit_recomputed(name):
    spec, params, batches = loaded(name)
    n = captured_norms(spec, params, batches, 1)

    def w(path):
        return np.abs(np.asarray(linear(spec, params, 1, path)["kernel"], np.float64))
    if name == "gpt2":  # head 1, channel 5
        cols = np.r_[8:16, 40:48, 72:80]
        head = (w("attn.c_attn")[:, cols] * n["attn_in"][:, None]).sum() + \
            (w("attn.c_proj")[8:16] * n["attn_out"][8:16, None]).sum()
        channel = (w("mlp.c_fc")[:, 5] * n["mlp_in"]).sum() + \
            w("mlp.c_proj")[5].sum() * n["mlp_hidden"][5]
    else:  # group 1 (query heads 2, 3; key/value head 1), channel 5
        head = sum((w(f"self_attn.{p}_proj")[:, cols] * n["attn_in"][:, None]).sum()
                   for p, cols in (("q", slice(16, 32)), ("k", slice(8, 16)),
                                   ("v", slice(8, 16))))
        head += (w("self_attn.o_proj")[16:32] * n["attn_out"][16:32, None]).sum()
        channel = sum((w(f"mlp.{p}_proj")[:, 5] * n["mlp_in"]).sum() for p in ("gate", "up"))
        channel += w("mlp.down_proj")[5].sum() * n["mlp_hidden"][5]
    got = computed(name, "wanda")
    assert got["heads"][1][1] == pytest.approx(head, rel=1e-5)
    assert got["ffn"][1][5] == pytest.approx(channel, rel=1e-5)
    assert got["layers"][1] == pytest.approx(got["heads"][1].sum() + got["ffn"][1].sum())


# --- the layout compact takes -------------------------------------------------------------

@pytest.mark.parametrize("method", tuple(METHODS))
@pytest.mark.parametrize("name", NAMES)
def test_scores_drive_compact(name, method):
    spec, params, batches = loaded(name)
    got = computed(name, method)
    assert [s.shape for s in got["heads"]] == [(spec.kv_heads,)] * spec.layers
    assert [s.shape for s in got["ffn"]] == [(spec.ffn,)] * spec.layers
    assert got["layers"].shape == (spec.layers,) and got["layers"].dtype == np.float64
    keep_groups = spec.kv_heads if name == "gpt2" else 1  # GPT-2 cannot lose heads
    request = uniform_request(got, keep_groups, 40, drop_layers=1)
    assert request.drop_layers == (int(np.argmin(got["layers"])),)
    new_spec, new_params = compact(spec, params, request)
    assert (new_spec.layers, new_spec.kv_heads, new_spec.ffn) == (1, keep_groups, 40)
    logits = model.apply(new_spec, new_params, jnp.asarray(batches[0]))
    assert logits.shape == (2, 24, spec.vocab) and np.isfinite(np.asarray(logits)).all()


def test_errors_say_what_to_do():
    spec, params, _ = loaded("llama")
    with pytest.raises(ScoreError, match="choose one of weight, taylor, wanda"):
        scores("fisher", spec, params)
    with pytest.raises(ScoreError, match="needs at least one batch"):
        scores("taylor", spec, params, [])
    with pytest.raises(ScoreError, match=r"\(B, T\)"):
        scores("wanda", spec, params, [np.zeros(8, np.int32)])
