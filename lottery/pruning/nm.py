"""N:M structured sparsity: keep N of every M consecutive weights along a kernel's inputs.

Kernels are in Flax layouts, a Dense kernel (in, out), a convolution's (h, w, in, out): the
input axis is the one before last, and a *group* is M consecutive entries along it for one
output unit (and one spatial position): the layouts of NVIDIA's 2:4 sparsity. A kernel of
`size` weights has G = size / M groups; an N:M mask keeps exactly N in each.

- `keep_groups`: the traceable keep rule (what `lottery.pruning.prune.keep_counts` applies
  to an N:M plan's layers): the top `round(count / G)` of each group by score. Ties are
  broken at random from a key, never by position; a NaN score ranks below every number; a
  weight already pruned in the base mask ranks last and is never kept.
- `random_groups`, `shuffled_groups`: a random N:M selection (random_prune) and each group
  permuted (shuffle), with the same number kept per group.
- `compress` / `decompress`: the compressed layout, the kept weights (`values`, N per group,
  in order) and each one's position in its group (`indices`, ceil(log2 M) bits each, packed
  into uint8), and back; `layout_bytes` its size. JAX has no N:M sparse matmul, so the
  layout saves memory (storage, transfer), not time.
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lottery.pruning.masks import MASK_DTYPE

FLOAT_BYTES = 4  # the dense kernels are float32


def groups_of(x, m: int):
    """`x` (..., in, out) as (..., out, in / m, m): each group of m inputs on the last axis
    (NumPy in, NumPy out; else JAX)."""
    x = (np if isinstance(x, np.ndarray) else jnp).moveaxis(x, -2, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def kernel_of(grouped, shape):
    """The inverse of `groups_of`: (..., out, in / m, m) back to `shape` (..., in, out)."""
    x = grouped.reshape(*grouped.shape[:-2], shape[-2])
    return (np if isinstance(x, np.ndarray) else jnp).moveaxis(x, -1, -2)


def group_ranks(scores, mask, m: int, key):
    """Each entry's rank in its group (0: best), grouped as `groups_of` gives: survivors of
    `mask` by score, highest first, then NaN scores, then pruned entries; equal scores in
    the order of random 32-bit draws from `key` (as `lottery.pruning.prune.keep_top`), then
    of position. Counted by comparing every pair in a group (m² comparisons per group, no
    sort: fast for the small m of N:M sparsity)."""
    alive = mask > 0
    category = jnp.where(alive, jnp.where(jnp.isnan(scores), 1, 0), 2)
    value = jnp.where(category == 0, scores, 0)
    draws = jax.random.bits(key, scores.shape, jnp.uint32)
    position = jnp.broadcast_to(jnp.arange(m), groups_of(category, m).shape)
    # sort keys, the first deciding: category, score (highest first), draw, position
    keys = (groups_of(category, m), -groups_of(value, m), groups_of(draws, m), position)
    before = jnp.zeros(keys[0].shape + (m,), bool)  # [..., i, j]: j ranks before i
    equal = jnp.ones_like(before)
    for k in keys:
        mine, other = k[..., :, None], k[..., None, :]
        before = before | (equal & (other < mine))
        equal = equal & (other == mine)
    return jnp.sum(before, axis=-1)


def keep_groups(scores, mask, count, m: int, key):
    """A mask keeping, in every group of `m` inputs, the `round(count / G)` highest-scoring
    survivors of `mask` (G: the kernel's groups); `count` may be traced. A count that is
    N·G keeps exactly N per group where every group has N survivors."""
    per_group = jnp.round(count / (mask.size // m)).astype(jnp.int32)
    kept = (group_ranks(scores, mask, m, key) < per_group) & (groups_of(mask, m) > 0)
    return kernel_of(kept.astype(MASK_DTYPE), mask.shape)


def random_groups(key, selection, candidates, m: int):
    """A random selection keeping as many per group as `selection` keeps on average (an N:M
    selection: N), drawn among `candidates` (random_prune)."""
    draw, ties = jax.random.split(key)
    return keep_groups(jax.random.uniform(draw, selection.shape), candidates,
                       jnp.sum(selection), m, ties)


def shuffled_groups(key, selection, m: int):
    """`selection` with each group's entries permuted at random: the same number kept in
    every group, at random positions (the shuffle control)."""
    grouped = groups_of(selection, m)
    order = jnp.argsort(jax.random.uniform(key, grouped.shape), axis=-1)
    return kernel_of(jnp.take_along_axis(grouped, order, axis=-1), selection.shape)


def index_bits(m: int) -> int:
    """Bits that store a position in a group of m: ceil(log2 m)."""
    return max(1, (m - 1).bit_length())


def layout_bytes(kept: int, m: int, value_bytes: int = FLOAT_BYTES) -> int:
    """Bytes of the compressed layout of a kernel with `kept` weights kept, N per group:
    the values plus their packed positions."""
    return kept * value_bytes + math.ceil(kept * index_bits(m) / 8)


@dataclass(frozen=True)
class Compressed:
    """An N:M-masked kernel in the compressed layout: `values` (the kernel's shape with its
    input axis cut to in·N/M: N per group, in their order in the group), `indices` (each
    value's position in its group, `index_bits(m)` bits each, packed little-endian into
    uint8 in the values' row-major order)."""

    values: np.ndarray
    indices: np.ndarray
    shape: tuple
    n: int
    m: int

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes


def compress(kernel, mask, n: int, m: int) -> Compressed:
    """The compressed layout of `kernel` under `mask`, which keeps exactly `n` of every
    group of `m` inputs (else `ValueError`). On the host (NumPy)."""
    kernel, keep = np.asarray(kernel), np.asarray(mask) > 0
    shape = kernel.shape
    if len(shape) < 2 or shape[-2] % m:
        raise ValueError(f"a kernel of shape {shape} has no groups of {m} along its inputs")
    keep = groups_of(keep, m)
    if not np.all(keep.sum(axis=-1) == n):
        raise ValueError(f"the mask is not {n}:{m}: its groups keep "
                         f"{sorted(set(keep.sum(axis=-1).ravel().tolist()))} weights")
    positions = np.argsort(~keep, axis=-1, kind="stable")[..., :n]  # kept, in order
    values = np.take_along_axis(groups_of(kernel, m), positions, axis=-1)
    out_shape = (*shape[:-2], shape[-2] // m * n, shape[-1])
    values = np.ascontiguousarray(kernel_of(values, out_shape))
    positions = kernel_of(positions, out_shape).ravel()
    bits = ((positions[:, None] >> np.arange(index_bits(m))) & 1).astype(np.uint8)
    return Compressed(values, np.packbits(bits.ravel(), bitorder="little"), shape, n, m)


def decompress(compressed: Compressed) -> np.ndarray:
    """The dense kernel of `compressed`: its values at their positions, zeros elsewhere."""
    c, bits = compressed, index_bits(compressed.m)
    flat = np.unpackbits(c.indices, count=c.values.size * bits, bitorder="little")
    positions = (flat.reshape(-1, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
    positions = groups_of(positions.reshape(c.values.shape), c.n)
    dense = np.zeros((*positions.shape[:-1], c.m), c.values.dtype)
    np.put_along_axis(dense, positions, groups_of(c.values, c.n), axis=-1)
    return kernel_of(dense, c.shape)
