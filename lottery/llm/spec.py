"""A pretrained causal LM's architecture, read from (and written back to) its `config.json`.

`ModelSpec` holds what the forward pass needs, for the two families this package implements:
  gpt2   GPT-2 (`model_type` gpt2): learned positions, pre-LayerNorm, fused q|k|v
         (`c_attn`), GELU (tanh form), tied output head;
  llama  the Llama family (`model_type` llama, qwen2, mistral without a sliding window):
         RoPE (with its `rope_scaling` variants), RMSNorm, SwiGLU MLP, grouped-query
         attention, tied or untied head; Qwen2 adds biases on q, k and v.
An option the implementation does not follow (GPT-2's `scale_attn_by_inverse_layer_idx`,
a rope type such as yarn, an activation other than the family's) is refused with one line
naming it, never silently ignored. `raw` keeps the whole `config.json` (as JSON text, so the
spec stays hashable: a static argument under `jax.jit`), which `to_config` writes back with
the sizes a compaction changed.
"""

import json
import math
from dataclasses import dataclass, replace

import numpy as np

FAMILIES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class SpecError(ValueError):
    """A config.json this package cannot run as its authors' implementation does."""


@dataclass(frozen=True)
class ModelSpec:
    """Sizes and options of one model; `family` picks the module (`lottery.llm.model`)."""

    family: str  # "gpt2" | "llama"
    model_type: str  # config.json's model_type
    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int  # = heads without grouped-query attention
    head_dim: int
    ffn: int
    context: int  # the longest sequence the model was trained on (max positions)
    norm_eps: float
    tied: bool  # the output head is the token embedding
    qkv_bias: bool = False
    out_bias: bool = False  # o_proj's bias (Llama's attention_bias gives both)
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) pairs of config.json's rope_scaling
    dtype: str = "float32"  # the checkpoint's dtype (torch_dtype), written back on saving
    raw: str = "{}"  # the whole config.json, as JSON text

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def scaling(self) -> dict:
        return dict(self.rope_scaling)


def _get(config: dict, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _rope_scaling(config: dict) -> tuple:
    scaling = _get(config, "rope_scaling", "rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise SpecError(f"rope_scaling type {kind!r} is not implemented (supported: "
                        f"{', '.join(ROPE_TYPES)}); use a checkpoint without it or add it to "
                        "lottery/llm/llama.py's rope_frequencies")
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                        for k, v in scaling.items()))


def _gpt2(config: dict) -> ModelSpec:
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise SpecError(f"GPT-2 activation_function {act!r} is not implemented (gelu_new is)")
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(option):
            raise SpecError(f"GPT-2 option {option}=true is not implemented")
    if config.get("scale_attn_weights") is False:
        raise SpecError("GPT-2 option scale_attn_weights=false is not implemented")
    d, heads = config["n_embd"], config["n_head"]
    return ModelSpec(
        family="gpt2", model_type="gpt2", vocab=config["vocab_size"], d_model=d,
        layers=config["n_layer"], heads=heads, kv_heads=heads, head_dim=d // heads,
        ffn=config.get("n_inner") or 4 * d, context=config["n_positions"],
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        tied=config.get("tie_word_embeddings", True), qkv_bias=True, out_bias=True,
        mlp_bias=True)


