"""Importance scores of the transformer's structures: attention heads, FFN units, layers.

    scores(method, config, params, masks, batches)
        -> {"heads": [(H_l,) per layer], "ffn": [(F_l,) per layer], "layers": (L,)}

Higher is more important; the pruning loop removes the lowest. `batches` is a sequence of
(inputs, targets) int arrays (B, T) (unused by "weight"); `masks` are the current gates
(`lottery.lm.gpt.full_masks` layout): the scores are of the currently masked model, and a
unit already removed gets a score too (the caller ignores it).

  weight  the L2 norm of a unit's own parameters: a head's wq, wk, wv columns, their biases
          and its rows of wo; an FFN unit's w1 column, b1 entry and w2 row; a layer's: the
          root of the sum of its heads' and units' squares (LayerNorms are not counted).
  taylor  first-order Taylor importance (Molchanov et al. 2019; Michel et al. 2019 for
          heads): the mean over examples of |dL_example / d gate|, L_example the example's
          mean next-byte loss. One `jax.grad` w.r.t. the gates per batch, with the gates
          given per sequence ((B, 1, n) leaves, see gpt.py), so the absolute value is taken
          per example before averaging. The gate gradient is the sum over tokens of
          <ungated activation, gradient of the gated activation>, i.e. activation x gradient.
  wanda   Wanda (Sun et al. 2024) aggregated per structure: sum over a unit's weights of
          |W_ij| * ||X_j||, ||X_j|| the L2 norm over every token of all batches of the weight's
          input feature j (captured by `gpt.apply(..., capture=True)`): `attn_in` for wq, wk,
          wv; each head's output for wo; `ffn_in` for w1; the FFN activation for w2. Biases
          are not counted. A layer's score is the sum of its heads' and units' scores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lottery.lm import gpt

METHODS = ("weight", "taylor", "wanda")


class ScoreError(ValueError):
    """An unknown scoring method, or no batches for a method that needs data."""


def _empty(config):
    return {"heads": [np.zeros(h) for h in config.heads],
            "ffn": [np.zeros(f) for f in config.ffn], "layers": np.zeros(config.layers)}


def weight_scores(config: gpt.GPTConfig, params: dict) -> dict:
    out = _empty(config)
    for layer in range(config.layers):
        block = jax.tree.map(np.asarray, params["blocks"][layer])
        if "attn" in block:
            a = block["attn"]
            squares = sum((a[w] ** 2).sum(axis=(0, 2)) for w in ("wq", "wk", "wv"))
            squares += sum((a[b] ** 2).sum(axis=1) for b in ("bq", "bk", "bv"))
            out["heads"][layer] = np.sqrt(squares + (a["wo"] ** 2).sum(axis=(1, 2)))
        if "mlp" in block:
            m = block["mlp"]
            out["ffn"][layer] = np.sqrt((m["w1"] ** 2).sum(0) + m["b1"] ** 2
                                        + (m["w2"] ** 2).sum(1))
        out["layers"][layer] = np.sqrt((out["heads"][layer] ** 2).sum()
                                       + (out["ffn"][layer] ** 2).sum())
    return out


@functools.partial(jax.jit, static_argnums=0)
def _gate_gradients(config, params, masks, x, y):
    """Per-example gate gradients of the batch-mean loss: (B, n) per leaf."""
    B = x.shape[0]
    per_example = jax.tree.map(lambda m: jnp.broadcast_to(m, (B, 1, m.shape[-1])), masks)
    grads = jax.grad(lambda m: gpt.loss(config, params, x, y, m))(per_example)
    return jax.tree.map(lambda g: g[:, 0], grads)


def taylor_scores(config: gpt.GPTConfig, params: dict, masks, batches) -> dict:
    out, examples = _empty(config), 0
    masks = jax.tree.map(jnp.asarray, masks)
    for x, y in batches:
        grads = _gate_gradients(config, params, masks, jnp.asarray(x), jnp.asarray(y))
        B = np.shape(x)[0]  # the batch-mean loss scales each example's gradient by 1 / B
        for kind in ("heads", "ffn"):
            for layer, g in enumerate(grads[kind]):
                out[kind][layer] = out[kind][layer] + B * np.abs(np.asarray(g)).sum(0)
        out["layers"] = out["layers"] + B * np.abs(np.asarray(grads["layers"])).sum(0)
        examples += B
    return jax.tree.map(lambda s: s / examples, out)


@functools.partial(jax.jit, static_argnums=0)
def _feature_squares(config, params, masks, x):
    """Sum over (B, T) of each input feature's square: attn_in, heads, ffn_in, ffn."""
    _, captured = gpt.apply(config, params, x, masks, capture=True)
    squares = {}
    for key in ("attn_in", "heads", "ffn_in", "ffn"):
        squares[key] = [None if a is None else jnp.sum(a ** 2, axis=(0, 1))
                        for a in captured[key]]
    return squares


def wanda_scores(config: gpt.GPTConfig, params: dict, masks, batches) -> dict:
    total = None
    masks = jax.tree.map(jnp.asarray, masks)
    for x, _ in batches:
        squares = _feature_squares(config, params, masks, jnp.asarray(x))
        total = squares if total is None else jax.tree.map(jnp.add, total, squares)
    norms = jax.tree.map(lambda s: np.sqrt(np.asarray(s, np.float64)), total)
    out = _empty(config)
    for layer in range(config.layers):
        block = jax.tree.map(np.asarray, params["blocks"][layer])
        if "attn" in block:
            a, n_in = block["attn"], norms["attn_in"][layer]
            score = sum(np.einsum("dhk,d->h", np.abs(a[w]), n_in) for w in ("wq", "wk", "wv"))
            out["heads"][layer] = score + np.einsum("hkd,hk->h", np.abs(a["wo"]),
                                                    norms["heads"][layer])
        if "mlp" in block:
            m = block["mlp"]
            out["ffn"][layer] = (np.abs(m["w1"]).T @ norms["ffn_in"][layer]
                                 + np.abs(m["w2"]).sum(1) * norms["ffn"][layer])
        out["layers"][layer] = out["heads"][layer].sum() + out["ffn"][layer].sum()
    return out


def scores(method: str, config: gpt.GPTConfig, params: dict, masks=None, batches=()) -> dict:
    """Importance of every head, FFN unit and layer (see the module docstring)."""
    if method not in METHODS:
        raise ScoreError(f"unknown score method {method!r}; choose one of {', '.join(METHODS)}")
    masks = gpt.full_masks(config) if masks is None else masks
    gpt.check_mask_shapes(config, masks)
    if method == "weight":
        return weight_scores(config, params)
    batches = list(batches)
    if not batches:
        raise ScoreError(f"score method {method!r} needs at least one batch of data")
    if method == "taylor":
        return taylor_scores(config, params, masks, batches)
    return wanda_scores(config, params, masks, batches)
