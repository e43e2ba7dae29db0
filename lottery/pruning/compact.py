"""Compaction: a model with units removed, rebuilt as a smaller dense `nnx` model.

`compact(spec, params, state, unit_masks)` keeps, for every group named in `unit_masks`
(`lottery.pruning.structured`), only the surviving slices of its producers' kernels, biases,
batch-norm scales/shifts and running statistics and of its consumers' kernel inputs. The
smaller arrays are merged into the model's graph and the layers' recorded sizes
(`in_features`, `out_features`, `num_features`) are set from them, so the result is a
self-consistent `nnx` module, with a `ModelSpec` of its own that runs it (and whose groups
can be pruned again). In evaluation mode, and in training mode up to the dropout draws, it
computes what the original model computes with `unit_weight_masks` applied to its params.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lottery.models import ModelSpec, lookup, spec_of
from lottery.models.structure import StructureError
from lottery.pruning.structured import check_unit_masks


def param_count(params) -> int:
    """Number of parameters (weights, biases, batch-norm scales and shifts)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


@dataclass(frozen=True)
class Compacted:
    spec: ModelSpec  # runs the smaller model; its `init` returns `params, state` below
    module: nnx.Module  # the smaller model itself (holding `params` and `state`)
    params: dict
    state: dict
    kept: dict  # group name -> indices (into the original units) of the units kept

    @property
    def param_count(self) -> int:
        return param_count(self.params)


def _resize(module: nnx.Module) -> None:
    """Set each layer's recorded sizes from its (sliced) arrays."""
    for _, layer in nnx.iter_modules(module):
        if isinstance(layer, (nnx.Linear, nnx.Conv)):
            layer.in_features, layer.out_features = layer.kernel.shape[-2:]
        elif isinstance(layer, nnx.BatchNorm):
            layer.num_features = layer.mean.shape[0]


def compact(spec: ModelSpec, params, state, unit_masks, masks=None) -> Compacted:
    """The smaller dense model that keeps the units where `unit_masks` (group name -> 0/1
    vector, concrete) is nonzero; groups not named keep every unit. `params`, `state`
    unbatched; `masks`, if given, is applied to `params` first (unstructured zeros stay)."""
    if spec.graphdef is None:
        raise StructureError(f"{spec.name}: this spec has no graph to compact; build it with "
                             "lottery.models.build_model")
    check_unit_masks(spec.groups, unit_masks)
    # on the host, in NumPy: one-off slicing, not worth compiling a program per leaf shape
    params, state = (jax.tree.map(np.asarray, tree) for tree in (params, state))
    if masks is not None:
        params = jax.tree.map(lambda p, m: p * m.astype(p.dtype), params,
                              jax.tree.map(np.asarray, masks))
    kept = {}
    for group in spec.groups:
        if group.name not in unit_masks:
            continue
        keep = np.flatnonzero(np.asarray(unit_masks[group.name]) != 0)
        if keep.size == 0:
            raise StructureError(f"{spec.name}: unit mask {group.name!r} removes every unit; "
                                 "keep at least one (an empty layer disconnects the network)")
        kept[group.name] = keep
        for s in (*group.producers, *group.consumers):
            leaves = lookup(state if s.in_state else params, s.layer)
            leaf = leaves[s.leaf]
            repeats = leaf.shape[s.axis] // group.size  # > 1: a flattened (h, w, C) input
            index = (np.arange(repeats)[:, None] * group.size + keep).ravel()
            leaves[s.leaf] = np.take(leaf, index, axis=s.axis)
    params, state = (jax.tree.map(jnp.asarray, tree) for tree in (params, state))
    module = nnx.merge(spec.graphdef, params, state)
    _resize(module)
    _, param_state, rest = nnx.split(module, nnx.Param, ...)
    params, state = nnx.to_pure_dict(param_state), nnx.to_pure_dict(rest)
    small = spec_of(f"{spec.name}-compact", module, lambda key: (params, state), spec.prunable)
    return Compacted(small, module, params, state, kept)
