"""What a pruning schedule does inside the compiled training step.

The Trainer (`lottery.train`) runs, for every member at every step:

    params, masks, extra = hooks.before(params, masks, extra, step, controls, key)
    grads = the gradient of the loss at `params` (the network the forward pass uses)
    params, opt_state, masks, extra = hooks.update(optimize, grads, params, opt_state,
                                                   masks, extra, step, controls, key)

`extra` is the schedule's own training state of one member (`MemberState.extra`: e.g. the
dense weights of straight-through training, the weights ever active under RigL), made by
`start` when a level starts and carried through chunks and checkpoints. `step` is the
global step being trained, `controls` the level's traced values (`Schedule.controls`),
`key` the member's pruning key (for ties). `optimize(grads, opt_state, weights)` is the
optimizer's update at this step: `(updates, opt_state)`.

The default is training under fixed masks: gradients are masked before the optimizer and
the params after the update, so pruned weights stay exactly zero (momentum and weight decay
too).
"""

import optax

from lottery.pruning.masks import apply_masks


class StepHooks:
    """Fixed masks: the default of every schedule that does not change masks as it trains."""

    fixed_masks = True  # the masks never change within a level (the step reads them as bools)

    def start(self, params, masks):
        """A member's `extra` when a level starts (none by default)."""
        return ()

    def before(self, params, masks, extra, step, controls, key):
        """Before the forward pass: the params and masks the step trains."""
        return params, masks, extra

    def update(self, optimize, grads, params, opt_state, masks, extra, step, controls, key):
        """The optimizer step under `masks`."""
        return (*masked_update(optimize, grads, params, opt_state, masks), masks, extra)


def masked_update(optimize, grads, params, opt_state, masks):
    """One optimizer step that keeps pruned weights at zero: `(params, opt_state)`."""
    updates, opt_state = optimize(apply_masks(grads, masks), opt_state, params)
    return apply_masks(optax.apply_updates(params, updates), masks), opt_state


class PruneBefore(StepHooks):
    """Masks chosen before some steps by `prune(params, masks, step, controls, key) ->
    masks` (gradual pruning's events), then training under them."""

    fixed_masks = False

    def __init__(self, prune):
        self.prune = prune

    def before(self, params, masks, extra, step, controls, key):
        masks = self.prune(params, masks, step, controls, key)
        return apply_masks(params, masks), masks, extra
