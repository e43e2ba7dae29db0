"""Optimizers and learning-rate schedules from Optax, driven by the *global* training step.

The learning rate is an injected hyperparameter that the training loop sets from
`schedule(step)` at every step, where `step` counts from the start of the dense run. A
branch rewound to step k therefore resumes the schedule at k (warmup done, milestones
passed), whatever the optimizer's own step counter says. Fine-tuning instead holds a
constant rate (a traced value, so it shares the compiled program).
"""

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


def learning_rate_schedule(lr: float, milestones=(), gamma: float = 0.1, warmup: int = 0):
    """Linear warmup from 0 over `warmup` steps, then `lr` times `gamma` at each milestone."""
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
                    **options) -> Optimizer:
    """`adam` (b1, b2, eps) or `sgd` (momentum, nesterov), with optional `weight_decay` (L2,
    added to the gradient as in PyTorch and OpenLTH), step decay at `milestones` (steps or
    "<n>ep") by `gamma`, and linear `warmup`."""
    _number("lr", lr, positive=True)
    _number("gamma", gamma, positive=True)
    _number("weight_decay", weight_decay)
    for key, value in options.items():
        if not isinstance(value, (int, float)):  # bools are ints: nesterov=true passes
            raise OptimizerError(f"optimizer.{key}={value!r} must be a number or a boolean")
    if isinstance(milestones, (str, int)) or milestones is None:
        raise OptimizerError(f"optimizer.milestones={milestones!r} must be a list, e.g. "
                             "[80ep,120ep]")
    try:
        milestones = sorted(to_steps(m, steps_per_epoch, "optimizer.milestones")
                            for m in milestones)
        warmup = to_steps(warmup, steps_per_epoch, "optimizer.warmup")
    except DurationError as error:
        raise OptimizerError(str(error)) from None
    if name not in ("adam", "sgd"):
        raise OptimizerError(f"unknown optimizer {name!r}; choose adam or sgd")
    base = optax.adam if name == "adam" else optax.sgd

    def transform(learning_rate):
        step = base(learning_rate, **options)
        return optax.chain(optax.add_decayed_weights(weight_decay), step) if weight_decay else step

    try:
        transform(lr)
    except TypeError as error:
        raise OptimizerError(f"optimizer {name}: {error}") from None
    return Optimizer(optax.inject_hyperparams(transform)(learning_rate=lr),
                     learning_rate_schedule(lr, milestones, gamma, warmup))
