"""GPT-2's decoder, as transformers' `modeling_gpt2` defines its forward pass, in `flax.nnx`.

Token plus learned position embeddings (`wte`, `wpe`); each block
`h = x + c_proj(attention(ln_1(x)))` with q|k|v from one fused projection (`c_attn`, its
output split in three), causal, scaled by 1/sqrt(head_dim); then
`h + mlp.c_proj(gelu_tanh(c_fc(ln_2(h))))`; a final LayerNorm (`ln_f`) and the output head
tied to `wte`. LayerNorm computes the variance as mean((x − mean)²), as PyTorch does (not
flax's faster E[x²] − mean², which loses digits on GPT-2's large residual stream).
Attribute names are transformers' (`transformer.h.0.attn.c_attn`), so a parameter's path is
its checkpoint name; GPT-2's `Conv1D` stores (in, out) weights, the `kernel` layout here.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lottery.llm.spec import ModelSpec

LINEAR_INPUTS = {
    "attn_in": ("attn.c_attn",),
    "attn_out": ("attn.c_proj",),
    "mlp_in": ("mlp.c_fc",),
    "mlp_hidden": ("mlp.c_proj",),
}
BLOCKS = ("transformer", "h")


def _norm(spec: ModelSpec, rngs):
    return nnx.LayerNorm(spec.d_model, epsilon=spec.norm_eps, use_fast_variance=False,
                         rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        d = spec.d_model
        self.c_attn = nnx.Linear(d, 3 * spec.heads * spec.head_dim, rngs=rngs)
        self.c_proj = nnx.Linear(spec.heads * spec.head_dim, d, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.c_fc = nnx.Linear(spec.d_model, spec.ffn, rngs=rngs)
        self.c_proj = nnx.Linear(spec.ffn, spec.d_model, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.head_dim = spec.head_dim
        self.ln_1, self.ln_2 = _norm(spec, rngs), _norm(spec, rngs)
        self.attn, self.mlp = Attention(spec, rngs), MLP(spec, rngs)

    def __call__(self, x):
        """(output, inputs): `inputs` holds each of `LINEAR_INPUTS`' arrays."""
        B, T, _ = x.shape
        attn_in = self.ln_1(x)
        q, k, v = (part.reshape(B, T, -1, self.head_dim)
                   for part in jnp.split(self.attn.c_attn(attn_in), 3, axis=-1))
        attn_out = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, -1)
        h = x + self.attn.c_proj(attn_out)
        mlp_in = self.ln_2(h)
        hidden = jax.nn.gelu(self.mlp.c_fc(mlp_in), approximate=True)
        out = h + self.mlp.c_proj(hidden)
        return out, {"attn_in": attn_in, "attn_out": attn_out, "mlp_in": mlp_in,
                     "mlp_hidden": hidden}


class Body(nnx.Module):
    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.wte = nnx.Embed(spec.vocab, spec.d_model, rngs=rngs)
        self.wpe = nnx.Embed(spec.context, spec.d_model, rngs=rngs)
        self.h = nnx.List([Block(spec, rngs) for _ in range(spec.layers)])
        self.ln_f = _norm(spec, rngs)


class GPT2(nnx.Module):
    """The causal LM: `transformer` (wte, wpe, h, ln_f) and, untied, `lm_head`."""

    Block = Block

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.spec = spec
        self.transformer = Body(spec, rngs)
        self.lm_head = (None if spec.tied else
                        nnx.Linear(spec.d_model, spec.vocab, use_bias=False, rngs=rngs))

    def embed(self, tokens):
        T = tokens.shape[-1]
        return self.transformer.wte(tokens) + self.transformer.wpe(jnp.arange(T))

    def context(self, length: int):
        return ()

    def head(self, x):
        x = self.transformer.ln_f(x)
        if self.lm_head is None:
            return self.transformer.wte.attend(x)
        return self.lm_head(x)
