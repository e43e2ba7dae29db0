"""What structured pruning may remove from a model: its *units*, declared as groups.

A unit is a hidden neuron of a dense layer or an output channel of a convolution. A `Group`
is one shared dimension of size `size` whose units are removed together with everything that
creates or reads them:
  * producers: the slices that create a unit: a layer's `kernel` output axis and `bias`, the
    following batch norm's `scale`, `bias` (params) and `mean`, `var` (model state); all the
    layers that write to one residual stream are producers of one group;
  * consumers: the slices that read a unit: the next layers' `kernel` input axis. Where a
    convolution's output is flattened into a dense layer, the dense kernel's input axis holds
    (h, w, C) with C fastest: the consumer axis is then `size` times a whole multiple, and a
    unit `c` owns the rows `c, c + size, c + 2 size, ...`.
The output layer's outputs (the classes) are never a group.

A model declares its groups with a method `structure(self) -> tuple[Group, ...]` built by
`group(self, name, producers, consumers)` from layer paths; the slices, the kind ("neurons"
for a dense producer, "channels" for a convolution) and the size are read off the layers.
`lottery.pruning.structured` computes with them; `build_model` stores them in the spec.
"""

import itertools
from dataclasses import dataclass

from flax import nnx

KINDS = ("neurons", "channels")
STATE_LEAVES = ("mean", "var")  # batch-norm running statistics: model state, not params


class StructureError(ValueError):
    """A structured-pruning request the model cannot satisfy (no such units, not a group)."""


@dataclass(frozen=True)
class Slice:
    """The `axis` of the leaf `leaf` of the layer at dotted path `layer`."""

    layer: str
    leaf: str
    axis: int

    @property
    def in_state(self) -> bool:
        """Whether the leaf lives in the model state (running statistics), not in params."""
        return self.leaf in STATE_LEAVES


@dataclass(frozen=True)
class Group:
    """`size` units that producers create and consumers read (see the module docstring)."""

    name: str
    kind: str  # "neurons" | "channels"
    size: int
    producers: tuple[Slice, ...]
    consumers: tuple[Slice, ...]

    @property
    def layers(self) -> tuple[str, ...]:
        """The paths of the layers whose kernels produce the units."""
        return tuple(s.layer for s in self.producers if s.leaf == "kernel")


def submodule(module, path: str):
    for key in path.split("."):
        module = module[int(key)] if key.isdigit() else getattr(module, key)
    return module


def _shape(variable) -> tuple[int, ...]:
    return tuple(variable.shape)


def _producer_slices(layer, path: str) -> tuple[Slice, ...]:
    if isinstance(layer, (nnx.Linear, nnx.Conv)):
        slices = [Slice(path, "kernel", len(_shape(layer.kernel)) - 1)]
        if layer.bias is not None:
            slices.append(Slice(path, "bias", 0))
        return tuple(slices)
    if isinstance(layer, nnx.BatchNorm):
        leaves = [name for name in ("scale", "bias") if getattr(layer, name) is not None]
        return tuple(Slice(path, name, 0) for name in (*leaves, *STATE_LEAVES))
    raise TypeError(f"{path}: a {type(layer).__name__} cannot produce units")


def _consumer_slice(layer, path: str) -> Slice:
    if isinstance(layer, nnx.Linear):
        return Slice(path, "kernel", 0)
    if isinstance(layer, nnx.Conv):
        return Slice(path, "kernel", len(_shape(layer.kernel)) - 2)  # (..., in, out)
    raise TypeError(f"{path}: a {type(layer).__name__} cannot consume units")


def group(model, name: str, producers, consumers) -> Group:
    """The group `name` of `model` whose units the layers at `producers` (dotted paths, the
    first one a dense or conv layer) create and those at `consumers` read."""
    layers = {path: submodule(model, path) for path in (*producers, *consumers)}
    first = layers[producers[0]]
    if not isinstance(first, (nnx.Linear, nnx.Conv)):
        raise TypeError(f"group {name}: its first producer {producers[0]} must be dense or conv")
    kind = "neurons" if isinstance(first, nnx.Linear) else "channels"
    size = _shape(first.kernel)[-1]
    made = tuple(s for path in producers for s in _producer_slices(layers[path], path))
    read = tuple(_consumer_slice(layers[path], path) for path in consumers)
    for s in made:
        if _shape(getattr(submodule(model, s.layer), s.leaf))[s.axis] != size:
            raise ValueError(f"group {name}: {s.layer}.{s.leaf} axis {s.axis} is not {size}")
    for s in read:
        if _shape(getattr(submodule(model, s.layer), s.leaf))[s.axis] % size:
            raise ValueError(f"group {name}: {s.layer} input axis is no multiple of {size}")
    return Group(name, kind, size, made, read)


def chain(model, paths) -> tuple[Group, ...]:
    """The groups of a plain feed-forward stack: each layer's outputs, read by the next."""
    return tuple(group(model, path, [path], [after])
                 for path, after in itertools.pairwise(paths))
