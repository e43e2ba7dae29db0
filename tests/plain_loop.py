"""An independent reference for the engine's training, written from the specification only.

`plain_training` trains one member with nothing of the engine's: the model's own `apply`,
Adam as `optax.scale_by_adam` with the learning rate applied by hand, L2 weight decay added
to the gradient by hand, the mask multiplied into the gradient before Adam and into the
weights after the update, and a plain Python loop over the steps. What it takes from
`lottery` is only the specification of *which* numbers to use: the member's derived keys
(`lottery.seeds.member_keys`, DESIGN.md's `fold_in(seed, replicate, level, branch,
purpose)`) and the data order (`lottery.data.order.batch_indices`, whose own properties
tests/test_order.py checks). The learning rate is `hand_schedule`, written here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottery.data.order import batch_indices
from lottery.seeds import member_keys


def hand_schedule(lr: float, warmup: int = 0, milestones=(), gamma: float = 0.1):
    """The learning rate at global step `step`: linear warmup from 0 to `lr` over `warmup`
    steps, times `gamma` for every milestone at or before `step`."""
    def rate(step: int) -> float:
        ramp = min(step / warmup, 1.0) if warmup else 1.0
        return lr * ramp * gamma ** sum(step >= m for m in milestones)

    return rate


def initial_weights(model, seed: int, replicates: int, replicate: int):
    """Replicate `replicate`'s initial (params, model state): the model's init from its
    derived key (level 0, branch ticket, purpose init)."""
    keys = member_keys(seed, replicates, 0, "ticket", "init")
    return jax.tree.map(np.asarray, _jitted(model.init)(keys[replicate]))


@functools.lru_cache
def _jitted(function):
    return jax.jit(function)


def data_key(seed: int, replicates: int, level: int, branch: str, replicate: int):
    return member_keys(seed, replicates, level, branch, "data")[replicate]


@functools.lru_cache
def _step_function(model, weight_decay: float):
    """One jitted step (compiled once per model and weight decay)."""
    adam = optax.scale_by_adam()

    def loss_fn(params, model_state, x, y):
        logits, model_state = model.apply(params, model_state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), model_state

    @jax.jit
    def step(params, model_state, moments, masks, x, y, lr):
        grads, model_state = jax.grad(loss_fn, has_aux=True)(params, model_state, x, y)
        grads = jax.tree.map(lambda g, m: g * m, grads, masks)
        grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        direction, moments = adam.update(grads, moments)
        params = jax.tree.map(lambda p, d, m: (p - lr * d) * m, params, direction, masks)
        return params, model_state, moments

    return step, adam.init


def plain_training(model, data, start, masks, key, steps: range, batch_size: int,
                   schedule, weight_decay: float = 0.0):
    """(params, model state) after training from `start` (params, model state) at the
    global `steps` under `masks` (0/1, the params' structure), from a fresh Adam state, on
    the batches `batch_indices(key, steps, n, batch_size)` picks, at `schedule(step)`."""
    step, adam_init = _step_function(model, weight_decay)
    params, model_state = start
    masks = jax.tree.map(lambda m: np.asarray(m, np.float32), masks)
    params = jax.tree.map(lambda p, m: np.asarray(p) * m, params, masks)
    moments = adam_init(params)
    order = np.asarray(batch_indices(key, jnp.arange(steps.start, steps.stop), len(data.x_train),
                                     batch_size))
    for at, idx in zip(steps, order):
        params, model_state, moments = step(params, model_state, moments, masks,
                                            data.x_train[idx], data.y_train[idx],
                                            np.float32(schedule(at)))
    return jax.tree.map(np.asarray, (params, model_state))


def ones_like(tree):
    return jax.tree.map(lambda x: np.ones(np.shape(x), np.float32), tree)


def flat(tree, prefix: str) -> dict:
    """A tree as `lottery.record.save_arrays` names its leaves: "prefix/layer/leaf"."""
    return {f"{prefix}/{'/'.join(str(k.key) for k in path)}": leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
