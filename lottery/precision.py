"""The precision a forward pass computes in (`train.precision`)."""

import jax
import jax.numpy as jnp

PRECISIONS = ("fp32", "bf16")


def to_precision(precision: str):
    """The cast of params and inputs into the precision the forward pass computes in: fp32
    leaves them; bf16 casts float32 leaves to bfloat16 (matmuls and activations in bf16),
    while the params themselves, the optimizer state and the masks stay float32, so the
    gradients flow back in float32 and masked weights stay exactly zero."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return lambda tree: tree
    return lambda tree: jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, tree)
