"""Structured pruning: remove whole units (hidden neurons, conv output channels).

A model's removable units come in groups (`lottery.models.structure`): `model_groups` picks
those of one kind. The functions below are pure and traceable (jit, vmap), on the engine's
pure-dict `params` and `masks` (same tree, 0/1 float32) and on *unit masks*: per group name,
a 0/1 float32 vector of the group's size (1 = the unit stays):
  * `group_scores`: the norm of each unit's producer kernel slices;
  * `keep_fraction`: unit masks that keep a fraction of the best-scoring units;
  * `units_alive`: which units still have an unmasked producer weight;
  * `unit_weight_masks`: weight masks that remove units: their producers' kernel, bias and
    batch-norm scale/shift slices and their consumers' kernel input slices are zeroed.
Batch-norm running statistics are model state, not params: they get no mask. A removed unit
then outputs exactly 0 after its batch norm and ReLU and nobody reads it, so the masked
network computes what `lottery.pruning.compact.compact` builds as a smaller dense model.
"""

import jax
import jax.numpy as jnp

from lottery.models import lookup
from lottery.models.structure import KINDS, Group, Slice, StructureError

__all__ = ["Group", "Slice", "StructureError", "group_scores", "keep_fraction", "model_groups",
           "unit_weight_masks", "units_alive"]

NORMS = ("l2", "l1")


def model_groups(model, kind: str, layers=None) -> tuple[Group, ...]:
    """The groups of `kind` ("neurons" or "channels") of `model` (a `ModelSpec`, or a module
    with a `structure()` method), all of them or those that `layers` names: group names
    (`"stage1.stream"`) or paths of layers whose kernels produce a group (`"stage1.0.conv2"`
    names its stage's stream). Raises `StructureError` when the model has no such units or a
    named layer produces none (the output layer: its outputs are the classes)."""
    if kind not in KINDS:
        raise StructureError(f"kind={kind!r}: choose 'neurons' (dense layers' hidden units) or "
                             "'channels' (convolutions' output channels)")
    if hasattr(model, "groups"):
        name, every = model.name, model.groups
    else:
        name, every = type(model).__name__, tuple(model.structure())
    groups = tuple(g for g in every if g.kind == kind)
    if not groups:
        kinds = sorted({g.kind for g in every})
        other = f"it has {' and '.join(kinds)}" if kinds else "it declares no removable units"
        raise StructureError(f"{name} has no {kind} to remove; {other}")
    if layers is None:
        return groups
    if isinstance(layers, str):
        layers = [layers]
    chosen = []
    for layer in layers:
        found = [g for g in groups if layer == g.name or layer in g.layers]
        if not found:
            other = [g for g in every if layer == g.name or layer in g.layers]
            why = (f"it produces {other[0].kind}" if other else
                   "no layer of that name produces units; the output layer's outputs are "
                   "the classes and are never removed")
            raise StructureError(f"{name}: {layer!r} is no group of {kind} ({why}); choose "
                                 f"from {', '.join(g.name for g in groups)}")
        chosen += [g for g in found if g not in chosen]
    return tuple(chosen)


def _units_first(x, axis: int, size: int):
    """`x` as (size, rest): the unit index first. An axis of `t * size` entries (a flattened
    (h, w, C) input, C fastest) gives each unit its `t` entries `c, c + size, ...`."""
    x = jnp.moveaxis(x, axis, -1)
    x = x.reshape(-1, x.shape[-1] // size, size)
    return jnp.moveaxis(x, -1, 0).reshape(size, -1)


def _spread(units, leaf, axis: int):
    """The unit vector broadcast along `axis` of `leaf` (tiled over a flattened input)."""
    repeats = leaf.shape[axis] // units.shape[-1]
    shape = [1] * leaf.ndim
    shape[axis] = leaf.shape[axis]
    return jnp.tile(units.astype(leaf.dtype), repeats).reshape(shape)


def _kernel_rows(tree, group: Group):
    return [_units_first(lookup(tree, s.layer)[s.leaf], s.axis, group.size)
            for s in group.producers if s.leaf == "kernel"]


def group_scores(params, groups, norm: str = "l2") -> dict:
    """Per group, the norm (n,) of each unit's producer kernel slices, over all producers."""
    if norm not in NORMS:
        raise StructureError(f"norm={norm!r}: choose one of {', '.join(NORMS)}")
    scores = {}
    for group in groups:
        rows = _kernel_rows(params, group)
        if norm == "l2":
            scores[group.name] = jnp.sqrt(sum(jnp.sum(jnp.square(r), axis=1) for r in rows))
        else:
            scores[group.name] = sum(jnp.sum(jnp.abs(r), axis=1) for r in rows)
    return scores


def keep_fraction(scores, fraction) -> dict:
    """Per group, the unit mask keeping round(fraction * n) units (at least one) with the
    largest scores; ties go to the lower index. `fraction` may be traced."""
    masks = {}
    for name, score in scores.items():
        size = score.shape[-1]
        keep = jnp.clip(jnp.round(fraction * size), 1, size)
        rank = jnp.argsort(jnp.argsort(-score, stable=True), stable=True)
        masks[name] = (rank < keep).astype(jnp.float32)
    return masks


def units_alive(masks, groups) -> dict:
    """Per group, 1.0 for a unit with a nonzero mask entry in any producer kernel slice."""
    return {group.name: (sum(jnp.sum(r != 0, axis=1) for r in _kernel_rows(masks, group)) > 0
                         ).astype(jnp.float32)
            for group in groups}


def check_unit_masks(groups, unit_masks) -> None:
    """Unit masks name groups of `groups` and have their sizes (static checks)."""
    sizes = {group.name: group.size for group in groups}
    for name, units in unit_masks.items():
        if name not in sizes:
            raise StructureError(f"unit mask {name!r} names no group; groups: "
                                 f"{', '.join(sizes)}")
        if tuple(units.shape) != (sizes[name],):
            raise StructureError(f"unit mask {name!r} has shape {tuple(units.shape)}, the group "
                                 f"has {sizes[name]} units")


def unit_weight_masks(masks, groups, unit_masks):
    """`masks` times, for each group in `unit_masks`, its unit mask spread over the producers'
    kernel, bias and batch-norm scale/shift slices and the consumers' kernel input slices.
    Groups missing from `unit_masks` keep all units; unstructured zeros stay."""
    check_unit_masks(groups, unit_masks)
    masks = jax.tree.map(lambda m: m, masks)  # new dicts all the way down, same leaves
    for group in groups:
        if group.name not in unit_masks:
            continue
        for s in (*group.producers, *group.consumers):
            if s.in_state:
                continue
            leaves = lookup(masks, s.layer)
            leaves[s.leaf] = leaves[s.leaf] * _spread(unit_masks[group.name], leaves[s.leaf],
                                                      s.axis)
    return masks
