"""The Llama family's decoder (Llama 2/3, Qwen2, SmolLM, TinyLlama), as transformers'
`modeling_llama` / `modeling_qwen2` define its forward pass, in `flax.nnx`.

Each block: `h = x + o_proj(attention(input_layernorm(x)))`, then
`h + down_proj(silu(gate_proj(n)) * up_proj(n))` with `n = post_attention_layernorm(h)`;
RMSNorm (`x / sqrt(mean(x²) + eps) * weight`), RoPE on q and k in the half-split form
(`rotate_half`: the first and second halves of each head are the pairs), grouped-query
attention (each key/value head serves `heads / kv_heads` query heads), causal, scaled by
1/sqrt(head_dim); a final RMSNorm and the output head (`lm_head`, or the token embedding
when tied). Attribute names are transformers' module names, so a parameter's path is its
checkpoint name (`lottery.llm.hf` maps `kernel` (in, out) to `weight` (out, in)).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lottery.llm.spec import ModelSpec, rope_frequencies

# Each linear layer's input, named for the calibration statistics of one-shot pruning:
# input name -> the linear layers (paths inside a block) that read it.
LINEAR_INPUTS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_hidden": ("mlp.down_proj",),
}
BLOCKS = ("model", "layers")  # where the blocks are in the params tree


def rotate(x, cos, sin):
    """RoPE in transformers' half-split form: x·cos + rotate_half(x)·sin."""
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


def rope(spec: ModelSpec, length: int):
    """cos and sin, (length, 1, head_dim) float32, for positions 0..length-1."""
    inv = jnp.asarray(rope_frequencies(spec, length))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _linear(n_in, n_out, bias, rngs):
    return nnx.Linear(n_in, n_out, use_bias=bias, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, hd = spec.d_model, spec.head_dim
        self.q_proj = _linear(d, spec.heads * hd, spec.qkv_bias, rngs)
        self.k_proj = _linear(d, spec.kv_heads * hd, spec.qkv_bias, rngs)
        self.v_proj = _linear(d, spec.kv_heads * hd, spec.qkv_bias, rngs)
        self.o_proj = _linear(spec.heads * hd, d, spec.out_bias, rngs)

    def __call__(self, x, cos, sin, hd: int):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, -1, hd)
        k = self.k_proj(x).reshape(B, T, -1, hd)
        v = self.v_proj(x).reshape(B, T, -1, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, -1)


class MLP(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d, f, bias = spec.d_model, spec.ffn, spec.mlp_bias
        self.gate_proj, self.up_proj = _linear(d, f, bias, rngs), _linear(d, f, bias, rngs)
        self.down_proj = _linear(f, d, bias, rngs)


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.head_dim = spec.head_dim
        self.input_layernorm = nnx.RMSNorm(spec.d_model, epsilon=spec.norm_eps, rngs=rngs)
        self.self_attn = Attention(spec, rngs)
        self.post_attention_layernorm = nnx.RMSNorm(spec.d_model, epsilon=spec.norm_eps,
                                                    rngs=rngs)
        self.mlp = MLP(spec, rngs)

    def __call__(self, x, cos, sin):
        """(output, inputs): `inputs` holds each of `LINEAR_INPUTS`' arrays."""
        attn_in = self.input_layernorm(x)
        attn_out = self.self_attn(attn_in, cos, sin, self.head_dim)
        h = x + self.self_attn.o_proj(attn_out)
        mlp_in = self.post_attention_layernorm(h)
        hidden = jax.nn.silu(self.mlp.gate_proj(mlp_in)) * self.mlp.up_proj(mlp_in)
        out = h + self.mlp.down_proj(hidden)
        return out, {"attn_in": attn_in, "attn_out": attn_out, "mlp_in": mlp_in,
                     "mlp_hidden": hidden}


class Body(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(spec.vocab, spec.d_model, rngs=rngs)
        self.layers = nnx.List([Block(spec, rngs) for _ in range(spec.layers)])
        self.norm = nnx.RMSNorm(spec.d_model, epsilon=spec.norm_eps, rngs=rngs)


class Llama(nnx.Module):
    """The causal LM: `model` (embed_tokens, layers, norm) and, untied, `lm_head`."""

    Block = Block

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.spec = spec
        self.model = Body(spec, rngs)
        self.lm_head = (None if spec.tied else
                        nnx.Linear(spec.d_model, spec.vocab, use_bias=False, rngs=rngs))

    def embed(self, tokens):
        return self.model.embed_tokens(tokens)

    def context(self, length: int):
        """What every block takes besides its input: RoPE's cos and sin."""
        return rope(self.spec, length)

    def head(self, x):
        x = self.model.norm(x)
        if self.lm_head is None:
            return self.model.embed_tokens.attend(x)
        return self.lm_head(x)
