"""Pruning scores: higher means more worth keeping. Pure functions of params (and a key)."""

import jax
import jax.numpy as jnp

from lottery.pruning.masks import kernels


def magnitude(params, layers):
    """|w| of each prunable kernel (Han et al. 2015; Frankle & Carbin 2019)."""
    return {layer: jnp.abs(w) for layer, w in kernels(params, layers).items()}


def uniform_random(key, params, layers):
    """Independent uniform scores: pruning by them removes a random subset."""
    keys = jax.random.split(key, len(layers))
    return {layer: jax.random.uniform(k, w.shape)
            for k, (layer, w) in zip(keys, kernels(params, layers).items())}
