"""Erdős–Rényi-Kernel (ERK) layerwise density allocation (Evci et al. 2020, RigL).

Each layer l with kernel shape (d_1, ..., d_k) gets density ε · (Σ d_i) / (Π d_i): for a
dense kernel (in, out) that is ε (in + out) / (in · out) (Erdős–Rényi), for a conv kernel
(h, w, in, out) ε (h + w + in + out) / (h · w · in · out). ε is chosen so that the total
number of kept weights is density × (total number of weights). A layer whose density would
exceed 1 is made dense and ε is re-solved over the others, until no layer exceeds 1, as in
RigL's `sparse_utils.get_sparsities` (method "erdos_renyi_kernel").

Pure Python on static shapes: the result is a plan, not a traced value.
"""

import math
import numbers


def _check(shapes, density, dense_layers):
    if isinstance(density, bool) or not isinstance(density, numbers.Real) \
            or not 0 < density <= 1:
        raise ValueError(f"density={density!r} must be a number in (0, 1]")
    if not shapes:
        raise ValueError("no layers to allocate")
    unknown = set(dense_layers) - set(shapes)
    if unknown:
        raise ValueError(f"dense_layers {sorted(unknown)} are not among the layers {list(shapes)}")
    for layer, shape in shapes.items():
        if len(shape) == 0 or math.prod(shape) == 0:
            raise ValueError(f"layer {layer!r} has an empty kernel shape {tuple(shape)}")


def erk_densities(shapes, density, dense_layers=()):
    """Per-layer densities {layer: d_l in (0, 1]} of the ERK allocation of overall `density`.

    `shapes`: {layer: kernel shape}. `dense_layers`: layers forced dense (density 1); their
    weights count towards the overall budget, exactly like the layers that saturate (so the
    total kept is still density × total; a ValueError if they alone exceed it). This differs
    from RigL's `custom_sparsity_map`, whose layers are left out of the budget altogether.

    RigL moves only the layer(s) with the largest raw density to the dense set on each
    re-solve; here every layer above 1 is moved at once. The result is the same: making a
    saturated layer dense only increases ε, so a layer above 1 stays above 1.
    """
    _check(shapes, density, dense_layers)
    sizes = {layer: math.prod(shape) for layer, shape in shapes.items()}
    raw = {layer: sum(shape) / sizes[layer] for layer, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense = set(dense_layers)
    if sum(sizes[layer] for layer in dense) > budget * (1 + 1e-12):
        raise ValueError(f"dense_layers {sorted(dense)} alone hold more than density={density} "
                         "of the weights")
    while True:
        sparse = [layer for layer in shapes if layer not in dense]
        if not sparse:
            break
        rest = budget - sum(sizes[layer] for layer in dense)
        eps = rest / sum(raw[layer] * sizes[layer] for layer in sparse)
        over = {layer for layer in sparse if eps * raw[layer] > 1}
        if not over:
            break
        dense |= over
    return {layer: 1.0 if layer in dense else min(1.0, eps * raw[layer]) for layer in shapes}


def erk_counts(shapes, density, dense_layers=()):
    """Kept weights per layer, {layer: int}, of the ERK allocation of overall `density`.

    Each layer's count is round(d_l · n_l), at least 1 and at most n_l. The counts are
    rounded by largest remainder, so that, unless the floor of 1 weight per layer forces
    more, they add up to exactly round(density × total).
    """
    densities = erk_densities(shapes, density, dense_layers)
    sizes = {layer: math.prod(shape) for layer, shape in shapes.items()}
    exact = {layer: densities[layer] * sizes[layer] for layer in shapes}
    counts = {layer: min(sizes[layer], max(1, math.floor(exact[layer]))) for layer in shapes}
    missing = round(density * sum(sizes.values())) - sum(counts.values())
    by_remainder = sorted((layer for layer in shapes if counts[layer] < sizes[layer]),
                          key=lambda layer: exact[layer] - counts[layer], reverse=True)
    for layer in by_remainder[:max(0, missing)]:
        counts[layer] += 1
    return counts
