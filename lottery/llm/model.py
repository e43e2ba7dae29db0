"""One interface over the families' modules: the whole model, or one piece at a time.

`apply(spec, params, tokens)` gives the logits of a whole model (params: the pure dict of
its `nnx` module, paths = checkpoint names). The pieces run separately, so that a model can
be pruned (or evaluated) one block at a time with only that block's weights in memory
(`lottery.llm.oneshot`): `embed` (tokens -> the first block's input), `block` (one block's
output and its linear layers' inputs), `head` (final norm and logits). Each piece is
compiled once per spec and shape; a block's weights are an argument, so all blocks share
one program.
"""

import functools
import math

import jax
from flax import nnx

from lottery.llm import gpt2, llama
from lottery.llm.spec import ModelSpec

FAMILIES = {"gpt2": (gpt2.GPT2, gpt2), "llama": (llama.Llama, llama)}


def module_class(spec: ModelSpec):
    return FAMILIES[spec.family][0]


def linear_inputs(spec: ModelSpec) -> dict:
    """Input name -> the linear layers of a block that read it (paths inside the block)."""
    return FAMILIES[spec.family][1].LINEAR_INPUTS


def block_path(spec: ModelSpec) -> tuple:
    """Where the blocks sit in the params tree: params[a][b][layer]."""
    return FAMILIES[spec.family][1].BLOCKS


@functools.cache
def _abstract(spec: ModelSpec):
    return nnx.eval_shape(lambda: module_class(spec)(spec, rngs=nnx.Rngs(0)))


@functools.cache
def graphdef(spec: ModelSpec) -> nnx.GraphDef:
    return nnx.split(_abstract(spec), nnx.Param)[0]


@functools.cache
def block_graphdef(spec: ModelSpec) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: module_class(spec).Block(spec, nnx.Rngs(0))),
                     nnx.Param)[0]


def shapes(spec: ModelSpec) -> dict:
    """The params tree of `spec` as jax.ShapeDtypeStruct leaves (float32)."""
    return nnx.to_pure_dict(nnx.split(_abstract(spec), nnx.Param)[1])


def param_count(spec: ModelSpec) -> int:
    """Parameters of a model of `spec` (every array of its params tree)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes(spec)))


def blocks_of(spec: ModelSpec, params: dict) -> dict:
    a, b = block_path(spec)
    return params[a][b]


def at(tree: dict, path: str):
    """The subtree at a dotted path ("self_attn.q_proj")."""
    for key in path.split("."):
        tree = tree[key]
    return tree


def linear_weights(spec: ModelSpec) -> int:
    """Weights in the blocks' linear layers (what one-shot pruning prunes), biases apart."""
    a, b = block_path(spec)
    block = shapes(spec)[a][b][0]
    return spec.layers * sum(math.prod(at(block, path)["kernel"].shape)
                             for linears in linear_inputs(spec).values() for path in linears)


def outer(spec: ModelSpec, params: dict) -> dict:
    """The params outside the blocks (embeddings, final norm, head), with no blocks."""
    a, b = block_path(spec)
    return {**params, a: {k: v for k, v in params[a].items() if k != b}}


def _whole(spec: ModelSpec, params: dict):
    """The module with `params`; blocks absent from `params` stay abstract (unused)."""
    a, b = block_path(spec)
    full = shapes(spec)
    merged = {**full, **params, a: {**full[a], **params[a]}}
    merged[a][b] = {**full[a][b], **params[a].get(b, {})}
    return nnx.merge(graphdef(spec), merged)


@functools.partial(jax.jit, static_argnums=0)
def apply(spec: ModelSpec, params: dict, tokens):
    """Logits (B, T, V) float32 of int tokens (B, T), T <= spec.context."""
    check_length(spec, tokens.shape[-1])
    model = nnx.merge(graphdef(spec), params)
    x = model.embed(tokens)
    context = model.context(tokens.shape[-1])
    a, b = block_path(spec)
    for module in getattr(getattr(model, a), b):
        x, _ = module(x, *context)
    return model.head(x)


@functools.partial(jax.jit, static_argnums=0)
def embed(spec: ModelSpec, outer_params: dict, tokens):
    """The first block's input (B, T, d)."""
    check_length(spec, tokens.shape[-1])
    return _whole(spec, outer_params).embed(tokens)


def check_length(spec: ModelSpec, length: int) -> None:
    """A sequence longer than the model's context is an error, not NaN logits (GPT-2's
    position table has `context` rows; out-of-range lookups fill with NaN under jit)."""
    if length > spec.context:
        raise ValueError(f"{length} tokens exceed the model's context of {spec.context}")


@functools.partial(jax.jit, static_argnums=(0, 3))
def block(spec: ModelSpec, block_params: dict, x, capture: bool = False):
    """One block: its output (B, T, d), and with `capture` its linear layers' inputs
    ({input name: (B, T, n_in)}, names as `linear_inputs`)."""
    module = nnx.merge(block_graphdef(spec), block_params)
    context = _abstract(spec).context(x.shape[1])
    out, inputs = module(x, *context)
    return (out, inputs) if capture else out


@functools.partial(jax.jit, static_argnums=0)
def head(spec: ModelSpec, outer_params: dict, x):
    """Logits (B, T, V) from the last block's output."""
    return _whole(spec, outer_params).head(x)
