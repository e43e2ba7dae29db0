"""Per-layer one-shot pruning rules for pretrained language models: magnitude, Wanda, SparseGPT.

A linear layer computes `y = x @ kernel (+ bias)`, `kernel` (in, out) (Flax's layout);
calibration inputs X are (tokens, in). A layer-by-layer driver starts a layer's statistics
with `calibration(in)`, adds each batch of its inputs with `accumulate`, then calls one rule
on the layer's kernel and statistics (`sparsity`: `parse_sparsity`'s "0.5" or "2:4"):

    magnitude(kernel, sparsity)                       -> mask
    wanda(kernel, squares, sparsity)                  -> mask
    sparsegpt(kernel, gram, sparsity, block, damp)    -> (new kernel, mask)
    reconstruction_error(kernel, new_kernel, gram)    -> Σ_tokens ‖x (W − Ŵ)‖²

Ported from the references (the rules, not their code):
  - magnitude, Wanda: locuslab/wanda `lib/prune.py` (prune_magnitude, prune_wanda) and
    `lib/layerwrapper.py` (WrappedGPT.add_batch: scaler_row, the per-feature Σx²).
  - SparseGPT: IST-DASLab/sparsegpt `sparsegpt.py` (SparseGPT.add_batch: the Hessian
    2XᵀX / n; fasterprune: the OBS update with lazy block updates).

Where ours differs, on purpose:
  - Exact counts. Each comparison group (a layer for magnitude, an output for Wanda, a
    block of inputs for SparseGPT) loses exactly floor(size · fraction) entries, the
    references' `int(size * sparsity)`, counted on the host in float64 with a tolerance
    (0.29 · 100 counts 29, not 28). The references' `score <= sorted[int(size * sparsity)]`
    (magnitude, SparseGPT) prunes one entry more than that, and every entry tied at the cut:
    at sparsity 0 it still prunes the smallest weight of each group (Wanda's per-output
    sort prunes exactly int(in * sparsity), ties by position). Here the cut is
    `lottery.pruning.prune.keep_top` (N:M: `lottery.pruning.nm.group_ranks`): ties broken by
    random draws from `key`, never by position; a NaN score ranks lowest (is pruned first).
  - N:M means KEEP n of every m consecutive inputs (the framework's convention,
    `lottery.pruning.nm`); the references' `prune_n` counts the entries pruned. 2:4 and 4:8
    are the same either way.
  - SparseGPT's dead inputs (never nonzero in the calibration data, diag(H) = 0): the
    reference zeroes their weights before pruning; here they score 0, so they are pruned
    first, and are otherwise left alone: at sparsity 0 the kernel comes back unchanged.
    A weight that is not finite is pruned (or kept) without an update of the others.
  - SparseGPT's U (the Cholesky factor of H⁻¹) comes from one Cholesky factor and one
    triangular inverse (`inverse_factor`), not the reference's three factorisations: the
    same matrix, half the work. Products run at float32 `Precision.HIGHEST` (the reference
    turns TF32 off); the work is in float32 whatever the kernel's dtype.

Scale never matters: every rule ranks scores within a group (a common factor cancels) and
SparseGPT's update is invariant to scaling H (damping is relative to mean(diag H); only the
dead inputs' H_ii = 1, as in the reference, enters that mean unscaled), so the statistics
are plain float32 sums over tokens, not the references' running means (precise enough:
Σx² within 6e-7 of float64's, relative, over 5·10⁵ tokens added in 256 batches).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from lottery.pruning.masks import MASK_DTYPE
from lottery.pruning.nm import group_ranks, kernel_of
from lottery.pruning.prune import keep_top

HIGHEST = jax.lax.Precision.HIGHEST
COUNT_TOLERANCE = 1e-6  # size · fraction within this of an integer counts as that integer


class Sparsity(NamedTuple):
    """What a layer loses. Unstructured (`m` = 0): `fraction` of each comparison group.
    N:M (`m` > 0): all but `n` of every `m` consecutive inputs, for each output; `fraction`
    is then (m − n) / m."""

    fraction: float = 0.0
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def pruned(self, size: int) -> int:
        """Entries an unstructured group of `size` loses: floor(size · fraction), where a
        product within `COUNT_TOLERANCE` of an integer counts as it (float64 products such
        as 0.29 · 100 = 28.999999999999996)."""
        exact = size * float(self.fraction)
        nearest = round(exact)
        return int(nearest if abs(exact - nearest) <= COUNT_TOLERANCE else math.floor(exact))

    def check(self, inputs: int) -> None:
        """ValueError unless a layer of `inputs` inputs splits into groups of `m`."""
        if self.structured and inputs % self.m:
            raise ValueError(f"{self.n}:{self.m} sparsity keeps {self.n} of every {self.m} "
                             f"inputs, but this layer has {inputs} inputs, not a multiple of "
                             f"{self.m}: leave the layer dense or use an M that divides "
                             f"{inputs}")


def parse_sparsity(value) -> Sparsity:
    """A `Sparsity` from a fraction pruned ("0.5", 0.5) or "N:M" (keep N of every M: "2:4")."""
    if isinstance(value, Sparsity):
        return value
    if isinstance(value, np.floating):
        value = str(value)  # its shortest decimal: np.float32(0.29) means 0.29
    bad = ValueError(f"sparsity {value!r} is neither a fraction pruned in [0, 1) nor N:M "
                     "(keep N of every M inputs, 1 <= N < M): use e.g. 0.5 or 2:4")
    if isinstance(value, str) and ":" in value:
        try:
            n, m = (int(part) for part in value.split(":"))
        except ValueError:
            raise bad from None
        if not 1 <= n < m:
            raise bad
        return Sparsity((m - n) / m, n, m)
    if isinstance(value, bool):
        raise bad
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not 0 <= fraction < 1:
        raise bad
    return Sparsity(fraction)


class Calibration(NamedTuple):
    """Sums over the calibration tokens of a layer's input x (in,): `count` tokens (int32),
    `gram` Σ xᵀx (in, in) float32 (SparseGPT's H, up to scale; None when not collected),
    `squares` Σ x_j² (in,) float32 (Wanda's ‖X_j‖²)."""

    count: jax.Array
    gram: jax.Array | None
    squares: jax.Array


def calibration(features: int, gram: bool = True) -> Calibration:
    """Empty statistics for a layer of `features` inputs (no Gram matrix: `gram=False`,
    enough for Wanda, and no (in, in) array)."""
    return Calibration(jnp.int32(0),
                       jnp.zeros((features, features), jnp.float32) if gram else None,
                       jnp.zeros(features, jnp.float32))


@jax.jit
def accumulate(stats: Calibration, x) -> Calibration:
    """`stats` plus the tokens of `x` (..., in): any leading axes are tokens."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    gram = None if stats.gram is None else stats.gram + jnp.matmul(x.T, x, precision=HIGHEST)
    return Calibration(stats.count + x.shape[0], gram,
                       stats.squares + jnp.sum(jnp.square(x), axis=0))


def magnitude(kernel, sparsity, key=None):
    """The mask of the magnitude baseline (wanda `prune_magnitude`): unstructured, the
    lowest |w| of the whole layer (one comparison group); N:M, the top n of |w| in each
    group of m consecutive inputs of each output."""
    sparsity, key = _prepare(kernel, sparsity, key)
    return _select(jnp.abs(kernel.astype(jnp.float32)), _n_keep(sparsity, kernel.size), key,
                   n=sparsity.n, m=sparsity.m, per_output=False)


def wanda(kernel, squares, sparsity, key=None):
    """The Wanda mask (wanda `prune_wanda`): score |W_ij| · ‖X_i‖ (i: input, j: output,
    ‖X_i‖² = `squares`[i]) compared per output: each output (column of the kernel) loses its
    floor(in · fraction) lowest; N:M, the top n in each group of m consecutive inputs."""
    sparsity, key = _prepare(kernel, sparsity, key)
    scores = jnp.abs(kernel.astype(jnp.float32)) * jnp.sqrt(squares.astype(jnp.float32))[:, None]
    return _select(scores, _n_keep(sparsity, kernel.shape[0]), key,
                   n=sparsity.n, m=sparsity.m, per_output=True)


def _prepare(kernel, sparsity, key):
    sparsity = parse_sparsity(sparsity)
    if kernel.ndim != 2:
        raise ValueError(f"a linear layer's kernel is (in, out), not of shape {kernel.shape}")
    sparsity.check(kernel.shape[0])
    return sparsity, jax.random.key(0) if key is None else key


def _n_keep(sparsity: Sparsity, size: int):
    return jnp.int32(size - sparsity.pruned(size))


def _keep_nm(scores, n: int, m: int, key):
    """Keep the top `n` of each group of `m` consecutive inputs of each output of `scores`
    (in, out); ties by draws from `key`, NaN lowest."""
    ranks = group_ranks(scores, jnp.ones_like(scores), m, key)
    return kernel_of((ranks < n).astype(MASK_DTYPE), scores.shape)


@functools.partial(jax.jit, static_argnames=("n", "m", "per_output"))
def _select(scores, n_keep, key, n: int, m: int, per_output: bool):
    """The mask keeping the `n_keep` highest `scores` (in, out) of the layer or of each
    output (`per_output`), or, with `m`, the top `n` of each N:M group."""
    if m:
        return _keep_nm(scores, n, m, key)
    everything = jnp.ones_like(scores, MASK_DTYPE)
    if not per_output:
        return keep_top(scores, everything, n_keep, key)
    keys = jax.random.split(key, scores.shape[1])
    return jax.vmap(keep_top, in_axes=(1, 1, None, 0), out_axes=1)(
        scores, everything, n_keep, keys)


class NotPositiveDefinite(ValueError):
    """SparseGPT's damped Hessian has no Cholesky factor."""


def sparsegpt(kernel, gram, sparsity, block: int = 128, damp: float = 0.01, key=None):
    """(new kernel, mask): SparseGPT's OBS pruning with lazy block updates (sparsegpt
    `fasterprune`), for `gram` = Σ xᵀx of the layer's inputs (any scale).

    H = gram with H_ii = 1 for dead inputs (H_ii = 0), plus `damp` · mean(diag H) on the
    diagonal; U = the upper Cholesky factor of H⁻¹. Inputs are taken in blocks of `block`.
    Unstructured: at a block's start, the block (all outputs × its inputs) loses exactly
    floor(size · fraction) of w² / U_ii² (one comparison group per block). N:M: at each
    input i with i % m == 0, each output keeps the n highest w² / U_ii² of inputs i..i+m−1.
    Then, input by input: q = w with the pruned entries zeroed, err = (w − q) / U_ii, the
    block's later inputs updated by −U[i, i:] ⊗ err; after the block, the later blocks by
    −U[block, later]ᵀ Err. Raises `NotPositiveDefinite` where the Cholesky fails (raise
    `damp`). Jitted once per (shape, block, n, m); `damp` and the counts are traced."""
    sparsity, key = _prepare(kernel, sparsity, key)
    inputs, outputs = kernel.shape
    if gram.shape != (inputs, inputs):
        raise ValueError(f"gram has shape {gram.shape}; a kernel of shape {kernel.shape} "
                         f"needs ({inputs}, {inputs})")
    block = min(block, inputs)
    if block < 1 or (sparsity.structured and block % sparsity.m):
        raise ValueError(f"block={block} must be a positive multiple of M={sparsity.m}"
                         if sparsity.structured else f"block={block} must be positive")
    last = inputs - (math.ceil(inputs / block) - 1) * block  # the last block's inputs
    new, mask, finite = _sparsegpt(
        kernel, gram, _n_keep(sparsity, block * outputs), _n_keep(sparsity, last * outputs),
        jnp.float32(damp), key, block=block, n=sparsity.n, m=sparsity.m)
    if not finite:
        raise NotPositiveDefinite(
            f"SparseGPT: the damped Hessian of this {inputs}x{outputs} layer is not positive "
            f"definite (its Cholesky factor is not finite): raise damp (now {damp}), e.g. to "
            f"{max(damp * 10, 0.1):g}, or check the calibration inputs for NaN or inf")
    return new, mask


def inverse_factor(gram, damp):
    """(U, dead): U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), H = `gram` with H_ii = 1 at
    the dead inputs (`dead`: diag(gram) = 0) and `damp` · mean(diag H) added to the diagonal.

    The reference factors H, inverts it and factors H⁻¹ again. The same U comes from one
    Cholesky factor and one triangular inverse, half the work: with J the reversal of the
    inputs and J H J = L Lᵀ, H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), and J L⁻¹ J is upper triangular with
    a positive diagonal, so it is U."""
    h = gram.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    h = h + damp * jnp.mean(jnp.diag(h)) * eye
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    u = solve_triangular(lower, eye, lower=True)[::-1, ::-1]
    return jnp.triu(u), dead


@functools.partial(jax.jit, static_argnames=("block", "n", "m"))
def _sparsegpt(kernel, gram, keep_full, keep_last, damp, key, block: int, n: int, m: int):
    """`sparsegpt` on the device: (new kernel, mask, whether U is finite). The inputs are
    padded to whole blocks with independent zero inputs (U's padding: the identity), which
    are never kept (unstructured) and are cut off at the end."""
    inputs, outputs = kernel.shape
    u, dead = inverse_factor(gram, damp)
    blocks = math.ceil(inputs / block)
    pad = blocks * block - inputs
    w = jnp.pad(kernel.astype(jnp.float32), ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(inputs + pad) >= inputs)
    dead = jnp.pad(dead, (0, pad))
    real = jnp.arange(inputs + pad) < inputs

    def one_block(b, carry):
        w, keep = carry
        start = b * block
        w1 = jax.lax.dynamic_slice_in_dim(w, start, block)
        rows = jax.lax.dynamic_slice_in_dim(u, start, block)  # U[block, :]
        u1 = jax.lax.dynamic_slice_in_dim(rows, start, block, axis=1)
        d1 = jnp.diagonal(u1)
        dead1 = jax.lax.dynamic_slice_in_dim(dead, start, block)
        block_key = jax.random.fold_in(key, b)
        if m:
            keep1 = jnp.zeros_like(w1, MASK_DTYPE)

            def group(g, carry):
                w1, q1, err1, keep1 = carry
                at = g * m
                scores = _obs_scores(*(jax.lax.dynamic_slice_in_dim(x, at, m)
                                       for x in (w1, d1, dead1)))
                kept = _keep_nm(scores, n, m, jax.random.fold_in(block_key, g))
                keep1 = jax.lax.dynamic_update_slice_in_dim(keep1, kept, at, 0)
                return (*_columns(at, at + m, w1, q1, err1, keep1, u1), keep1)

            _, q1, err1, keep1 = jax.lax.fori_loop(
                0, block // m, group, (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), keep1))
        else:
            alive = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(real, start, block)[:, None],
                                     w1.shape).astype(MASK_DTYPE)
            n_keep = jnp.where(b == blocks - 1, keep_last, keep_full)
            keep1 = keep_top(_obs_scores(w1, d1, dead1), alive, n_keep, block_key)
            _, q1, err1 = _columns(0, block, w1, jnp.zeros_like(w1), jnp.zeros_like(w1),
                                   keep1, u1)
        # the later blocks' lazy update; U is upper triangular, so the earlier rows get
        # exact zeros, and the block's own rows are replaced by q1
        w = w - jnp.matmul(rows.T, err1, precision=HIGHEST)
        w = jax.lax.dynamic_update_slice_in_dim(w, q1, start, 0)
        return w, jax.lax.dynamic_update_slice_in_dim(keep, keep1, start, 0)

    w, keep = jax.lax.fori_loop(0, blocks, one_block, (w, jnp.zeros_like(w, MASK_DTYPE)))
    return (w[:inputs].astype(kernel.dtype), keep[:inputs], jnp.all(jnp.isfinite(u)))


def _obs_scores(w, d, dead):
    """w² / U_ii² for the rows `w` (k, out) of inputs with U_ii = `d` (k,); 0 for `dead`
    inputs (pruned first: below every live weight but a NaN one)."""
    return jnp.where(dead[:, None], 0.0, jnp.square(w) / jnp.square(d)[:, None])


def _columns(lo, hi, w1, q1, err1, keep1, u1):
    """Inputs lo..hi−1 of a block, one at a time: q = the kept part of w, err = (w − q) / U_ii
    (0 where w is not finite: it cannot be compensated), the block's rows −= U[i, :] ⊗ err
    (U upper triangular: the earlier rows get exact zeros). Returns (w1, q1, err1)."""
    def step(i, carry):
        w1, q1, err1 = carry
        w, kept = w1[i], keep1[i] > 0
        err = jnp.where(kept | ~jnp.isfinite(w), 0.0, w / u1[i, i])
        w1 = w1 - u1[i][:, None] * err[None, :]
        return w1, q1.at[i].set(jnp.where(kept, w, 0.0)), err1.at[i].set(err)

    return jax.lax.fori_loop(lo, hi, step, (w1, q1, err1))


@jax.jit
def reconstruction_error(kernel, new_kernel, gram):
    """trace(ΔWᵀ H ΔW) = Σ_tokens ‖x (W − Ŵ)‖², ΔW = W − Ŵ, H = `gram` = Σ xᵀx: the layer-wise
    objective that SparseGPT minimises and Wanda approximates."""
    delta = kernel.astype(jnp.float32) - new_kernel.astype(jnp.float32)
    return jnp.sum(delta * jnp.matmul(gram.astype(jnp.float32), delta, precision=HIGHEST))
