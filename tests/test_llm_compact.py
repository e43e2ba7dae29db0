"""Structured removal from pretrained models (`lottery.llm.compact`).

Expected values come from other paths than the slicing: the original model (transformers'
fixtures, tests/fixtures/hf/) with the removed units' output rows set to zero in its own
weights (o_proj rows of the removed query heads, down_proj / mlp.c_proj rows of the removed
channels), and, for dropped layers, the original run block by block (`model.embed`,
`model.block`, `model.head`) skipping them; parameter counts computed by hand from the
sizes. The compacted folders also load in transformers (checked by hand with
tests/fixtures/hf/reference_logits.py; CI has no torch).
"""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from lottery.llm import hf, model
from lottery.llm.compact import Request, RequestError, compact, uniform_request

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
LLAMAS = ("llama", "qwen2")  # 4 query heads, 2 key/value heads, head_dim 8, FFN 64
KEEP_CHANNELS = {"llama": 40, "qwen2": 40, "gpt2": 100}  # of 64, 64, 128


def tokens(name: str):
    return jnp.asarray(np.load(FIXTURES / name / "reference.npz")["tokens"], jnp.int32)


def channels(name: str, layer: int) -> tuple:
    """A different set of channels to keep in each layer, in scrambled order."""
    spec = hf.read_spec(FIXTURES / name)
    order = np.random.default_rng(layer).permutation(spec.ffn)
    return tuple(order[:KEEP_CHANNELS[name]].tolist())


def zeroed(spec, params, groups: dict, kept_channels: dict) -> dict:
    """The original params with the contributions of the units not kept set to zero:
    o_proj rows of the query heads h of each removed group (h // 2 == group; columns
    h*8:(h+1)*8 of the attention output), down_proj / mlp.c_proj rows of removed
    channels. {layer: kept} in both dicts."""
    params = copy.deepcopy(params)
    blocks = model.blocks_of(spec, params)
    for layer, kept in groups.items():
        o_proj = blocks[layer]["self_attn"]["o_proj"]["kernel"]
        for h in range(spec.heads):
            if h // spec.groups not in kept:
                o_proj[h * spec.head_dim:(h + 1) * spec.head_dim] = 0
    for layer, kept in kept_channels.items():
        mlp = blocks[layer]["mlp"]
        down = (mlp["c_proj"] if spec.family == "gpt2" else mlp["down_proj"])["kernel"]
        down[[f for f in range(spec.ffn) if f not in kept]] = 0
    return params


def close(a, b):
    """Equal up to float32 rounding: 1e-5 of the logits' scale (up to 27 here; removing
    the wrong unit changes them by more than 0.1)."""
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("name", ("llama", "qwen2", "gpt2"))
def test_removing_heads_and_channels_removes_exactly_their_contribution(name):
    spec, params = hf.load(FIXTURES / name)
    kept_channels = {layer: channels(name, layer) for layer in range(2)}
    groups = {0: (1,), 1: (0,)} if name in LLAMAS else {}  # GPT-2 keeps its heads
    request = Request(groups=tuple(groups.values()) or None,
                      channels=tuple(kept_channels.values()))
    shapes_before = [np.shape(x) for x in _leaves(params)]
    new_spec, new_params = compact(spec, params, request)
    assert [np.shape(x) for x in _leaves(params)] == shapes_before  # input untouched
    assert new_spec.ffn == KEEP_CHANNELS[name] and new_spec.layers == 2
    if name in LLAMAS:
        assert (new_spec.heads, new_spec.kv_heads, new_spec.head_dim) == (2, 1, 8)
    expected = model.apply(spec, zeroed(spec, params, groups, kept_channels), tokens(name))
    assert np.abs(expected - model.apply(spec, params, tokens(name))).max() > 0.1
    close(model.apply(new_spec, new_params, tokens(name)), expected)


