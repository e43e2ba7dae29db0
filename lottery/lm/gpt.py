"""A small GPT-style decoder-only transformer, with per-layer sizes and multiplicative gates.

Architecture: token + learned position embeddings; `layers` pre-LayerNorm blocks, each
`x = x + g * attention(ln1(x))`, then `x = x + g * mlp(ln2(x))` (causal multi-head
self-attention; GELU (tanh form, as GPT-2) MLP); a final LayerNorm;
the output head is tied to the token embedding (`logits = h @ tokens.T`): with a byte
vocabulary it is small either way, and tying keeps one matrix to prune and quantize.
Initialised as GPT-2: weights normal(0, 0.02), the two residual output projections (`wo`,
`w2`) normal(0, 0.02 / sqrt(2 * layers)), biases 0, LayerNorm scale 1. No dropout.
q, k, v and the first FFN layer have biases (one per unit: they go with their unit); the
residual output projections `wo`, `w2` have none, so a sublayer whose units are all gated
off adds exactly nothing to the residual stream and removing it is exact (an output bias
would stay behind as a constant that no compaction can drop).

Sizes are per layer (`GPTConfig.heads`, `GPTConfig.ffn`), so a compacted model
(`lottery.lm.compact`) is this same class with smaller numbers. A layer with 0 heads has no
attention sublayer (and no `ln1`), one with 0 FFN width no MLP sublayer (and no `ln2`).

Masks are multiplicative gates, float32, on the units a removal acts on:
  masks = {"heads": [(H_l,) per layer], "ffn": [(F_l,) per layer], "layers": (L,)}
  * heads[l][h] multiplies head h's attention output (before the output projection `wo`),
  * ffn[l][f] multiplies FFN hidden unit f (after the GELU, before `w2`),
  * layers[l] multiplies the residual contribution of each of block l's two sublayers,
    so g = 0 is the block removed and any g folds exactly into `wo` and `w2`.
A gate at 0 computes exactly what the compacted model computes; a gate in (0, 1] is what
`compact` folds into the weights. The gradient of the loss w.r.t. a head or FFN gate is the
sum over tokens of <ungated activation, gradient w.r.t. the gated activation>: the Taylor
importance |activation x gradient|, from one `jax.grad` w.r.t. the masks. A layer gate's
gradient is the sum of its two sublayers' terms (the MLP's input includes the gated
attention output), the first-order effect of scaling the whole block.
A mask leaf may also carry leading axes that broadcast against (batch, time): (B, 1, H_l)
gates per sequence, (B, T, H_l) per token, so one backward pass gives per-example (or
per-token) gate gradients (e.g. Michel et al. 2019's E|dL/dxi_h|). The loss is a mean over
the batch, so these are the per-example gradients divided by B. (`compact` and
`check_masks` take only the plain per-unit shapes.)

Parameters as a pure dict (`init`):
  tokens (V, d), positions (context, d), ln_f {scale, bias} (d,),
  blocks {l: {ln1: {scale, bias}, attn: {wq, wk, wv (d, H, hd), bq, bk, bv (H, hd),
                                          wo (H, hd, d)},
              ln2: {scale, bias}, mlp: {w1 (d, F), b1 (F,), w2 (F, d)}}}
  (a block without attention has no ln1 and attn, one without an MLP no ln2 and mlp)
"""

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

STD = 0.02
EPSILON = 1e-5


class PruneRequestError(ValueError):
    """Masks that do not fit the model, or a removal that the model cannot take."""


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a decoder-only transformer; `heads[l]`, `ffn[l]` are layer l's head count and
    FFN width (0: that sublayer is absent). Hashable: a static argument under `jax.jit`."""

    vocab: int = 256
    context: int = 128
    d_model: int = 128
    head_dim: int = 32
    heads: tuple[int, ...] = (4, 4, 4, 4)
    ffn: tuple[int, ...] = (512, 512, 512, 512)

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))
        object.__setattr__(self, "ffn", tuple(self.ffn))
        for name in ("vocab", "context", "d_model", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r} must be a positive integer")
            object.__setattr__(self, name, int(value))
        if len(self.heads) != len(self.ffn):
            raise ValueError(f"GPTConfig: heads {self.heads} and ffn {self.ffn} must give one "
                             "size per layer each")
        if not self.heads:
            raise ValueError("GPTConfig: at least one layer is needed")
        for name in ("heads", "ffn"):
            sizes = getattr(self, name)
            if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0
                   for n in sizes):
                raise ValueError(f"GPTConfig.{name}={sizes} must be non-negative integers")
            object.__setattr__(self, name, tuple(int(n) for n in sizes))
        for layer, (h, f) in enumerate(zip(self.heads, self.ffn)):
            if h == 0 and f == 0:
                raise ValueError(f"GPTConfig: layer {layer} has no heads and no FFN units; "
                                 "drop the empty layer from the config")

    @classmethod
    def uniform(cls, layers: int, heads: int, d_model: int, ffn_multiple: int = 4,
                context: int = 128, vocab: int = 256, head_dim: int | None = None):
        """`layers` equal blocks; `head_dim` defaults to d_model // heads."""
        if head_dim is None:
            if heads < 1 or d_model % heads:
                raise ValueError(f"GPTConfig.uniform: d_model={d_model} is not a multiple of "
                                 f"heads={heads}; give head_dim")
            head_dim = d_model // heads
        return cls(vocab, context, d_model, head_dim, (heads,) * layers,
                   (ffn_multiple * d_model,) * layers)

    @property
    def layers(self) -> int:
        return len(self.heads)


