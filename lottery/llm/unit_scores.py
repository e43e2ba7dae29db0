"""Importance scores of a pretrained model's structured units: head groups, FFN channels,
layers (the units `lottery.llm.compact` removes), as `lottery.lm.scores` scores its own
small transformer's.

    scores(method, spec, params, batches)
        -> {"heads": [(kv_heads,) per layer], "ffn": [(ffn,) per layer], "layers": (layers,)}

float64 NumPy, higher = more important: the layout `compact.uniform_request` takes. A head
score is one number per head GROUP (a key/value head and the query heads sharing it; GPT-2:
one head). `batches`: token ids (B, T) int, the loss of an example its mean next-token
cross entropy over its T - 1 predictions (unused by "weight"). A unit's weights are the
slices `compact` removes: a group's q_proj columns of its query heads, k_proj's and v_proj's
of its key/value head, their biases, o_proj's rows of its query heads (GPT-2: its q, k and v
columns of attn.c_attn and their biases, its attn.c_proj rows); a channel's gate_proj and
up_proj columns and biases, its down_proj row (GPT-2: mlp.c_fc column and bias, mlp.c_proj
row). Output biases belong to no unit.

  weight  the L2 norm of a unit's weights; a layer's: the root of the sum of its units'
          squares (lm/scores.py's definition; its norms and output biases are not counted,
          as lm/scores.py does not count LayerNorms).
  taylor  first-order Taylor importance: the mean over all examples (of all batches) of
          |dL_example / dg|, g a multiplicative gate on the unit's output (= 1), as
          lm/scores.py. A group's gate scales all its query heads together, so its score is
          |the sum of their gradients|; a layer's gate scales both sublayers' residual
          contributions with their output biases. No gate is built: the gate scales the
          unit's output, which enters only through its rows of the output projection, so
          dL/dg = <W rows, dL/dW rows> (a layer: <W, dL/dW> + <b, dL/db> over o_proj and
          down_proj, GPT-2 attn.c_proj and mlp.c_proj). Per-example gradients of those
          weights by `jax.vmap` of `jax.grad` over a batch's examples (memory: B copies of
          the output projections and activations, so keep B small).
  wanda   Wanda (Sun et al. 2024) per unit, as lm/scores.py: the sum over a unit's weights
          of |W_ij| * ||X_j||, ||X_j|| the L2 norm over every token of all batches of input
          feature j of the weight's linear layer (`model.block(..., capture=True)`, block by
          block through the dense model); biases not counted. A layer's score: the sum of
          its units'.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottery.llm import compact, model
from lottery.llm.spec import ModelSpec

# Per family and unit kind, the unit's slices (linear path in a block, index set, side) as
# compact.py's tables; GPT-2's heads (which compact refuses to remove) added here. Side
# "out": the kernel's columns (and bias entries), "in": its rows, the unit's output rows.
SLICES = {
    "llama": {"heads": compact.HEAD_SLICES["llama"], "ffn": compact.FFN_SLICES["llama"]},
    "gpt2": {"heads": (("attn.c_attn", "qkv", "out"), ("attn.c_proj", "q", "in")),
             "ffn": compact.FFN_SLICES["gpt2"]},
}
KINDS = ("heads", "ffn")


class ScoreError(ValueError):
    """An unknown method, or batches a data-driven method cannot use."""


def indices(spec: ModelSpec) -> dict:
    """Index set -> (units, k) int array: row u holds unit u's columns (or rows) of a linear
    layer. Query head h is in group h // groups; head h is columns h*hd:(h+1)*hd."""
    hd, groups = spec.head_dim, spec.groups
    group_heads = np.arange(spec.heads).reshape(spec.kv_heads, groups)
    q = (group_heads[:, :, None] * hd + np.arange(hd)).reshape(spec.kv_heads, -1)
    kv = np.arange(spec.kv_heads)[:, None] * hd + np.arange(hd)
    qkv = np.concatenate([kv + part * spec.heads * hd for part in range(3)], axis=1)
    return {"q": q, "kv": kv, "qkv": qkv, "ffn": np.arange(spec.ffn)[:, None]}


