"""Compaction: the transformer with its gated-off heads, FFN units and layers removed.

`compact(config, params, masks)` returns a smaller `GPTConfig` and its params that compute
what `apply(config, params, tokens, masks)` computes (up to float rounding):
  * a head with gate 0 loses its q/k/v columns (`wq[:, h]`, `bq[h]`, ...) and its rows of the
    output projection `wo[h]`; a gate in (0, 1] is folded into `wo[h]`;
  * an FFN unit with gate 0 loses `w1[:, f]`, `b1[f]` and `w2[f]`; a gate in (0, 1] is folded
    into `w2[f]`;
  * a layer with gate 0 is dropped; a gate g in (0, 1] is folded into `wo` and `w2` (each
    sublayer's residual contribution is scaled by g, and is linear in them: no output bias);
  * a layer left with no heads and no FFN units is dropped, a sublayer left with no units
    goes with its LayerNorm (only when `allow_empty_layers`, see `check_masks`).
`check_masks` is the validation that the pruning loop calls before it removes anything: one
clear `PruneRequestError` line, naming the layer, for a request the model cannot take.
Runs on the host in NumPy (one-off slicing; masks must be concrete).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lottery.lm.gpt import GPTConfig, PruneRequestError, check_mask_shapes, init

__all__ = ["PruneRequestError", "check_masks", "compact", "compacted_config"]


def _concrete(mask, where: str) -> np.ndarray:
    try:
        mask = np.asarray(mask, np.float32)
    except (TypeError, jax.errors.TracerArrayConversionError):
        raise PruneRequestError(f"{where} is a traced value; compaction needs concrete masks "
                                "(call it outside jit)") from None
    if not np.all(np.isfinite(mask)) or np.any(mask < 0) or np.any(mask > 1):
        raise PruneRequestError(f"{where} has values outside [0, 1]: gates are 0 (remove) or "
                                "in (0, 1] (keep, folded into the weights)")
    return mask


def check_masks(config: GPTConfig, masks, allow_empty_layers: bool = False) -> dict:
    """Validate a removal request; return what survives, as indices into the original model:
    {"layers": (L',) kept layers, "heads": [kept heads of each kept layer], "ffn": [...]}.

    Bad requests (one `PruneRequestError` line each): masks not shaped as
    `full_masks(config)` (exactly (H_l,), (F_l,), (L,) here), values outside [0, 1], every
    layer removed, and, unless `allow_empty_layers`, a kept layer losing all of its heads or
    all of its FFN units: head (neuron) pruning keeps at least one unit per sublayer, and a
    layer goes only when its layer gate says so. With `allow_empty_layers`, such a sublayer
    is dropped, and a layer left with neither sublayer is dropped too."""
    check_mask_shapes(config, masks)
    layer_gates = _concrete(masks["layers"], "masks['layers']")
    if layer_gates.shape != (config.layers,):
        raise PruneRequestError(f"masks['layers'] has shape {layer_gates.shape}; compaction "
                                f"needs exactly ({config.layers},)")
    kept = {"layers": [], "heads": [], "ffn": []}
    for layer in range(config.layers):
        units = {}
        for kind, size, noun, sub in (("heads", config.heads[layer], "head", "attention"),
                                      ("ffn", config.ffn[layer], "FFN unit", "MLP")):
            gate = _concrete(masks[kind][layer], f"masks[{kind!r}][{layer}]")
            if gate.shape != (size,):
                raise PruneRequestError(f"masks[{kind!r}][{layer}] has shape {gate.shape}; "
                                        f"compaction needs exactly ({size},)")
            units[kind] = np.flatnonzero(gate)
            if (layer_gates[layer] != 0 and size and not units[kind].size
                    and not allow_empty_layers):
                raise PruneRequestError(
                    f"masks[{kind!r}][{layer}] removes every {noun} of layer {layer}; keep at "
                    f"least one, or remove the layer with masks['layers'][{layer}] = 0 (or "
                    f"pass allow_empty_layers=True to drop its {sub} sublayer)")
        if layer_gates[layer] != 0 and (units["heads"].size or units["ffn"].size):
            kept["layers"].append(layer)
            kept["heads"].append(units["heads"])
            kept["ffn"].append(units["ffn"])
    if not kept["layers"]:
        raise PruneRequestError(f"the masks remove all {config.layers} layers; keep at least "
                                "one (a transformer without blocks is a bigram model)")
    kept["layers"] = np.asarray(kept["layers"])
    return kept


def _shapes(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(x)) for path, x in leaves}


def _check_params(config: GPTConfig, params) -> None:
    expected = _shapes(jax.eval_shape(lambda: init(config, jax.random.key(0))))
    got = _shapes(params)
    if got != expected:
        where = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        raise PruneRequestError(f"params do not match the config (first difference at "
                                f"{where[0]}); pass the config the params were made with")


def compact(config: GPTConfig, params: dict, masks, allow_empty_layers: bool = False):
    """`(new_config, new_params)`: the smaller dense model equal to the masked one (see the
    module docstring); `check_masks` decides what is removed and what is an error."""
    kept = check_masks(config, masks, allow_empty_layers)
    _check_params(config, params)
    params = jax.tree.map(np.asarray, params)
    layer_gates = np.asarray(masks["layers"], np.float32)
    blocks = {}
    for new, (old, heads, units) in enumerate(zip(kept["layers"], kept["heads"], kept["ffn"])):
        block, g = params["blocks"][int(old)], layer_gates[old]
        blocks[new] = {}
        if heads.size:
            a = block["attn"]
            scale = np.asarray(masks["heads"][old], np.float32)[heads] * g
            blocks[new]["ln1"] = block["ln1"]
            blocks[new]["attn"] = {
                **{w: a[w][:, heads] for w in ("wq", "wk", "wv")},
                **{b: a[b][heads] for b in ("bq", "bk", "bv")},
                "wo": a["wo"][heads] * scale[:, None, None]}
        if units.size:
            m = block["mlp"]
            scale = np.asarray(masks["ffn"][old], np.float32)[units] * g
            blocks[new]["ln2"] = block["ln2"]
            blocks[new]["mlp"] = {"w1": m["w1"][:, units], "b1": m["b1"][units],
                                  "w2": m["w2"][units] * scale[:, None]}
    new_params = {k: v for k, v in params.items() if k != "blocks"}
    new_params["blocks"] = blocks
    return (_kept_config(config, kept),
            jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), new_params))


def _kept_config(config: GPTConfig, kept: dict) -> GPTConfig:
    return dataclasses.replace(config, heads=tuple(h.size for h in kept["heads"]),
                               ffn=tuple(f.size for f in kept["ffn"]))


def compacted_config(config: GPTConfig, masks, allow_empty_layers: bool = False) -> GPTConfig:
    """The config `compact` would return, without touching any weights (cheap: sizes only)."""
    return _kept_config(config, check_masks(config, masks, allow_empty_layers))
