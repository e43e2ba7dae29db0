"""A `lottery lm` byte-level model written as a GPT-2 checkpoint (Hugging Face layout).

The byte-level transformer (`lottery.lm.gpt`) is GPT-2 with zero output biases: learned
positions, pre-LayerNorm blocks, GELU (tanh form), a head tied to the token embedding. So it
maps exactly onto transformers' GPT-2 (`GPT2LMHeadModel` loads it unchanged, and so does
`lottery llm`): q, k, v side by side in `c_attn`, the heads' output projection `wo` as
`attn.c_proj` and `w2` as `mlp.c_proj`, each with a zero bias. GPT-2 needs every layer the
same size and d_model = heads x head_dim, so a compacted model with per-layer sizes cannot be
written this way. The tokenizer is byte-level with no merges (`byte_tokenizer`): token id =
byte value, as the model was trained.
"""

import json
from pathlib import Path

import numpy as np

from lottery.lm.gpt import EPSILON, GPTConfig
from lottery.llm import hf
from lottery.llm.spec import from_config


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-symbol table (its `bytes_to_unicode`): printable bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer():
    """A `tokenizers.Tokenizer` whose ids are the UTF-8 bytes of the text (256 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def gpt2_config(config: GPTConfig) -> dict:
    heads, ffn = set(config.heads), set(config.ffn)
    if len(heads) != 1 or len(ffn) != 1 or 0 in heads | ffn:
        raise ValueError(f"GPT-2 needs every layer the same size; this model has heads "
                         f"{config.heads} and FFN widths {config.ffn}")
    heads, ffn = heads.pop(), ffn.pop()
    if heads * config.head_dim != config.d_model:
        raise ValueError(f"GPT-2 needs d_model = heads x head_dim; this model has "
                         f"{config.d_model} != {heads} x {config.head_dim}")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab, "n_positions": config.context,
            "n_embd": config.d_model, "n_layer": config.layers, "n_head": heads,
            "n_inner": ffn, "activation_function": "gelu_new", "layer_norm_epsilon": EPSILON,
            "scale_attn_weights": True, "tie_word_embeddings": True, "attn_pdrop": 0.0,
            "embd_pdrop": 0.0, "resid_pdrop": 0.0, "dtype": "float32"}


def gpt2_params(config: GPTConfig, params: dict) -> dict:
    """The params tree of `lottery.llm.gpt2` for `params` of `lottery.lm.gpt`."""
    d = config.d_model
    blocks = {}
    for layer in range(config.layers):
        block = {k: {n: np.asarray(x, np.float32) for n, x in v.items()}
                 for k, v in params["blocks"][layer].items()}
        a, m = block["attn"], block["mlp"]
        blocks[layer] = {
            "ln_1": block["ln1"], "ln_2": block["ln2"],
            "attn": {"c_attn": {"kernel": np.concatenate([a[w].reshape(d, -1)
                                                          for w in ("wq", "wk", "wv")], 1),
                                "bias": np.concatenate([a[b].reshape(-1)
                                                        for b in ("bq", "bk", "bv")])},
                     "c_proj": {"kernel": a["wo"].reshape(-1, d), "bias": np.zeros(d, np.float32)}},
            "mlp": {"c_fc": {"kernel": m["w1"], "bias": m["b1"]},
                    "c_proj": {"kernel": m["w2"], "bias": np.zeros(d, np.float32)}}}
    return {"transformer": {"wte": {"embedding": np.asarray(params["tokens"])},
                            "wpe": {"embedding": np.asarray(params["positions"])},
                            "h": blocks,
                            "ln_f": {k: np.asarray(v) for k, v in params["ln_f"].items()}}}


def export(config: GPTConfig, params: dict, folder: Path) -> Path:
    """Write the model and its byte tokenizer to `folder` (Hugging Face layout)."""
    spec = from_config(gpt2_config(config))
    folder = hf.save(Path(folder), spec, gpt2_params(config, params))
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.context}))
    return folder