@pytest.mark.parametrize("name", ("llama", "qwen2", "gpt2"))
def test_dropping_a_layer_skips_its_block(name):
    """Layer 0 dropped; layer 1 also loses a head group (Llama family) and channels. Its
    counts may differ from the dropped layer's: only kept layers must agree."""
    spec, params = hf.load(FIXTURES / name)
    groups = {1: (1,)} if name in LLAMAS else {}
    kept = {1: channels(name, 1)}
    request = Request(drop_layers=(0,), channels=(tuple(range(spec.ffn)), kept[1]),
                      groups=((0, 1), groups[1]) if groups else None)
    new_spec, new_params = compact(spec, params, request)
    assert new_spec.layers == 1
    original = zeroed(spec, params, groups, kept)
    outer = model.outer(spec, original)
    x = model.embed(spec, outer, tokens(name))
    x = model.block(spec, model.blocks_of(spec, original)[1], x)
    close(model.apply(new_spec, new_params, tokens(name)), model.head(spec, outer, x))


def small(name: str):
    """(spec, params, new_spec, new_params): one layer of two, its FFN cut, and (Llama
    family) one head group of two."""
    spec, params = hf.load(FIXTURES / name)
    request = Request(drop_layers=(1,), groups=((0,), (0,)) if name in LLAMAS else None,
                      channels=(channels(name, 0), channels(name, 1)))
    return (spec, params) + compact(spec, params, request)


NEW_CONFIG = {  # what config.json must say after `small`; head size unchanged (8)
    "llama": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 40, "head_dim": 8},
    "qwen2": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 40, "head_dim": 8, "layer_types": ["full_attention"]},
    "gpt2": {"n_layer": 1, "n_inner": 100, "n_head": 4, "n_embd": 32},  # 32 / 4 = 8
}
PARAMETERS = {  # by hand: vocab 300, d 32, one layer
    # embed + untied lm_head + final norm; 2 norms; q, k, v, o (2, 1, 1, 2 heads of 8);
    # gate, up, down (FFN 40)
    "llama": 2 * 300 * 32 + 32 + 2 * 32 + 32 * (16 + 8 + 8) + 16 * 32 + 3 * 32 * 40,
    # as llama, tied head, and q/k/v biases
    "qwen2": 300 * 32 + 32 + 2 * 32 + 32 * (16 + 8 + 8) + (16 + 8 + 8) + 16 * 32
    + 3 * 32 * 40,
    # wte, wpe (64 positions), ln_f; ln_1, ln_2; c_attn, c_proj; c_fc, mlp.c_proj (FFN 100)
    "gpt2": 300 * 32 + 64 * 32 + 2 * 32 + 2 * 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32)
    + (32 * 100 + 100) + (100 * 32 + 32),
}


@pytest.mark.parametrize("name", ("llama", "qwen2", "gpt2"))
def test_the_compacted_model_saves_and_loads_back(name, tmp_path):
    _, _, new_spec, new_params = small(name)
    folder = hf.save(tmp_path / name, new_spec, new_params, source=FIXTURES / name)
    config = json.loads((folder / "config.json").read_text())
    assert {key: config.get(key) for key in NEW_CONFIG[name]} == NEW_CONFIG[name]
    again_spec, again = hf.load(folder)
    assert replace(again_spec, raw="") == replace(new_spec, raw="")  # sizes, options
    np.testing.assert_array_equal(model.apply(again_spec, again, tokens(name)),
                                  model.apply(new_spec, new_params, tokens(name)))
    stored = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "numpy") as f:
            stored += sum(f.get_tensor(key).size for key in f.keys())
    assert stored == PARAMETERS[name]