def output_path(spec: ModelSpec, kind: str) -> str:
    """The linear layer whose rows carry a unit's output (o_proj, down_proj, ...)."""
    return next(path for path, _, side in SLICES[spec.family][kind] if side == "in")


def _empty(spec: ModelSpec) -> dict:
    return {"heads": [np.zeros(spec.kv_heads) for _ in range(spec.layers)],
            "ffn": [np.zeros(spec.ffn) for _ in range(spec.layers)],
            "layers": np.zeros(spec.layers)}


def _per_unit(linear: dict, index: np.ndarray, side: str, weigh) -> np.ndarray:
    """Σ over each unit's slice of weigh(kernel entry, its input feature) (+ its bias
    entries with weigh(bias, None) on side "out"): (units,)."""
    kernel = np.asarray(linear["kernel"], np.float64)
    if side == "in":
        return weigh(kernel[index], index[..., None]).sum(axis=(1, 2))
    features = np.arange(kernel.shape[0])[:, None, None]
    total = weigh(kernel[:, index], features).sum(axis=(0, 2))
    if linear.get("bias") is not None:
        total = total + weigh(np.asarray(linear["bias"], np.float64)[index], None).sum(1)
    return total


def _unit_sums(spec: ModelSpec, params: dict, weigh) -> dict:
    """{"heads": [...], "ffn": [...]} of Σ weigh(...) over each unit's slices."""
    index, blocks = indices(spec), model.blocks_of(spec, params)
    return {kind: [sum(_per_unit(model.at(blocks[layer], path), index[which], side, weigh)
                       for path, which, side in SLICES[spec.family][kind])
                   for layer in range(spec.layers)] for kind in KINDS}


def weight_scores(spec: ModelSpec, params: dict) -> dict:
    squares = _unit_sums(spec, params, lambda w, _: w ** 2)
    out = {kind: [np.sqrt(s) for s in squares[kind]] for kind in KINDS}
    out["layers"] = np.sqrt(np.array([squares["heads"][i].sum() + squares["ffn"][i].sum()
                                      for i in range(spec.layers)]))
    return out


def _example_loss(spec: ModelSpec, params: dict, outputs: dict, tokens):
    """Mean next-token cross entropy of one sequence (T,), with the blocks' output
    projections `outputs` ({layer: {path: linear}}) in place of theirs."""
    a, b = model.block_path(spec)
    blocks = dict(params[a][b])
    for layer, linears in outputs.items():
        for path, linear in linears.items():
            blocks[layer] = _replace(blocks[layer], path, linear)
    logits = model.apply(spec, {**params, a: {**params[a], b: blocks}}, tokens[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:-1], tokens[1:]).mean()


def _replace(tree: dict, path: str, value) -> dict:
    head, _, rest = path.partition(".")
    return {**tree, head: _replace(tree[head], rest, value) if rest else value}


@functools.partial(jax.jit, static_argnums=0)
def _gate_gradients(spec: ModelSpec, params: dict, tokens):
    """Per-example gate gradients: {"heads": (B, L, kv_heads), "ffn": (B, L, ffn),
    "layers": (B, L)}, from <W, dL/dW> of the output projections' rows."""
    blocks, index = model.blocks_of(spec, params), indices(spec)
    paths = {kind: output_path(spec, kind) for kind in KINDS}
    rows = {kind: index[next(w for p, w, s in SLICES[spec.family][kind] if s == "in")]
            for kind in KINDS}
    outputs = {layer: {p: model.at(blocks[layer], p) for p in paths.values()}
               for layer in range(spec.layers)}

    def per_example(sequence):
        grads = jax.grad(lambda o: _example_loss(spec, params, o, sequence))(outputs)
        out = {kind: [] for kind in (*KINDS, "layers")}
        for layer in range(spec.layers):
            products = jax.tree.map(jnp.multiply, outputs[layer], grads[layer])
            for kind in KINDS:
                out[kind].append(products[paths[kind]]["kernel"][rows[kind]].sum(axis=(1, 2)))
            out["layers"].append(sum(jnp.sum(leaf) for leaf in jax.tree.leaves(products)))
        return {kind: jnp.stack(values) for kind, values in out.items()}

    return jax.vmap(per_example)(tokens)