class _Normals:
    """Consecutive slices of one standard-normal draw: one random-number program instead of
    one per weight (XLA compiles threefry slowly on CPU: 30 draws about 5 s, one well under
    1 s), so `init` compiles fast for every new (e.g. compacted) config."""

    def __init__(self, key, size: int):
        self.values, self.used = jax.random.normal(key, (size,), jnp.float32), 0

    def param(self, shape, std: float) -> nnx.Param:
        size = math.prod(shape)
        values = self.values[self.used:self.used + size].reshape(shape)
        self.used += size
        return nnx.Param(std * values)


def _zeros(shape) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32))


class Attention(nnx.Module):
    """Causal multi-head self-attention; heads kept on their own axis, so removing one is
    slicing it out of q/k/v's output and `wo`'s input."""

    def __init__(self, d: int, heads: int, head_dim: int, resid_std: float, *, draw):
        self.wq, self.wk, self.wv = (draw.param((d, heads, head_dim), STD) for _ in "qkv")
        self.bq, self.bk, self.bv = (_zeros((heads, head_dim)) for _ in "qkv")
        self.wo = draw.param((heads, head_dim, d), resid_std)

    def heads(self, x):
        """Each head's output (B, T, H, hd), before the output projection."""
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...]) + b[...]
                   for w, b in ((self.wq, self.bq), (self.wk, self.bk), (self.wv, self.bv)))
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    def project(self, o):
        return jnp.einsum("bthk,hkd->btd", o, self.wo[...])


class MLP(nnx.Module):
    def __init__(self, d: int, width: int, resid_std: float, *, draw):
        self.w1, self.b1 = draw.param((d, width), STD), _zeros((width,))
        self.w2 = draw.param((width, d), resid_std)

    def hidden(self, x):
        return jax.nn.gelu(x @ self.w1[...] + self.b1[...], approximate=True)

    def project(self, u):
        return u @ self.w2[...]


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, head_dim: int, width: int, resid_std: float, *,
                 rngs, draw):
        self.head_dim = head_dim
        self.ln1 = nnx.LayerNorm(d, epsilon=EPSILON, rngs=rngs) if heads else None
        self.attn = Attention(d, heads, head_dim, resid_std, draw=draw) if heads else None
        self.ln2 = nnx.LayerNorm(d, epsilon=EPSILON, rngs=rngs) if width else None
        self.mlp = MLP(d, width, resid_std, draw=draw) if width else None

    def __call__(self, x, head_gate, ffn_gate, layer_gate, captured):
        """x + the gated sublayers; `captured` (a dict of lists, or None) gets this block's
        activations appended."""
        layer_gate = jnp.asarray(layer_gate, x.dtype)[..., None]
        B, T, _ = x.shape
        out = jnp.zeros_like(x)
        o = u = attn_in = ffn_in = None
        if self.attn is not None:
            attn_in = self.ln1(x)
            o = self.attn.heads(attn_in)
            a = layer_gate * self.attn.project(o * jnp.asarray(head_gate, x.dtype)[..., None])
            x, out = x + a, out + a
        if self.mlp is not None:
            ffn_in = self.ln2(x)
            u = self.mlp.hidden(ffn_in)
            m = layer_gate * self.mlp.project(u * jnp.asarray(ffn_gate, x.dtype))
            x, out = x + m, out + m
        if captured is not None:
            empty = jnp.zeros((B, T, 0, self.head_dim), x.dtype)
            captured["heads"].append(o if o is not None else empty)
            captured["ffn"].append(u if u is not None else jnp.zeros((B, T, 0), x.dtype))
            captured["attn_in"].append(attn_in)
            captured["ffn_in"].append(ffn_in)
            captured["block_out"].append(out)
        return x


class GPT(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, resid_std = config.d_model, STD / math.sqrt(2 * config.layers)
        draw = _Normals(rngs.params(), param_count(config))  # more than enough numbers
        self.tokens = draw.param((config.vocab, d), STD)
        self.positions = draw.param((config.context, d), STD)
        self.blocks = nnx.List([Block(d, h, config.head_dim, f, resid_std, rngs=rngs, draw=draw)
                                for h, f in zip(config.heads, config.ffn)])
        self.ln_f = nnx.LayerNorm(d, epsilon=EPSILON, rngs=rngs)

    def __call__(self, tokens, masks, captured=None):
        T = tokens.shape[-1]
        if T > self.config.context:
            raise ValueError(f"{T} tokens exceed the model's context of {self.config.context}")
        x = self.tokens[...][tokens] + self.positions[...][:T]
        layer_gates = jnp.asarray(masks["layers"])
        for i, block in enumerate(self.blocks):
            if captured is not None:
                captured["layers"].append(x)
            x = block(x, masks["heads"][i], masks["ffn"][i], layer_gates[..., i], captured)
        return self.ln_f(x) @ self.tokens[...].T


@functools.cache
def graphdef(config: GPTConfig) -> nnx.GraphDef:
    """The module graph of `config`'s model (built abstractly, once per config)."""
    abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)[0]


