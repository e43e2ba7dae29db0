"""Straight-through pruning: the forward pass uses the pruned weights, the dense weights
take the gradient (Bengio et al. 2013's straight-through estimator, as jaxpruner's
`SteMixin`), and SR-STE (Zhou et al. 2021).

A member keeps its dense weights in `extra`. Before every step the masks are chosen again,
by magnitude of the dense weights, at the schedule's count for that step (`count_at`), so a
pruned weight can come back; the network the step trains is the dense weights under them.
The gradient of the loss at that network, taken whole (not masked), updates the dense
weights. SR-STE adds λ_W (1 - mask) ⊙ W to it, decaying the pruned weights towards zero
(the `decay` term of Sparse.backward in Zhou et al.'s code, NM-sparsity/devkit/sparse_ops.py,
λ_W = 2e-4). `params` always hold the dense weights under the masks of the last step.
"""

import jax
import jax.numpy as jnp
import optax

from lottery.pruning.masks import apply_masks
from lottery.pruning.prune import keep_counts
from lottery.pruning.step_hooks import StepHooks


class StraightThrough(StepHooks):
    """`count_at(step, controls) -> Counts`: the units kept at each step; `decay`: SR-STE's
    λ_W (0: plain straight-through)."""

    fixed_masks = False

    def __init__(self, units, plan, count_at, decay: float = 0.0):
        self.units, self.plan, self.count_at, self.decay = units, plan, count_at, decay

    def start(self, params, masks):
        return params  # the level starts dense: these are its dense weights

    def before(self, params, masks, extra, step, controls, key):
        dense = extra
        full = jax.tree.map(jnp.ones_like, masks)
        scores = self.units.scores("magnitude", None, dense, None, full, None, None)
        selection = keep_counts(self.plan, scores, self.units.select(full),
                                self.count_at(step, controls), jax.random.fold_in(key, step))
        masks = self.units.expand(full, selection)
        return apply_masks(dense, masks), masks, dense

    def update(self, optimize, grads, params, opt_state, masks, extra, step, controls, key):
        dense = extra
        if self.decay:
            grads = jax.tree.map(lambda g, w, m: g + self.decay * (1 - m) * w, grads, dense,
                                 masks)
        updates, opt_state = optimize(grads, opt_state, dense)
        dense = optax.apply_updates(dense, updates)
        return apply_masks(dense, masks), opt_state, masks, dense
