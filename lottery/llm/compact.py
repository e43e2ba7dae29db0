"""Structured removal from a pretrained model: whole layers, attention head groups and FFN
channels cut out of the weights, giving a smaller dense model that transformers loads.

The units:
  layer       a whole block; the residual stream passes it unchanged.
  head group  one key/value head and the `spec.groups` query heads that share it (query
              head h belongs to group h // groups; without grouped-query attention a group
              is one head): q_proj's columns of its query heads (head h is columns
              h*head_dim:(h+1)*head_dim), k_proj's and v_proj's columns of its key/value
              head, o_proj's rows of its query heads; q/k/v biases where the model has them.
  channel     FFN hidden unit f: gate_proj's and up_proj's column f, down_proj's row f
              (GPT-2: mlp.c_fc's column f, mlp.c_proj's row f); their input-side biases.
Output biases (o_proj's, GPT-2's c_proj and mlp.c_proj) are summed over all units, so they
stay. Removing a unit removes exactly its contribution: the result computes what the
original computes with those units' output rows (o_proj, down_proj) set to zero.

transformers' config.json holds one head count and one FFN width for all layers, so every
kept layer must keep as many head groups and channels as the others (which ones may
differ). GPT-2 cannot lose heads at all: transformers derives its head size as
n_embd / n_head. `compact` refuses such requests with one line saying what to do.
"""

import json
from dataclasses import dataclass, replace

import numpy as np

from lottery.llm import model
from lottery.llm.spec import ModelSpec

# Per family: the head-group and channel slices, as (linear path in a block, index set,
# side). Index sets: "q" the query heads' columns, "kv" the key/value heads' columns,
# "ffn" the channels. Side "out" slices the kernel's columns and the bias; "in" the
# kernel's rows (its bias is per output, kept).
HEAD_SLICES = {
    "llama": (("self_attn.q_proj", "q", "out"), ("self_attn.k_proj", "kv", "out"),
              ("self_attn.v_proj", "kv", "out"), ("self_attn.o_proj", "q", "in")),
    "gpt2": (),  # refused: see _check_heads
}
FFN_SLICES = {
    "llama": (("mlp.gate_proj", "ffn", "out"), ("mlp.up_proj", "ffn", "out"),
              ("mlp.down_proj", "ffn", "in")),
    "gpt2": (("mlp.c_fc", "ffn", "out"), ("mlp.c_proj", "ffn", "in")),
}


class RequestError(ValueError):
    """A removal the model (or transformers' config.json) cannot express; says what to do."""


@dataclass(frozen=True)
class Request:
    """What to remove. `groups[l]` and `channels[l]`: the head groups and FFN channels that
    layer l of the original model keeps, in any order (one entry per original layer; a
    dropped layer's entry is checked but not used). None keeps them all."""

    drop_layers: tuple = ()
    groups: tuple | None = None
    channels: tuple | None = None


def compact(spec: ModelSpec, params: dict, request: Request) -> tuple[ModelSpec, dict]:
    """(new_spec, new_params): the model without the units `request` removes; `hf.save`
    writes it as a valid Hugging Face folder. `RequestError` for a request it cannot be."""
    kept, groups, channels = check(spec, request)
    blocks = model.blocks_of(spec, params)
    new_blocks = {i: _block(spec, blocks[layer], groups[layer], channels[layer])
                  for i, layer in enumerate(kept)}
    a, b = model.block_path(spec)
    outer = model.outer(spec, params)
    new_params = {**outer, a: {**outer[a], b: new_blocks}}
    new_spec = resized(spec, len(groups[kept[0]]), len(channels[kept[0]]),
                       spec.layers - len(kept))
    return replace(new_spec, raw=_raw(spec, kept)), new_params


def resized(spec: ModelSpec, groups: int, channels: int, dropped: int = 0) -> ModelSpec:
    """`spec` with `groups` head groups and `channels` FFN channels per layer and `dropped`
    layers fewer: the sizes of a compacted model (what it counts; `compact` also cuts
    config.json's per-layer lists)."""
    return replace(spec, layers=spec.layers - dropped, kv_heads=groups,
                   heads=groups * spec.groups, ffn=channels)


def uniform_request(scores: dict, keep_groups: int, keep_channels: int,
                    drop_layers: int = 0) -> Request:
    """The request keeping, in every layer, the `keep_groups` head groups and
    `keep_channels` channels of highest score, and dropping the `drop_layers` layers of
    lowest score. `scores`: {"heads": [(kv_heads,) per layer], "ffn": [(ffn,) per layer],
    "layers": (layers,)} ("layers" only needed to drop some). Equal scores: the lower
    index counts as higher (kept first), so the result is deterministic."""
    heads, ffn = scores["heads"], scores["ffn"]
    layers = len(heads)
    keep = _top(scores["layers"], layers - drop_layers, "layers") if drop_layers else \
        tuple(range(layers))
    return Request(drop_layers=tuple(sorted(set(range(layers)) - set(keep))),
                   groups=tuple(_top(s, keep_groups, "head groups") for s in heads),
                   channels=tuple(_top(s, keep_channels, "FFN channels") for s in ffn))


