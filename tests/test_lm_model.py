"""The transformer foundation of the prune-and-finetune workflow (lottery.lm): the model's
exact parameter count and causality, gate gradients (the Taylor scores' source), compaction
equal to masking, int8 quantization, the byte corpus, and one clear error per bad request.

Tiny models (d_model 32, 3 layers, 4 heads, context 16) on random tokens; the weights are
perturbed away from the small GPT-2 initialisation so that every sublayer matters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from lottery.lm import compact, corpus, gpt, measure, quantize, train
from lottery.train import padded_batches
from lottery.lm.compact import PruneRequestError

CONFIG = gpt.GPTConfig(vocab=256, context=16, d_model=32, head_dim=8, heads=(4, 4, 4),
                       ffn=(64, 64, 64))


def count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def cross_entropy(logits, targets) -> float:
    """Mean cross entropy (nats), in NumPy (no new program to compile)."""
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]))


@pytest.fixture(scope="module")
def params():
    return helpers.random_gpt_params(CONFIG, std=0.2, seed=1)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(2).integers(0, CONFIG.vocab, (3, CONFIG.context)))


# everything jitted: eager JAX compiles every operation of the model on its own
forward = jax.jit(gpt.apply, static_argnums=0)


def masks_with(**changes):
    """Full masks with entries changed: heads={(layer, unit): value}, ffn=..., layers=..."""
    masks = jax.tree.map(np.array, gpt.full_masks(CONFIG))
    for kind, entries in changes.items():
        for where, value in entries.items():
            if kind == "layers":
                masks["layers"][where] = value
            else:
                layer, unit = where
                masks[kind][layer][unit] = value
    return masks


def test_param_count_is_exact():
    configs = [CONFIG, gpt.GPTConfig.uniform(2, 2, 16, context=8),
               gpt.GPTConfig(vocab=7, context=5, d_model=6, head_dim=3, heads=(0, 2, 1),
                             ffn=(4, 0, 3))]
    for config in configs:  # init's exact shapes and dtypes, traced but not compiled
        p = jax.eval_shape(lambda c=config: gpt.init(c, jax.random.key(0)))
        assert count(p) == gpt.param_count(config)
        assert gpt.param_bytes(p) == 4 * gpt.param_count(config)
    assert "attn" not in p["blocks"][0] and "mlp" not in p["blocks"][1]
    p = gpt.init(CONFIG, jax.random.key(0))  # GPT-2's initialisation
    assert count(p) == gpt.param_count(CONFIG)
    block = p["blocks"][1]
    assert np.std(p["tokens"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(block["attn"]["wo"]) == pytest.approx(0.02 / np.sqrt(6), rel=0.1)
    assert not np.any(block["attn"]["bq"]) and np.all(block["ln2"]["scale"] == 1)
    assert not np.allclose(block["mlp"]["w1"], p["blocks"][2]["mlp"]["w1"])
    assert gpt.GPTConfig.uniform(3, 4, 32).ffn == (128,) * 3
    assert gpt.GPTConfig.uniform(3, 4, 32).layers == 3


def test_causal_and_vmappable(params, tokens):
    masks = gpt.full_masks(CONFIG)
    logits = forward(CONFIG, params, tokens, masks)
    assert logits.shape == (3, CONFIG.context, CONFIG.vocab)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % CONFIG.vocab)
    other = forward(CONFIG, params, changed, masks)
    np.testing.assert_array_equal(logits[:, :9], other[:, :9])
    assert not np.allclose(logits[:, 9:], other[:, 9:])
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params)
    both = jax.jit(jax.vmap(lambda p: gpt.apply(CONFIG, p, tokens, masks)))(stacked)
    np.testing.assert_allclose(both[0], logits, atol=1e-5)


CASES = {
    "heads": (dict(heads={(0, 1): 0, (1, 0): 0, (1, 3): 0, (2, 2): 0}), False),
    "ffn": (dict(ffn={(layer, unit): 0 for layer in range(3) for unit in range(0, 64, 3)}),
            False),
    "layer": (dict(layers={1: 0}), False),
    "mixed": (dict(heads={(0, 0): 0.5, (0, 2): 0, (2, 1): 0.25}, layers={0: 0.7, 2: 0},
                   ffn={**{(1, u): 0 for u in range(64)}, (0, 5): 0, (0, 9): 0.3}), True),
}


@pytest.mark.parametrize("case", CASES)
def test_compacted_equals_masked(case, params, tokens):
    changes, allow = CASES[case]
    masks = masks_with(**changes)
    small, small_params = compact.compact(CONFIG, params, masks, allow_empty_layers=allow)
    kept = compact.check_masks(CONFIG, masks, allow_empty_layers=allow)
    assert small.layers == len(kept["layers"]) and small.heads == tuple(
        h.size for h in kept["heads"])
    assert count(small_params) == gpt.param_count(small) < gpt.param_count(CONFIG)
    np.testing.assert_allclose(forward(small, small_params, tokens),
                               forward(CONFIG, params, tokens, masks), atol=2e-5, rtol=1e-5)
    if case == "mixed":  # layer 1 lost its whole FFN, layer 2 went: attention only is left
        assert small == gpt.GPTConfig(256, 16, 32, 8, heads=(3, 4), ffn=(63, 0))
        assert "mlp" not in small_params["blocks"][1] and "ln2" not in small_params["blocks"][1]
        # a compacted model is the same class: compacting it again works the same way
        again = jax.tree.map(np.array, gpt.full_masks(small))
        again["heads"][1][2] = 0
        smaller, smaller_params = compact.compact(small, small_params, again)
        np.testing.assert_allclose(forward(smaller, smaller_params, tokens),
                                   forward(small, small_params, tokens, again), atol=2e-5)


def test_gate_gradients(params, tokens):
    """d loss / d gate equals a finite difference and, at gates 1, the sum over the gate's
    outgoing weights of weight x gradient (the Taylor score of the unit). Gates with leading
    (batch, time) axes give per-token gradients that sum to the per-unit one: head gates are
    given per token here, layer gates per sequence, FFN gates per unit (one program)."""
    x = tokens
    y = jnp.asarray(np.random.default_rng(3).integers(0, CONFIG.vocab, x.shape))
    B, T = x.shape
    gates = {"heads": [jnp.ones((B, T, h)) for h in CONFIG.heads],
             "ffn": [jnp.ones((f,)) for f in CONFIG.ffn],
             "layers": jnp.ones((B, 1, CONFIG.layers))}
    grads = jax.jit(jax.grad(lambda p, m: gpt.loss(CONFIG, p, x, y, m), argnums=(0, 1)))
    by_weight, by_gate = grads(params, gates)
    by_unit = {"heads": [g.sum((0, 1)) for g in by_gate["heads"]], "ffn": by_gate["ffn"],
               "layers": by_gate["layers"].sum((0, 1))}

    def slope(kind, where, eps=1e-2):
        up, down = (masks_with(**{kind: {where: 1 + e}}) for e in (eps, -eps))
        return (cross_entropy(forward(CONFIG, params, x, up), np.asarray(y)) -
                cross_entropy(forward(CONFIG, params, x, down), np.asarray(y))) / (2 * eps)
    assert slope("heads", (1, 2)) == pytest.approx(float(by_unit["heads"][1][2]), abs=2e-3)
    assert slope("ffn", (0, 7)) == pytest.approx(float(by_unit["ffn"][0][7]), abs=2e-3)
    assert slope("layers", 2) == pytest.approx(float(by_unit["layers"][2]), abs=2e-3)

    for layer in range(CONFIG.layers):
        w, g = params["blocks"][layer], by_weight["blocks"][layer]
        heads = jnp.einsum("hkd,hkd->h", w["attn"]["wo"], g["attn"]["wo"])
        np.testing.assert_allclose(by_unit["heads"][layer], heads, rtol=1e-3, atol=1e-6)
        units = jnp.einsum("fd,fd->f", w["mlp"]["w2"], g["mlp"]["w2"])
        np.testing.assert_allclose(by_unit["ffn"][layer], units, rtol=1e-3, atol=1e-6)
        whole = jnp.vdot(w["attn"]["wo"], g["attn"]["wo"]) + jnp.vdot(w["mlp"]["w2"],
                                                                      g["mlp"]["w2"])
        np.testing.assert_allclose(by_unit["layers"][layer], whole, rtol=1e-3, atol=1e-6)


def test_capture(params, tokens):
    masks = masks_with(heads={(0, 1): 0})
    logits, captured = jax.jit(lambda p, t, m: gpt.apply(CONFIG, p, t, m, capture=True))(
        params, tokens, masks)
    np.testing.assert_allclose(logits, forward(CONFIG, params, tokens, masks), atol=1e-6)
    B, T = tokens.shape
    assert [a.shape for a in captured["heads"]] == [(B, T, 4, 8)] * 3
    assert [a.shape for a in captured["ffn"]] == [(B, T, 64)] * 3
    for key in ("layers", "attn_in", "ffn_in", "block_out"):
        assert [a.shape for a in captured[key]] == [(B, T, 32)] * 3
    # each block's input is the previous block's input plus its residual contribution
    np.testing.assert_allclose(captured["layers"][0] + captured["block_out"][0],
                               captured["layers"][1], atol=1e-5)
    assert np.abs(captured["heads"][0][:, :, 1]).max() > 0  # ungated: what the gate scales


def test_quantized_round_trip_and_loss(params, tokens):
    q = quantize.quantize(params)
    back = quantize.dequantize(q)
    for (path, w), r, t in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(back),
                               jax.tree.leaves(q.params, is_leaf=lambda t: isinstance(
                                   t, quantize.QTensor))):
        if w.ndim < 2:
            assert not isinstance(t, quantize.QTensor) and t.dtype == jnp.float32
            np.testing.assert_array_equal(r, w)
            continue
        assert t.values.dtype == jnp.int8 and t.scale.dtype == jnp.float32
        assert np.all(np.abs(w - r) <= t.scale / 2 * (1 + 1e-5) + 1e-12), path
    assert q.params["tokens"].scale.shape == (256, 1)
    assert q.params["blocks"][0]["attn"]["wo"].scale.shape == (1, 1, 32)
    assert quantize.quantized_bytes(q) < gpt.param_bytes(params) / 3
    y = np.asarray(tokens[:, 1:])
    masks = gpt.full_masks(CONFIG)
    exact = cross_entropy(forward(CONFIG, params, tokens, masks)[:, :-1], y)
    approx = cross_entropy(forward(CONFIG, back, tokens, masks)[:, :-1], y)  # apply_quantized
    assert abs(approx - exact) < 0.02 * exact


def test_corpus(tmp_path):
    first = corpus.load_corpus("stdlib", max_bytes=100_000)
    again = corpus.load_corpus("stdlib", max_bytes=100_000)
    assert first.train.dtype == np.uint8 and first.validation.dtype == np.uint8
    assert (first.train.size, first.validation.size) == (95_000, 5_000)
    np.testing.assert_array_equal(first.train, again.train)
    np.testing.assert_array_equal(first.validation, again.validation)
    files = corpus.stdlib_files()
    assert files and not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    assert first.train[:100].tobytes() == files[0].read_bytes()[:100]

    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(256)) * 40)
    own = corpus.load_corpus(str(text), max_bytes=10_000, validation_fraction=0.1)
    assert (own.train.size, own.validation.size, own.name) == (9_000, 1_000, "text")
    np.testing.assert_array_equal(own.validation[:3], [40, 41, 42])  # 9000 % 256 = 40

    key = jax.random.key(3)
    x, y = corpus.sample_batch(jnp.asarray(own.train), key, 4, 16)
    assert x.shape == y.shape == (4, 16) and x.dtype == jnp.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal((x + 1) % 256, y)  # windows of the file's byte ramp
    np.testing.assert_array_equal(corpus.sample_batch(jnp.asarray(own.train), key, 4, 16)[0], x)

    wx, wy = corpus.windows(own.validation, 16)
    assert wx.shape == wy.shape == (999 // 16, 16)
    np.testing.assert_array_equal(wx.ravel()[1:], wy.ravel()[:-1])
    assert corpus.windows(own.validation, 16, max_windows=5)[0].shape == (5, 16)
    assert corpus.bits_per_byte(np.log(2)) == pytest.approx(1)
    assert corpus.perplexity(np.log(3.0)) == pytest.approx(3)


def test_evaluate_and_measure(params, tokens):
    data = np.random.default_rng(0).integers(0, 256, 16 * 3 + 1).astype(np.uint8)
    x, y = corpus.windows(data, 16)
    split = padded_batches(x, y, 2)  # 3 windows: the second batch padded
    mean, accuracy = train.evaluate(CONFIG, params, split)
    logits = forward(CONFIG, params, jnp.asarray(x), gpt.full_masks(CONFIG))
    assert float(mean) == pytest.approx(cross_entropy(logits, y), rel=1e-5)
    assert float(accuracy) == pytest.approx(float(np.mean(np.argmax(np.asarray(logits), -1) == y)),
                                            abs=1e-6)
    # through apply_quantized (dequantize, then the float forward, in one program)
    assert measure.tokens_per_second(CONFIG, quantize.quantize(params), batch=3, repeats=2) > 0


def test_bad_requests(params, tmp_path):
    def error(call) -> str:
        with pytest.raises((PruneRequestError, corpus.CorpusError)) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        return message

    no_heads = masks_with(heads={(1, h): 0 for h in range(4)})
    message = error(lambda: compact.check_masks(CONFIG, no_heads))
    assert "every head of layer 1" in message and "masks['layers'][1] = 0" in message
    # removing the layer explicitly is fine, and so is dropping its attention when allowed
    assert compact.check_masks(CONFIG, masks_with(layers={1: 0}, heads={(1, 0): 0}))
    small, _ = compact.compact(CONFIG, params, no_heads, allow_empty_layers=True)
    assert small.heads == (4, 0, 4)
    assert "all 3 layers" in error(lambda: compact.compact(
        CONFIG, params, masks_with(layers={0: 0, 1: 0, 2: 0})))

    wrong = masks_with()
    wrong["ffn"][2] = np.ones(63)
    assert "masks['ffn'][2] has shape (63,)" in error(lambda: compact.check_masks(CONFIG, wrong))
    assert "masks['ffn'][2]" in error(lambda: gpt.apply(CONFIG, params, jnp.zeros((1, 4), int),
                                                          wrong))
    short = masks_with()
    short["heads"] = short["heads"][:2]
    assert "list of 3" in error(lambda: compact.check_masks(CONFIG, short))
    assert "outside [0, 1]" in error(lambda: compact.check_masks(
        CONFIG, masks_with(heads={(0, 0): -1})))
    other = gpt.GPTConfig(256, 16, 32, 8, heads=(4, 4, 4), ffn=(64, 32, 64))
    assert "do not match" in error(lambda: compact.compact(other, params,
                                                           gpt.full_masks(other)))
    with pytest.raises(ValueError, match="layer 1 has no heads and no FFN"):
        gpt.GPTConfig(heads=(1, 0), ffn=(4, 0))

    assert "does not exist" in error(lambda: corpus.load_corpus(str(tmp_path / "nope.txt")))
    assert "is a directory" in error(lambda: corpus.load_corpus(str(tmp_path)))
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in error(lambda: corpus.load_corpus(str(tmp_path / "empty.txt")))
