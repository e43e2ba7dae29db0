"""Model registry: `build_model(name, ...)` returns a `ModelSpec` of pure functions.

The engine never holds an `nnx` module: it works on the pure-dict `params` (trained and
pruned) and `state` (everything else a module carries, e.g. batch-norm running statistics:
never pruned, never touched by the optimizer) that `init` returns, and calls `apply`; both
are traceable, so they run under jit and vmap.

A registered model is an `nnx.Module` class with
  * `__init__(self, input_shape, num_classes, *, rngs, **options)`,
  * `__call__(self, x, *, train=False, rngs=None)`: batch norm uses batch statistics and
    updates its running ones when `train`; dropout draws from `rngs` when `train`,
  * a class attribute `prunable`: the dotted paths (`"stage1.0.conv1"`) of the layers whose
    `kernel` is pruned. The model declares them; nothing is guessed from names,
  * a class attribute `convolves`: whether its forward pass has a convolution (on CPU the
    members of such a model train one at a time, `lottery.platform.member_mode`); a module
    that does not declare it counts as not convolving,
  * a method `structure(self)`: the groups of units (hidden neurons, conv channels) that
    structured pruning may remove (`lottery.models.structure`), kept in `ModelSpec.groups`.
"""

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from lottery.models.conv import Conv2, Conv4, Conv6
from lottery.models.lenet import LeNet300100
from lottery.models.lenet5 import LeNet5, LeNet5Caffe
from lottery.models.mlp import MNIST1DMLP
from lottery.models.resnet import ResNet20, ResNet32, ResNet56
from lottery.models.resnet_imagenet import ResNet18, ResNet50
from lottery.models.structure import Group
from lottery.models.vgg import VGG11, VGG16, VGG19

MODELS = {
    "lenet_300_100": LeNet300100,
    "lenet5": LeNet5,
    "lenet5_caffe": LeNet5Caffe,
    "conv2": Conv2,
    "conv4": Conv4,
    "conv6": Conv6,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "mnist1d_mlp": MNIST1DMLP,
}


class ModelError(Exception):
    """An unknown model name or bad model options."""


def lookup(tree, path: str):
    """The subtree of a pure dict at a dotted `path` (integer keys, as `nnx.List` makes, too)."""
    for key in path.split("."):
        tree = tree[int(key)] if key not in tree and key.isdigit() else tree[key]
    return tree


@dataclass(frozen=True)
class ModelSpec:
    name: str
    init: Callable  # key -> (params, state), nested dicts of arrays
    apply: Callable  # (params, state, x, train=False, key=None) -> (logits, new state)
    prunable: tuple[str, ...]  # paths of the layers whose `kernel` is pruned; nothing else is
    groups: tuple[Group, ...] = ()  # removable units (structured pruning), see models.structure
    convolves: bool = False  # whether the forward pass has a convolution (the class declares it)
    graphdef: nnx.GraphDef | None = field(default=None, compare=False, repr=False)

    def param_counts(self, params) -> dict[str, int]:
        """Number of weights per prunable layer (for unbatched params)."""
        return {layer: math.prod(lookup(params, layer)["kernel"].shape)
                for layer in self.prunable}

    def logits(self, params, state, x):
        """Evaluation-mode outputs (running batch-norm statistics, no dropout)."""
        return self.apply(params, state, x)[0]


def build_model(name: str, input_shape, num_classes: int, **options) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    accepted = [key for key, parameter in inspect.signature(cls.__init__).parameters.items()
                if parameter.kind == parameter.KEYWORD_ONLY and key != "rngs"]
    for key in options:
        if key not in accepted:
            takes = f"its options are {', '.join(accepted)}" if accepted else "it takes none"
            raise ModelError(f"model.{key} is not an option of model {name} (drop it with "
                             f"~model.{key}); {takes}")

    def make(key):
        return cls(tuple(input_shape), num_classes, rngs=nnx.Rngs(key), **options)

    try:
        abstract = nnx.eval_shape(lambda: make(jax.random.key(0)))
    except (TypeError, ValueError, ArithmeticError) as error:  # a bad option, or inputs it
        raise ModelError(f"model {name}: {error}") from None  # cannot take (the messages say)

    def init(key):
        _, params, state = nnx.split(make(key), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(state)

    return spec_of(name, abstract, init, tuple(cls.prunable))


def spec_of(name: str, module: nnx.Module, init: Callable, prunable) -> ModelSpec:
    """The `ModelSpec` of modules like `module` (abstract or not; also a compacted model)."""
    graphdef, _, _ = nnx.split(module, nnx.Param, ...)

    def apply(params, state, x, train=False, key=None):
        # batch norm assigns its running statistics in place (`mean[...] = ...`): on numpy
        # leaves, an eager call would overwrite the caller's arrays (or fail on read-only
        # ones); as JAX arrays they are replaced instead (under jit they are tracers anyway)
        model = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, state))
        rngs = None if key is None else nnx.Rngs(dropout=key)
        logits = model(x, train=train, rngs=rngs)
        return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    groups = tuple(module.structure()) if hasattr(module, "structure") else ()
    return ModelSpec(name, init, apply, tuple(prunable), groups,
                     convolves=bool(getattr(module, "convolves", False)), graphdef=graphdef)
