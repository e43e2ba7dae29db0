"""Optimizers and learning-rate schedules from Optax, driven by the *global* training step.

The learning rate is an injected hyperparameter that the training loop sets from
`schedule(step)` at every step, where `step` counts from the start of the dense run. A
branch rewound to step k therefore resumes the schedule at k (warmup done, milestones
passed), whatever the optimizer's own step counter says. Fine-tuning instead holds a
constant rate (a traced value, so it shares the compiled program).
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import optax

from lottery.durations import DurationError, to_steps


class OptimizerError(Exception):
    """An unknown optimizer or bad optimizer options."""


@dataclass(frozen=True)
class Optimizer:
    transform: optax.GradientTransformation  # state carries an injected `learning_rate`
    schedule: Callable  # global step (traced int) -> learning rate

    def init(self, params):
        return self.transform.init(params)

    def update(self, grads, state, params, step, constant_lr=0.0):
        """One update at global step `step`: the schedule's rate (or `constant_lr` where it is
        positive: fine-tuning), then the transform."""
        rate = jnp.where(constant_lr > 0, constant_lr, self.schedule(step))
        hyperparams = {**state.hyperparams, "learning_rate": rate}
        return self.transform.update(grads, state._replace(hyperparams=hyperparams), params)


def learning_rate_schedule(lr: float, milestones=(), gamma: float = 0.1, warmup: int = 0,
                           cosine_steps: int | None = None):
    """Linear warmup from 0 over `warmup` steps, then `lr` times `gamma` at each milestone;
    or, with `cosine_steps`, a cosine decay from `lr` to `gamma * lr` at step `cosine_steps`
    (warmup included, as optax counts it; held there after), the transformer recipe."""
    if cosine_steps is not None:
        warmup = min(warmup, max(cosine_steps - 1, 0))  # at least one step of decay
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                                  cosine_steps, gamma * lr)
    decayed = optax.piecewise_constant_schedule(lr, {int(m): gamma for m in milestones})
    if not warmup:
        return decayed
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), lambda step: decayed(step + warmup)], [warmup])


def _number(key, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise OptimizerError(f"optimizer.{key}={value!r} must be a "
                             f"{'positive ' if positive else ''}number")
    return value


def build_optimizer(name: str, lr: float, *, steps_per_epoch: int, milestones=(),
                    gamma: float = 0.1, warmup=0, weight_decay: float = 0.0,
                    cosine_steps=None, clip: float | None = None, **options) -> Optimizer:
    """`adam` (b1, b2, eps) or `sgd` (momentum, nesterov), with optional `weight_decay` (L2,
    added to the gradient as in PyTorch and OpenLTH), step decay at `milestones` (steps or
    "<n>ep") by `gamma` or cosine decay to `gamma * lr` over `cosine_steps`, linear
    `warmup`, and gradients first clipped to global norm `clip`."""
    if name not in ("adam", "sgd"):
        raise OptimizerError(f"unknown optimizer {name!r}; choose adam or sgd")
    base = optax.adam if name == "adam" else optax.sgd
    _number("lr", lr, positive=True)
    _number("gamma", gamma, positive=True)
    if _number("weight_decay", weight_decay) < 0:
        raise OptimizerError(f"optimizer.weight_decay={weight_decay} must be at least 0")
    if clip is not None:
        _number("clip", clip, positive=True)
    accepted = [key for key in inspect.signature(base).parameters
                if key != "learning_rate" and not key.endswith("dtype")]
    for key, value in options.items():
        if key not in accepted:
            raise OptimizerError(f"optimizer.{key} is not an option of optimizer {name}; its "
                                 f"options are lr, milestones, gamma, warmup, weight_decay, "
                                 "cosine_steps, clip, "
                                 f"{', '.join(accepted)}")
        if key == "nesterov":
            if not isinstance(value, bool):
                raise OptimizerError(f"optimizer.nesterov={value!r} must be true or false")
        elif key == "eps":
            _number(key, value, positive=True)
        elif key in ("momentum", "b1", "b2"):
            if not 0 <= _number(key, value) < 1:
                raise OptimizerError(f"optimizer.{key}={value} must be in [0, 1)")
        elif _number(key, value) < 0:
            raise OptimizerError(f"optimizer.{key}={value} must be at least 0")
    if isinstance(milestones, (str, int)) or milestones is None:
        raise OptimizerError(f"optimizer.milestones={milestones!r} must be a list, e.g. "
                             "[80ep,120ep]")
    try:
        milestones = sorted(to_steps(m, steps_per_epoch, "optimizer.milestones")
                            for m in milestones)
        warmup = to_steps(warmup, steps_per_epoch, "optimizer.warmup")
        if cosine_steps is not None:
            cosine_steps = to_steps(cosine_steps, steps_per_epoch, "optimizer.cosine_steps")
    except DurationError as error:
        raise OptimizerError(str(error)) from None
    if cosine_steps is not None and (milestones or cosine_steps < 1):
        raise OptimizerError(f"optimizer.cosine_steps={cosine_steps} must be at least 1 step, "
                             "and milestones empty (one decay: step or cosine)")

    def transform(learning_rate):
        parts = [base(learning_rate, **options)]
        if weight_decay:
            parts.insert(0, optax.add_decayed_weights(weight_decay))
        if clip is not None:
            parts.insert(0, optax.clip_by_global_norm(clip))
        return parts[0] if len(parts) == 1 else optax.chain(*parts)

    try:
        transform(lr)
    except TypeError as error:
        raise OptimizerError(f"optimizer {name}: {error}") from None
    return Optimizer(optax.inject_hyperparams(transform)(learning_rate=lr),
                     learning_rate_schedule(lr, milestones, gamma, warmup, cosine_steps))
