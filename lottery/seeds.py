"""Derived randomness: every key comes from fold_in(seed, replicate, level, branch, purpose).

So a member's numbers never depend on how many replicates, branches or devices run beside
it, or on a restart. Branch and purpose ids are fixed hashes of their names.
"""

import zlib

import jax
import jax.numpy as jnp


def name_id(name: str) -> int:
    """A stable 31-bit id for a branch or purpose name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def member_keys(seed, replicates: int, level, branch: str, purpose: str):
    """Keys for replicates 0..R-1 of one (level, branch, purpose); traceable in seed and level."""
    parts = [jnp.asarray(level, jnp.uint32), jnp.uint32(name_id(branch)),
             jnp.uint32(name_id(purpose))]

    def one(replicate):
        key = jax.random.fold_in(jax.random.key(jnp.asarray(seed, jnp.uint32)), replicate)
        for part in parts:
            key = jax.random.fold_in(key, part)
        return key

    return jax.vmap(one)(jnp.arange(replicates, dtype=jnp.uint32))
