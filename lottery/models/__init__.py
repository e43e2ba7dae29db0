"""Model registry: `build_model(name, ...)` returns a `ModelSpec` of pure functions.

The engine never holds an `nnx` module: it works on the pure-dict params that `init` returns
and calls `apply(params, x)`; both are traceable, so they run under jit and vmap.
"""

import math
from dataclasses import dataclass
from typing import Callable

import jax
from flax import nnx

from lottery.models.lenet import LeNet300100

MODELS = {"lenet_300_100": LeNet300100}


class ModelError(Exception):
    """An unknown model name or bad model options."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    init: Callable  # key -> params (nested dict of arrays)
    apply: Callable  # (params, x) -> logits
    prunable: tuple[str, ...]  # layer names whose `kernel` is pruned; nothing else is

    def param_counts(self, params) -> dict[str, int]:
        """Number of weights per prunable layer (for unbatched params)."""
        return {layer: math.prod(params[layer]["kernel"].shape) for layer in self.prunable}


def build_model(name: str, input_shape, num_classes: int, **options) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]

    def make(key):
        return cls(tuple(input_shape), num_classes, rngs=nnx.Rngs(key), **options)

    try:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))
    except (TypeError, ValueError, ArithmeticError) as error:
        raise ModelError(f"model {name}: {error}") from None

    def init(key):
        return nnx.to_pure_dict(nnx.split(make(key))[1])

    def apply(params, x):
        return nnx.merge(graphdef, params)(x)

    return ModelSpec(name, init, apply, tuple(cls.prunable))