def _llama(config: dict) -> ModelSpec:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise SpecError(f"hidden_act {act!r} is not implemented for the Llama family (silu is)")
    if config.get("model_type") in ("qwen2", "mistral") and config.get("use_sliding_window") \
            and config.get("sliding_window"):
        raise SpecError("sliding-window attention is not implemented; set "
                        "use_sliding_window=false only if the model was trained without it")
    if config.get("model_type") == "mistral" and config.get("sliding_window"):
        raise SpecError("Mistral's sliding-window attention is not implemented")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    bias = bool(config.get("attention_bias", False))
    qwen = config.get("model_type") == "qwen2"
    return ModelSpec(
        family="llama", model_type=config.get("model_type", "llama"),
        vocab=config["vocab_size"], d_model=d, layers=config["num_hidden_layers"],
        heads=heads, kv_heads=_get(config, "num_key_value_heads", default=heads),
        head_dim=_get(config, "head_dim", default=d // heads),
        ffn=config["intermediate_size"], context=config["max_position_embeddings"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bias or qwen, out_bias=bias, mlp_bias=bool(config.get("mlp_bias", False)),
        rope_theta=float(_get(config, "rope_theta", default=None)
                         or (_get(config, "rope_parameters", default={}) or {}).get(
                             "rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(config))


def from_config(config: dict) -> ModelSpec:
    """The spec of a parsed config.json; `SpecError` for an architecture or option that is
    not implemented."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise SpecError(f"model_type {model_type!r} is not implemented; supported: "
                        f"{', '.join(FAMILIES)} (GPT-2 and the Llama family)")
    try:
        spec = _gpt2(config) if FAMILIES[model_type] == "gpt2" else _llama(config)
    except KeyError as missing:
        raise SpecError(f"config.json of a {model_type} model lacks {missing}") from None
    if spec.heads % spec.kv_heads:
        raise SpecError(f"{spec.heads} attention heads are not a multiple of "
                        f"{spec.kv_heads} key/value heads")
    dtype = _get(config, "torch_dtype", "dtype", default="float32")
    return replace(spec, dtype=str(dtype), raw=json.dumps(config, sort_keys=True))


KEYS = {"gpt2": {"vocab": "vocab_size", "d_model": "n_embd", "layers": "n_layer",
                 "heads": "n_head", "ffn": "n_inner", "context": "n_positions"},
        "llama": {"vocab": "vocab_size", "d_model": "hidden_size",
                  "layers": "num_hidden_layers", "heads": "num_attention_heads",
                  "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                  "ffn": "intermediate_size", "context": "max_position_embeddings"}}


def to_config(spec: ModelSpec, dtype: str | None = None) -> dict:
    """config.json for `spec`: the original, with the sizes this spec changed (a compacted
    model) and its dtype; a size it keeps stays as the original wrote it (or left it out)."""
    config = json.loads(spec.raw)
    original = from_config(config)
    if spec.family == "gpt2" and spec.heads != original.heads:
        raise SpecError("GPT-2's head size is n_embd / n_head in transformers: a GPT-2 with "
                        "fewer heads has no config.json; remove FFN channels or layers")
    for field_name, key in KEYS[spec.family].items():
        if getattr(spec, field_name) != getattr(original, field_name):
            config[key] = getattr(spec, field_name)
    if spec.family == "llama" and spec.heads != original.heads:
        config["head_dim"] = spec.head_dim  # else read as hidden_size / num_attention_heads
    key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    config[key] = dtype or spec.dtype
    return config


def rope_frequencies(spec: ModelSpec, length: int) -> np.ndarray:
    """RoPE's inverse frequencies (head_dim / 2,), float32, for sequences of `length`, with
    config.json's scaling, as transformers' `modeling_rope_utils` defines each type:
      linear   every frequency divided by `factor`;
      dynamic  NTK: the base raised to (factor·length/context − factor + 1)^(d/(d−2)) once
               `length` exceeds the context, else unchanged;
      llama3   wavelengths above context/low_freq_factor divided by `factor`, below
               context/high_freq_factor kept, and a smooth blend between."""
    dim, base = spec.head_dim, spec.rope_theta
    scaling = spec.scaling()
    kind = scaling.get("rope_type", "default")
    if kind == "dynamic" and length > spec.context:
        factor = scaling["factor"]
        base = base * (factor * length / spec.context - (factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor",
                                                  "high_freq_factor"))
        old = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        scaled = np.where(wavelength > old / low, inv / factor, inv)
        smooth = (old / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < old / high) & ~(wavelength > old / low)
        inv = np.where(medium, blended, scaled)
    return inv.astype(np.float32)