def test_a_config_without_head_dim_gets_it_when_heads_go(tmp_path):
    """Llama 2's config.json has no head_dim: transformers takes hidden_size /
    num_attention_heads, which fewer heads would double."""
    folder = tmp_path / "no_head_dim"
    shutil.copytree(FIXTURES / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    spec, params = hf.load(folder)
    new_spec, new_params = compact(spec, params, Request(groups=((0,), (1,))))
    out = hf.save(tmp_path / "out", new_spec, new_params)
    assert json.loads((out / "config.json").read_text())["head_dim"] == 8
    again_spec, again = hf.load(out)
    np.testing.assert_array_equal(model.apply(again_spec, again, tokens("llama")),
                                  model.apply(new_spec, new_params, tokens("llama")))


def test_uniform_request_keeps_the_top_scores_ties_to_the_lower_index():
    scores = {"heads": [[0.5, 0.1], [0.2, 0.2]],
              "ffn": [[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 1.0, 1.0]],
              "layers": [0.9, 0.1, 0.5]}
    scores["heads"].append([0.0, 1.0])
    scores["ffn"].append([1.0, 1.0, 1.0, 1.0])
    request = uniform_request(scores, keep_groups=1, keep_channels=2, drop_layers=1)
    assert request == Request(drop_layers=(1,), groups=((0,), (0,), (1,)),
                              channels=((0, 2), (2, 3), (0, 1)))
    assert uniform_request(scores, 2, 4).drop_layers == ()  # no layer scores needed


def test_a_uniform_request_compacts_a_checkpoint():
    spec, params = hf.load(FIXTURES / "llama")
    rng = np.random.default_rng(0)
    scores = {"heads": rng.random((2, 2)), "ffn": rng.random((2, 64)), "layers": [1.0, 0.0]}
    new_spec, new_params = compact(spec, params, uniform_request(scores, 1, 16, 1))
    assert (new_spec.layers, new_spec.heads, new_spec.kv_heads, new_spec.ffn) == (1, 2, 1, 16)
    assert np.isfinite(np.asarray(model.apply(new_spec, new_params, tokens("llama")))).all()


ALL = tuple(range(64))


@pytest.mark.parametrize("name, request_, words", [
    ("llama", Request(drop_layers=(0, 1)), "drops all 2 layers; keep at least one"),
    ("llama", Request(drop_layers=(2,)), "drop_layers has 2, out of range 0..1"),
    ("llama", Request(drop_layers=(1, 1)), "drop_layers names 1 twice"),
    ("llama", Request(groups=((0,), ())), "layer 1 keeps no head groups; .* drop the layer"),
    ("llama", Request(channels=((), ALL)), "layer 0 keeps no FFN channels"),
    ("llama", Request(groups=((0, 2), (0, 1))), "layer 0's head groups has 2, out of range"),
    ("llama", Request(groups=((0, 0), (0, 1))), "layer 0's head groups names 0 twice"),
    ("llama", Request(channels=(ALL, (64,))), "layer 1's FFN channels has 64, out of range"),
    ("llama", Request(groups=((0,),)), "given for 1 layers; give one entry per layer"),
    ("llama", Request(groups=((0,), (0, 1))),
     "layer 0 keeps 1 head groups and layer 1 keeps 2: transformers' config.json holds one "
     "size for all layers; keep the same number of head groups in every kept layer"),
    ("qwen2", Request(channels=(ALL, ALL[:32])), "holds one size for all layers; keep the "
     "same number of FFN channels"),
    ("gpt2", Request(groups=((0, 1, 2), (0, 1, 2))), "GPT-2 cannot lose attention heads: "
     "transformers derives its head size as n_embd / n_head.*remove FFN channels or layers"),
])
def test_requests_it_cannot_express_are_refused_in_one_line(name, request_, words):
    spec, params = hf.load(FIXTURES / name)
    with pytest.raises(RequestError, match=words) as error:
        compact(spec, params, request_)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


def test_impossible_uniform_counts_are_refused():
    with pytest.raises(RequestError, match="cannot keep 0 of 2 head groups"):
        uniform_request({"heads": [[1.0, 2.0]], "ffn": [[1.0]]}, 0, 1)


def _leaves(tree):
    return [leaf for value in tree.values()
            for leaf in (_leaves(value) if isinstance(value, dict) else [value])]