def taylor_scores(spec: ModelSpec, params: dict, batches) -> dict:
    params = jax.tree.map(jnp.asarray, params)
    total, examples = None, 0
    for tokens in batches:
        grads = _gate_gradients(spec, params, jnp.asarray(tokens, jnp.int32))
        sums = {k: np.abs(np.asarray(g, np.float64)).sum(0) for k, g in grads.items()}
        total = sums if total is None else {k: total[k] + sums[k] for k in sums}
        examples += np.shape(tokens)[0]
    return {"heads": list(total["heads"] / examples), "ffn": list(total["ffn"] / examples),
            "layers": total["layers"] / examples}


def input_norms(spec: ModelSpec, params: dict, batches) -> list[dict]:
    """Per layer, {input name: (n_in,) float64}: each linear layer input feature's L2 norm
    over every token of all batches; the batches' activations run block by block through
    the dense model, each block's weights sent to the device once (as oneshot.py does)."""
    outer, blocks = model.outer(spec, params), model.blocks_of(spec, params)
    xs = [model.embed(spec, outer, jnp.asarray(tokens, jnp.int32)) for tokens in batches]
    norms = []
    for layer in range(spec.layers):
        block, squares = jax.device_put(blocks[layer]), {}
        for i, x in enumerate(xs):
            xs[i], inputs = model.block(spec, block, x, True)
            for name, value in inputs.items():
                s = np.asarray(jnp.sum(value ** 2, axis=(0, 1)), np.float64)
                squares[name] = squares.get(name, 0) + s
        norms.append({name: np.sqrt(s) for name, s in squares.items()})
    return norms


def wanda_scores(spec: ModelSpec, params: dict, batches) -> dict:
    norms, reads = input_norms(spec, params, batches), {}
    for name, paths in model.linear_inputs(spec).items():
        reads.update({path: name for path in paths})
    out = _empty(spec)
    blocks, index = model.blocks_of(spec, params), indices(spec)
    for layer in range(spec.layers):
        for kind in KINDS:
            for path, which, side in SLICES[spec.family][kind]:
                n = norms[layer][reads[path]]
                linear = {"kernel": model.at(blocks[layer], path)["kernel"]}  # no biases
                out[kind][layer] = out[kind][layer] + _per_unit(
                    linear, index[which], side, lambda w, j: np.abs(w) * n[j])
        out["layers"][layer] = out["heads"][layer].sum() + out["ffn"][layer].sum()
    return out


METHODS = {
    "weight": lambda spec, params, batches: weight_scores(spec, params),
    "taylor": taylor_scores,
    "wanda": wanda_scores,
}


def _check_batches(spec: ModelSpec, method: str, batches) -> list:
    batches = list(batches)
    if not batches:
        raise ScoreError(f"score method {method!r} needs at least one batch of token ids")
    for tokens in batches:
        shape = np.shape(tokens)
        if len(shape) != 2 or not 2 <= shape[1] <= spec.context or \
                not np.issubdtype(np.asarray(tokens).dtype, np.integer):
            raise ScoreError(f"a batch must be integer token ids (B, T) with 2 <= T <= "
                             f"{spec.context}; got shape {shape}, dtype "
                             f"{np.asarray(tokens).dtype}")
    return batches


def scores(method: str, spec: ModelSpec, params: dict, batches=()) -> dict:
    """Importance of every head group, FFN channel and layer (see the module docstring)."""
    if method not in METHODS:
        raise ScoreError(f"unknown score method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "weight":
        batches = _check_batches(spec, method, batches)
    return METHODS[method](spec, params, batches)
