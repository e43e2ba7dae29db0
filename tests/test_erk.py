"""Erdős–Rényi-Kernel layerwise densities: the formula, the budget, saturation, rounding."""

import itertools
import math

import numpy as np
import pytest

from lottery.pruning.erk import erk_counts, erk_densities

# a small conv net: the first conv and the tiny output layer saturate first
SHAPES = {
    "conv1": (3, 3, 3, 16),
    "conv2": (3, 3, 16, 32),
    "fc1": (2048, 256),
    "fc2": (256, 64),
    "out": (64, 10),
}
SIZES = {layer: math.prod(shape) for layer, shape in SHAPES.items()}
TOTAL = sum(SIZES.values())


def raw(shape):
    return sum(shape) / math.prod(shape)


def kept(densities, shapes=SHAPES):
    return sum(densities[layer] * math.prod(shape) for layer, shape in shapes.items())


def rigl_reference(shapes, density, exact=False):
    """RigL's rule, ported from google-research/rigl rigl/sparse_utils.py
    `get_sparsities_erdos_renyi` (method erdos_renyi_kernel, no custom sparsities, scale 1):
    eps = rhs / divisor with rhs = Σ_sparse (n - zeros) - Σ_dense zeros and divisor =
    Σ_sparse raw · n, raw = Σ dims / Π dims; while max(raw) · eps > 1 the layer(s) with the
    largest raw probability are made dense and eps re-solved, one at a time. RigL counts
    zeros = floor(sparsity · n) per layer (`get_n_zeros`); `exact=True` uses the real
    sparsity · n, the paper's equation, with which the engine must agree to rounding."""
    dense = set()
    while True:
        divisor = rhs = 0.0
        raw_probabilities = {}
        for layer, shape in shapes.items():
            n_param = math.prod(shape)
            n_zeros = (1 - density) * n_param if exact else math.floor((1 - density) * n_param)
            if layer in dense:
                rhs -= n_zeros
            else:
                rhs += n_param - n_zeros
                raw_probabilities[layer] = sum(shape) / n_param
                divisor += raw_probabilities[layer] * n_param
        eps = rhs / divisor
        max_prob = max(raw_probabilities.values())
        if max_prob * eps > 1:
            dense |= {layer for layer, p in raw_probabilities.items() if p == max_prob}
        else:
            break
    return {layer: 1.0 if layer in dense else eps * raw_probabilities[layer]
            for layer in shapes}


def test_hand_example():
    """Dense kernels (4, 4) and (8, 8): raw (in+out)/(in*out) = 1/2 and 1/4."""
    shapes = {"a": (4, 4), "b": (8, 8)}
    # density 1/4 of 80 = 20 kept: eps = 20 / (16/2 + 64/4) = 5/6
    d = erk_densities(shapes, 0.25)
    assert d["a"] == pytest.approx(5 / 12) and d["b"] == pytest.approx(5 / 24)
    # density 0.9: eps = 72/24 = 3 would give a 3/2, so a is dense; b keeps 56 of 64
    d = erk_densities(shapes, 0.9)
    assert d["a"] == 1.0 and d["b"] == pytest.approx(56 / 64)


@pytest.mark.parametrize("density", [0.01, 0.05, 0.2, 0.5, 0.8])
def test_formula_budget_and_saturation(density):
    d = erk_densities(SHAPES, density)
    assert set(d) == set(SHAPES)
    assert all(0 < v <= 1 for v in d.values())
    assert kept(d) == pytest.approx(density * TOTAL, rel=1e-9)
    saturated = [layer for layer, v in d.items() if v == 1.0]
    sparse = [layer for layer in SHAPES if layer not in saturated]
    assert sparse
    eps = {d[layer] / raw(SHAPES[layer]) for layer in sparse}
    assert max(eps) == pytest.approx(min(eps), rel=1e-9)  # one ε for all non-saturated layers
    eps = eps.pop()
    # the saturated layers are exactly those whose ERK density would exceed 1 at that ε
    for layer in saturated:
        assert eps * raw(SHAPES[layer]) >= 1
    for layer in sparse:
        assert eps * raw(SHAPES[layer]) <= 1


def test_saturation_happens_and_is_exact():
    """Layers saturate in decreasing order of (sum of dims) / (product of dims):
    out, conv1, fc2, conv2, fc1."""
    d = erk_densities(SHAPES, 0.1)
    assert d["out"] == 1.0 and d["conv1"] == 1.0
    assert d["fc1"] < 0.1 < d["conv2"] < d["fc2"] < 1
    d = erk_densities(SHAPES, 0.3)
    assert d["out"] == d["conv1"] == d["fc2"] == 1.0
    assert d["fc1"] < 0.3 < d["conv2"] < 1


