"""Pytree operations on masks: 0/1 arrays with the params' tree structure and one dtype.

Only the `kernel` of each prunable layer is ever pruned; every other leaf keeps a mask of
ones, so masks and params always have the same structure (no `None` leaves).
"""

import jax
import jax.numpy as jnp

from lottery.models import lookup

MASK_DTYPE = jnp.float32


def full_masks(params):
    """All-ones masks for `params`: the dense network."""
    return jax.tree.map(lambda p: jnp.ones(p.shape, MASK_DTYPE), params)


def apply_masks(params, masks):
    return jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, masks)


def kernels(tree, layers):
    """The prunable leaves of a params or masks tree, by layer path (`"stage1.0.conv1"`)."""
    return {layer: lookup(tree, layer)["kernel"] for layer in layers}


def with_kernels(tree, new_kernels):
    """A copy of `tree` whose prunable kernels are replaced by `new_kernels`."""
    tree = jax.tree.map(lambda x: x, tree)  # new dicts all the way down, same leaves
    for layer, kernel in new_kernels.items():
        lookup(tree, layer)["kernel"] = kernel
    return tree


def remaining(masks, layers):
    """Number of surviving weights per prunable layer."""
    return {layer: jnp.sum(m) for layer, m in kernels(masks, layers).items()}


def density(masks, layers):
    """Fraction of prunable weights remaining over all `layers` (unbatched masks)."""
    alive = sum(jnp.sum(m) for m in kernels(masks, layers).values())
    total = sum(m.size for m in kernels(masks, layers).values())
    return alive / total