@functools.partial(jax.jit, static_argnums=0)
def init(config: GPTConfig, key) -> dict:
    """Fresh parameters (a pure dict, layout in the module docstring)."""
    return nnx.to_pure_dict(nnx.split(GPT(config, rngs=nnx.Rngs(key)), nnx.Param)[1])


def full_masks(config: GPTConfig) -> dict:
    """All-ones gates: {"heads": [(H_l,)], "ffn": [(F_l,)], "layers": (L,)}, float32."""
    return {"heads": [jnp.ones((h,), jnp.float32) for h in config.heads],
            "ffn": [jnp.ones((f,), jnp.float32) for f in config.ffn],
            "layers": jnp.ones((config.layers,), jnp.float32)}


def check_mask_shapes(config: GPTConfig, masks) -> None:
    """Raise `PruneRequestError` unless `masks` has `full_masks(config)`'s structure; each
    leaf's last axis must be the unit axis (leading axes may broadcast against (B, T))."""
    if not isinstance(masks, dict) or set(masks) != {"heads", "ffn", "layers"}:
        got = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
        raise PruneRequestError(f"masks must be a dict with keys 'heads', 'ffn', 'layers' "
                                f"(see lottery.lm.gpt.full_masks), got {got}")
    L = config.layers
    for kind, sizes in (("heads", config.heads), ("ffn", config.ffn)):
        if not isinstance(masks[kind], (list, tuple)) or len(masks[kind]) != L:
            raise PruneRequestError(f"masks[{kind!r}] must be a list of {L} arrays, one per "
                                    f"layer; got {_describe(masks[kind])}")
        for layer, (mask, size) in enumerate(zip(masks[kind], sizes)):
            shape = np.shape(mask)
            if not shape or shape[-1] != size:
                raise PruneRequestError(f"masks[{kind!r}][{layer}] has shape {shape}; layer "
                                        f"{layer} has {size} {_UNITS[kind]}, so use shape "
                                        f"({size},)")
    shape = np.shape(masks["layers"])
    if not shape or shape[-1] != L:
        raise PruneRequestError(f"masks['layers'] has shape {shape}; the model has {L} layers, "
                                f"so use shape ({L},)")


_UNITS = {"heads": "heads", "ffn": "FFN units"}


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} of shape {np.shape(value)}"


def apply(config: GPTConfig, params: dict, tokens, masks=None, capture: bool = False):
    """Logits (B, T, V) for int tokens (B, T), T <= context; traceable (jit, vmap, grad).

    With `capture`, returns `(logits, captured)`, per layer (lists of L arrays):
      heads     (B, T, H_l, hd): each head's attention output, ungated (what the gate scales),
      ffn       (B, T, F_l): the FFN hidden activations after GELU, ungated,
      layers    (B, T, d): the input of each block (the residual stream),
      attn_in   (B, T, d): ln1's output, the input of wq/wk/wv (None without attention),
      ffn_in    (B, T, d): ln2's output, the input of w1 (None without an MLP),
      block_out (B, T, d): the block's (gated) residual contribution, output - input.
    Wanda's ||X_j|| for a weight's input feature j: the norm over (B, T) of `attn_in` (wq, wk,
    wv), of `heads` (wo), of `ffn_in` (w1), of `ffn` (w2). Absent sublayers give (B, T, 0, hd)
    and (B, T, 0) arrays for heads and ffn."""
    if masks is None:
        masks = full_masks(config)
    check_mask_shapes(config, masks)
    model = nnx.merge(graphdef(config), params)
    captured = ({k: [] for k in ("heads", "ffn", "layers", "attn_in", "ffn_in", "block_out")}
                if capture else None)
    logits = model(tokens, masks, captured)
    return (logits, captured) if capture else logits


def loss(config: GPTConfig, params: dict, tokens_in, targets, masks=None):
    """Mean next-byte cross entropy in nats over (B, T)."""
    logits = apply(config, params, tokens_in, masks)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def param_count(config: GPTConfig) -> int:
    """Exactly the number of parameters `init(config, key)` makes."""
    d, hd = config.d_model, config.head_dim
    total = config.vocab * d + config.context * d + 2 * d
    for h, f in zip(config.heads, config.ffn):
        if h:
            total += 2 * d + 3 * (d * h * hd + h * hd) + h * hd * d
        if f:
            total += 2 * d + d * f + f + f * d
    return total


def param_bytes(params) -> int:
    """Bytes of the parameter arrays (float32: 4 per parameter). Not called `bytes`, which
    would shadow the builtin."""
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(params))