@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 0.5, 0.7, 0.95])
def test_matches_rigl_procedure(density):
    """The same allocation as RigL's one-layer-at-a-time loop (up to its per-layer floor
    rounding of the budget, a few weights out of ~570k)."""
    ours, theirs = erk_densities(SHAPES, density), rigl_reference(SHAPES, density)
    assert {k for k, v in ours.items() if v == 1.0} == {k for k, v in theirs.items() if v == 1.0}
    for layer in SHAPES:  # the same kept count, up to one weight per layer of the budget
        assert abs(ours[layer] - theirs[layer]) * SIZES[layer] <= len(SHAPES)


def test_monotone_in_density():
    grid = np.linspace(0.01, 1.0, 60)
    table = [erk_densities(SHAPES, float(x)) for x in grid]
    for layer in SHAPES:
        column = [row[layer] for row in table]
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(column))
    assert all(v == pytest.approx(1.0) for v in table[-1].values())


def test_full_density_is_dense():
    assert all(v == pytest.approx(1.0) for v in erk_densities(SHAPES, 1.0).values())
    assert erk_counts(SHAPES, 1.0) == SIZES


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_density(density):
    with pytest.raises(ValueError):
        erk_densities(SHAPES, density)
    with pytest.raises(ValueError):
        erk_counts(SHAPES, density)


def test_dense_layers():
    d = erk_densities(SHAPES, 0.2, dense_layers=("conv1", "fc2"))
    assert d["conv1"] == 1.0 and d["fc2"] == 1.0
    assert kept(d) == pytest.approx(0.2 * TOTAL, rel=1e-9)
    eps = {d[k] / raw(SHAPES[k]) for k in ("conv2", "fc1")}
    assert max(eps) == pytest.approx(min(eps), rel=1e-9)
    with pytest.raises(ValueError, match="alone"):
        erk_densities(SHAPES, 0.1, dense_layers=("fc1",))  # fc1 is 92% of the weights
    with pytest.raises(ValueError, match="not among"):
        erk_densities(SHAPES, 0.5, dense_layers=("nope",))


# conv and dense kernels where saturation cascades: a tiny first conv, a small output
# layer, a huge dense layer; at low densities RigL makes out, then conv1, then conv2 dense,
# one re-solve each (each raises eps and pushes the next layer over 1)
CASCADE = {
    "conv1": (3, 3, 3, 8),
    "conv2": (3, 3, 8, 16),
    "fc": (4096, 1000),
    "out": (1000, 10),
}


def test_the_cascade_really_needs_re_solving():
    """At 5.5% the first solve leaves conv2 below 1 (0.96), but once out and conv1 are dense
    the re-solved eps puts it above (1.10): an allocation that clipped the first eps, or
    re-solved only once, would get the budget wrong."""
    sizes = {k: math.prod(s) for k, s in CASCADE.items()}
    eps = 0.055 * sum(sizes.values()) / sum(raw(s) * sizes[k] for k, s in CASCADE.items())
    assert eps * raw(CASCADE["conv2"]) < 1 < eps * raw(CASCADE["conv1"])
    reference = rigl_reference(CASCADE, 0.055, exact=True)
    assert {k for k, v in reference.items() if v == 1.0} == {"out", "conv1", "conv2"}


@pytest.mark.parametrize("shapes", [SHAPES, CASCADE], ids=["convnet", "cascade"])
@pytest.mark.parametrize("density", [0.005, 0.02, 0.055, 0.1, 0.3, 0.5, 0.9])
def test_matches_rigl_exactly(shapes, density):
    """With RigL's per-layer floor taken out, the same densities to rounding error."""
    ours, theirs = erk_densities(shapes, density), rigl_reference(shapes, density, exact=True)
    assert {k for k, v in ours.items() if v == 1.0} == {k for k, v in theirs.items() if v == 1.0}
    for layer in shapes:
        assert ours[layer] == pytest.approx(theirs[layer], rel=1e-9)


@pytest.mark.parametrize("shapes", [SHAPES, CASCADE], ids=["convnet", "cascade"])
@pytest.mark.parametrize("density", [0.001, 0.03, 0.055, 0.2, 0.61])
def test_counts(shapes, density):
    """Each layer's count within one weight of RigL's density x size (dense layers whole),
    and the total exactly round(density x total)."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    reference = rigl_reference(shapes, density, exact=True)
    counts = erk_counts(shapes, density)
    assert set(counts) == set(shapes)
    assert all(isinstance(c, int) and 1 <= c <= sizes[k] for k, c in counts.items())
    assert sum(counts.values()) == round(density * sum(sizes.values()))
    for layer, c in counts.items():
        assert abs(c - reference[layer] * sizes[layer]) < 1
        if reference[layer] == 1.0:
            assert c == sizes[layer]


def test_counts_at_least_one():
    shapes = {"big": (1000, 1000), "small": (2, 2)}
    counts = erk_counts(shapes, 1e-6)
    assert counts["small"] >= 1 and counts["big"] >= 1