def _top(scores, k: int, what: str) -> tuple:
    """Indices of the k highest scores, ascending; ties to the lower index."""
    scores = np.asarray(scores, np.float64)
    if not 0 < k <= len(scores):
        raise RequestError(f"cannot keep {k} of {len(scores)} {what}; keep between 1 and "
                           f"{len(scores)}")
    return tuple(sorted(np.argsort(-scores, kind="stable")[:k].tolist()))


def check(spec: ModelSpec, request: Request) -> tuple[tuple, tuple, tuple]:
    """(kept layers, groups kept per layer, channels kept per layer), each sorted, for every
    original layer; `RequestError` for a request `compact` refuses."""
    drop = _indices(request.drop_layers, spec.layers, "drop_layers")
    kept = tuple(layer for layer in range(spec.layers) if layer not in drop)
    if not kept:
        raise RequestError(f"the request drops all {spec.layers} layers; keep at least one")
    groups = _per_layer(request.groups, spec.layers, spec.kv_heads, "head groups")
    channels = _per_layer(request.channels, spec.layers, spec.ffn, "FFN channels")
    for name, per_layer in (("head groups", groups), ("FFN channels", channels)):
        _same_count(per_layer, kept, name)
    _check_heads(spec, len(groups[kept[0]]))
    return kept, groups, channels


def _indices(values, size: int, what: str) -> tuple:
    values = tuple(int(v) for v in values)
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise RequestError(f"{what} has {bad[0]}, out of range 0..{size - 1}")
    if len(set(values)) != len(values):
        twice = next(v for v in values if values.count(v) > 1)
        raise RequestError(f"{what} names {twice} twice; name each index once")
    return tuple(sorted(values))


def _per_layer(keep, layers: int, size: int, what: str) -> tuple:
    if keep is None:
        return (tuple(range(size)),) * layers
    if len(keep) != layers:
        raise RequestError(f"the {what} to keep are given for {len(keep)} layers; give one "
                           f"entry per layer of the original model ({layers})")
    out = tuple(_indices(k, size, f"layer {layer}'s {what}") for layer, k in enumerate(keep))
    for layer, k in enumerate(out):
        if not k:
            raise RequestError(f"layer {layer} keeps no {what}; keep at least one, or drop "
                               "the layer (drop_layers)")
    return out


def _same_count(per_layer: tuple, kept: tuple, what: str) -> None:
    counts = {layer: len(per_layer[layer]) for layer in kept}
    first = kept[0]
    other = next((layer for layer in kept if counts[layer] != counts[first]), None)
    if other is not None:
        raise RequestError(
            f"layer {first} keeps {counts[first]} {what} and layer {other} keeps "
            f"{counts[other]}: transformers' config.json holds one size for all layers; keep "
            f"the same number of {what} in every kept layer (which ones may differ)")


GPT2_HEADS = ("GPT-2 cannot lose attention heads: transformers derives its head size as "
              "n_embd / n_head, so fewer heads is no valid GPT-2 config.json")


def _check_heads(spec: ModelSpec, kept_groups: int) -> None:
    if spec.family == "gpt2" and kept_groups != spec.kv_heads:
        raise RequestError(f"{GPT2_HEADS}; remove FFN channels or layers instead")


def _block(spec: ModelSpec, block: dict, groups: tuple, channels: tuple) -> dict:
    """One kept block, sliced to its kept head groups and channels."""
    index, slices = {"ffn": np.asarray(channels, np.int64)}, ()
    if len(channels) != spec.ffn:
        slices += FFN_SLICES[spec.family]
    if len(groups) != spec.kv_heads:
        index["kv"] = _columns(groups, spec.head_dim)
        index["q"] = _columns([h for h in range(spec.heads) if h // spec.groups in groups],
                              spec.head_dim)
        slices += HEAD_SLICES[spec.family]
    out = _copy(block)
    for path, which, side in slices:
        *parents, name = path.split(".")
        parent = model.at(out, ".".join(parents))
        parent[name] = _take(parent[name], index[which], side)
    return out


def _columns(heads, head_dim: int) -> np.ndarray:
    """The columns of `heads` in a projection whose head h is columns h*hd:(h+1)*hd."""
    return (np.asarray(heads, np.int64)[:, None] * head_dim + np.arange(head_dim)).ravel()


def _take(linear: dict, index: np.ndarray, side: str) -> dict:
    if side == "in":
        return {**linear, "kernel": linear["kernel"][index, :]}
    out = {**linear, "kernel": linear["kernel"][:, index]}
    if linear.get("bias") is not None:
        out["bias"] = linear["bias"][index]
    return out


def _copy(tree):
    """The dicts of `tree` copied (leaves shared), so slicing never touches the input."""
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _raw(spec: ModelSpec, kept: tuple) -> str:
    """The config.json text for the new spec's `raw`: per-layer lists (Qwen2's
    `layer_types`) cut to the kept layers; `to_config` then writes the new sizes."""
    config = json.loads(spec.raw)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][layer] for layer in kept]
    return json.dumps(config, sort_keys=True)
