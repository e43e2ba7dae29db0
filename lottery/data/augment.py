"""Traceable training-batch augmentations, for `Dataset.augment`: `(key, x_batch) -> x_batch`.

Pure JAX, so the trainer can apply them inside its compiled loop (under jit and vmap);
the same key always gives the same batch. Jitted themselves, so that calls outside a
compiled loop compile once per batch shape rather than once per operation.
"""

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("pad", "fill"))
def crop_and_flip(key: jax.Array, x: jax.Array, *, pad: int,
                  fill: tuple[float, ...]) -> jax.Array:
    """Per example of an (B, H, W, C) batch: a random H x W crop of the image padded by `pad`
    pixels of value `fill` (one per channel), then a horizontal flip with probability 1/2.

    The standard CIFAR augmentation (He et al. 2016). Give `fill` the normalised value of a
    black pixel to match torchvision's pad-then-normalise."""
    batch, height, width, _ = x.shape
    # one random word per example gives its two offsets and its flip (one threefry call,
    # cheaper to compile than three; the modulo bias is below 1e-8)
    bits = jax.random.bits(key, (batch,))
    span = 2 * pad + 1
    dy, dx, flip = bits % span, bits // span % span, bits // (span * span) % 2 == 1
    inside = jnp.pad(jnp.ones((height, width), bool), pad)[..., None]
    padded = jnp.where(inside, jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))),
                       jnp.asarray(fill, x.dtype))
    rows = dy[:, None] + jnp.arange(height)  # (B, H): the rows each crop takes
    cols = dx[:, None] + jnp.where(flip[:, None], jnp.arange(width)[::-1], jnp.arange(width))
    return padded[jnp.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_crop_and_flip(pad: int, fill: tuple[float, ...]):
    """`crop_and_flip` with its settings bound: a `Dataset.augment`."""
    return functools.partial(crop_and_flip, pad=pad, fill=tuple(float(v) for v in fill))
