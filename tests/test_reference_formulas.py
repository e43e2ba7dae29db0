"""Each pruning score and allocation against its authors' reference rule, on fixed inputs.

Every expected value here comes from a path that does not go through the engine: a short
plain-JAX or numpy port of the rule in the authors' reference code (repository and file
cited above each check; the rule is ported, the code is not copied), computed on tiny
models and weights. Where the engine deliberately departs from the reference (a count
rounded differently, an off-by-one at a threshold, a schedule's end), the comment says so
and the test pins the difference down instead of hiding it.

Already covered elsewhere, and not repeated here: SynFlow's one pass on MLPs by hand in
float64 and its iterative rounds with inversion (test_rounds_and_ties.py); SNIP, GraSP and
SynFlow closed forms on a centred linear model (test_scores.py); ERK against RigL's
`get_sparsities` (test_erk.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from lottery.models import ModelSpec, build_model, spec_of
from lottery.models.layers import Conv, Linear
from lottery.pruning.masks import MASK_DTYPE, full_masks, kernels, with_kernels
from lottery.pruning.prune import Counts, PrunePlan, interpolate, keep_counts
from lottery.pruning.schedules import Gradual, gradual_pruning
from lottery.pruning.scores import SCORES
from lottery.pruning.select import Method
from lottery.pruning.units import Weights
from test_erk import rigl_reference

TIES = jax.random.key(0)  # no ties below (distinct scores); keep_counts takes a key anyway


def flat(tree: dict, layers) -> np.ndarray:
    return np.concatenate([np.asarray(tree[layer], np.float64).ravel() for layer in layers])


def cross_entropy(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def conv(h, k, padding):
    """A plain NHWC / HWIO convolution (XLA's own gradient, not the engine's im2col one)."""
    return jax.lax.conv_general_dilated(h, k, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def assert_same_selection(kept: np.ndarray, expected: np.ndarray, reference_scores: np.ndarray,
                          cut: float, band: float):
    """`kept` equals `expected`, except for entries whose reference score lies within `band`
    of the cut (float32 noise of two gradient paths at a near-tie): none, in practice."""
    differ = kept != expected
    assert kept.sum() == expected.sum()
    assert np.all(np.abs(reference_scores[differ] - cut) <= band), np.flatnonzero(differ)
    assert differ.sum() <= 2


# ================================================================================== SNIP
#
# Reference: namhoonlee/snip-public, snip/model.py (`get_sparse_mask`: the weights are
# multiplied by all-ones mask variables c, the score is |∂L/∂c| for the mean cross-entropy
# L on one batch, normalised by the sum of all scores; `create_sparse_mask` keeps the top
# kappa = round(N (1 - sparsity)) of all layers together), and ganguli-lab/Synaptic-Flow,
# Pruners/pruners.py `SNIP` (the same |∂L/∂m| taken at the current masks m, after
# `apply_mask` has zeroed the pruned weights).
#
# Not ported, on purpose: snip-public also gives the biases mask variables (`prn_keys`
# takes 'w' and 'b'); the engine prunes kernels only, as Synaptic-Flow does. Both
# references score in evaluation mode (snip-public feeds is_train=False, Synaptic-Flow's
# prune_loop calls model.eval()); the engine scores in training mode. LeNet-5 has neither
# batch norm nor dropout, so the two modes agree here.

SNIP_INPUT = (12, 12, 1)
SNIP_LAYERS = ("conv1", "conv2", "fc1", "fc2", "out")


def lenet5_logits(w: dict, b: dict, x):
    """LeNet-5 as lottery/models/lenet5.py describes it, in plain lax ops: conv 5x5 SAME,
    ReLU, 2x2 max pool, conv 5x5 VALID, ReLU, 2x2 max pool, fc, ReLU, fc, ReLU, out."""
    def pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")

    h = pool(jax.nn.relu(conv(x, w["conv1"], "SAME") + b["conv1"]))
    h = pool(jax.nn.relu(conv(h, w["conv2"], "VALID") + b["conv2"]))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ w["fc1"] + b["fc1"])
    h = jax.nn.relu(h @ w["fc2"] + b["fc2"])
    return h @ w["out"] + b["out"]


@jax.jit
def snip_reference(params, masks, x, y):
    """|∂L/∂c| at c = masks, the weights being params ⊙ masks (Synaptic-Flow's apply_mask;
    for a dense network c = 1, snip-public's mask_init)."""
    w = {layer: params[layer]["kernel"] * masks[layer] for layer in SNIP_LAYERS}
    b = {layer: params[layer]["bias"] for layer in SNIP_LAYERS}

    def loss(c):
        return cross_entropy(lenet5_logits({k: w[k] * c[k] for k in w}, b, x), y)

    return {layer: jnp.abs(g) for layer, g in jax.grad(loss)(masks).items()}


@pytest.fixture(scope="module")
def lenet5():
    model = build_model("lenet5", SNIP_INPUT, 10)
    assert model.prunable == SNIP_LAYERS
    params, state = jax.jit(model.init)(jax.random.key(0))  # one compilation, not one per op
    rng = np.random.default_rng(4)
    for layer in SNIP_LAYERS:  # non-zero biases: the reference must place them too
        params[layer]["bias"] = jnp.asarray(
            0.1 * rng.standard_normal(params[layer]["bias"].shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((16, *SNIP_INPUT)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    pruned = {layer: jnp.asarray(rng.random(params[layer]["kernel"].shape) >= 0.3, MASK_DTYPE)
              for layer in SNIP_LAYERS}
    snip = jax.jit(lambda p, m: SCORES["snip"](model, p, state, m, SNIP_LAYERS, (x, y),
                                               jax.random.key(5)))
    return model, params, (x, y), pruned, snip


@pytest.mark.parametrize("masked", [False, True])
def test_snip_is_the_gradient_wrt_connection_multipliers(lenet5, masked):
    model, params, (x, y), pruned, snip = lenet5
    masks = pruned if masked else {k: jnp.ones_like(v) for k, v in pruned.items()}
    scores = snip(params, with_kernels(full_masks(params), masks))
    expected = snip_reference(params, masks, x, y)
    for layer in SNIP_LAYERS:
        e = np.asarray(expected[layer])
        assert np.abs(e).max() > 0
        np.testing.assert_allclose(np.asarray(scores[layer]), e, rtol=1e-4,
                                   atol=1e-4 * np.abs(e).max())
        if masked:  # pruned weights are zero, so their |∂L/∂c| is exactly 0 in both
            assert np.all(np.asarray(scores[layer])[np.asarray(masks[layer]) == 0] == 0)


def test_snip_keeps_snip_publics_global_top_kappa(lenet5):
    model, params, (x, y), pruned, snip = lenet5
    ones = {k: jnp.ones_like(v) for k, v in pruned.items()}
    sparsity = 0.9
    # snip-public: normalise by the sum, keep the top kappa = round(N (1 - sparsity))
    cs = flat(snip_reference(params, ones, x, y), SNIP_LAYERS)
    cs = cs / cs.sum()
    kappa = int(round(cs.size * (1 - sparsity)))
    order = np.argsort(-cs)
    expected = np.zeros(cs.size, bool)
    expected[order[:kappa]] = True
    # the engine: a global plan at rate 0.9, one level, the pool's count, SNIP's scores
    plan = PrunePlan({}, SNIP_LAYERS, sparsity)
    shapes = {layer: ones[layer].shape for layer in SNIP_LAYERS}
    counts = plan.counts(shapes, 1)[1]
    assert int(counts.pool) == kappa
    scores = snip(params, full_masks(params))
    kept = keep_counts(plan, scores, ones, counts, TIES)
    cut = (cs[order[kappa - 1]] + cs[order[kappa]]) / 2
    assert_same_selection(flat(kept, SNIP_LAYERS) == 1, expected, cs, cut, 1e-5 * cs.max())


# ================================================================================= GraSP
#
# Reference: alecwangcq/GraSP, pruner/GraSP.py `GraSP`: g = the sum of the gradients of the
# two half-batches' mean cross-entropy of logits / T (T = 200) w.r.t. the conv / linear
# weights; Hg = the sum over the halves of ∇(g · ∇L_half), g held constant; the score is
# -θ ⊙ Hg, normalised by |Σ scores| + 1e-10; the top int(N · ratio) scores are *removed*:
# the num_params_to_rm-th highest score is the `acceptable_score`, and a weight is kept
# when its score is <= it. (Synaptic-Flow's Pruners/pruners.py `GraSP` keeps the highest
# θ ⊙ Hg, the same selection.)
#
# Off by one in the reference: the weight at `acceptable_score` is kept too, so it keeps
# N - int(N · ratio) + 1. The engine keeps the counts it is given; it is compared at the
# reference's own count. Not ported: the reference re-initialises the linear layers
# (xavier_normal, reinit=True) of its copy before scoring; the engine scores the weights it
# is given, as Synaptic-Flow does.

GRASP_T = 200.0  # GraSP(..., T=200) in the reference, and Synaptic-Flow's self.temp = 200
G_LAYERS = ("fc", "out")
G_IN, G_HIDDEN, G_OUT, G_BATCH = 4, 5, 3, 12


def _tanh_mlp_init(key):
    k = jax.random.split(key, 4)
    return {"fc": {"kernel": 2 * jax.random.normal(k[0], (G_IN, G_HIDDEN)),
                   "bias": 0.5 * jax.random.normal(k[1], (G_HIDDEN,))},
            "out": {"kernel": 2 * jax.random.normal(k[2], (G_HIDDEN, G_OUT)),
                    "bias": 0.5 * jax.random.normal(k[3], (G_OUT,))}}, {}


def _tanh_mlp_apply(params, state, x, train=False, key=None):
    h = jnp.tanh(x @ params["fc"]["kernel"] + params["fc"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"], state


# no batch statistics: the two halves' H_half g add up to a positive multiple (4x) of the
# whole batch's Hg, which the engine computes
TANH_MLP = ModelSpec("tiny_tanh_mlp", _tanh_mlp_init, _tanh_mlp_apply, G_LAYERS)


def grasp_reference(params, x, y, ratio, temperature=GRASP_T):
    """GraSP's kept weights (flat, over G_LAYERS) and its normalised scores -θ ⊙ Hg, with
    the Hessians formed explicitly (jax.hessian of each half's loss in the flat kernels),
    in float64."""
    with jax.enable_x64(True):
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        sizes = [p[layer]["kernel"].size for layer in G_LAYERS]
        theta = jnp.concatenate([p[layer]["kernel"].ravel() for layer in G_LAYERS])

        def half_loss(v, xs, ys):
            parts = jnp.split(v, np.cumsum(sizes)[:-1])
            q = {layer: dict(p[layer], kernel=part.reshape(p[layer]["kernel"].shape))
                 for layer, part in zip(G_LAYERS, parts)}
            return cross_entropy(_tanh_mlp_apply(q, {}, xs)[0] / temperature, ys)

        n = len(x)
        halves = [(jnp.asarray(x[: n // 2], jnp.float64), y[: n // 2]),
                  (jnp.asarray(x[n // 2:], jnp.float64), y[n // 2:])]
        grad, hessian = jax.jit(jax.grad(half_loss)), jax.jit(jax.hessian(half_loss))
        g = sum(grad(theta, *half) for half in halves)
        hg = sum(hessian(theta, *half) @ g for half in halves)
        scores = np.asarray(-theta * hg)
    scores = scores / (abs(scores.sum()) + 1e-10)
    num_params_to_rm = int(len(scores) * ratio)
    acceptable_score = np.sort(scores)[::-1][num_params_to_rm - 1]
    return scores <= acceptable_score, scores


def test_grasp_keeps_the_complement_of_what_the_reference_removes():
    params, state = jax.jit(TANH_MLP.init)(jax.random.key(11))
    x = jnp.asarray(np.random.default_rng(12).standard_normal((G_BATCH, G_IN)), jnp.float32)
    y = jnp.tile(jnp.arange(G_OUT), G_BATCH // G_OUT)  # balanced, as GraSP_fetch_data draws
    keep, reference = grasp_reference(params, np.asarray(x), np.asarray(y), ratio=0.5)
    n = reference.size
    assert keep.sum() == n - int(n * 0.5) + 1  # the reference's off-by-one, see above
    # a well-posed cut: the last kept and the first removed score are not within float32
    # noise of each other
    ordered = np.sort(reference)
    last_kept = keep.sum() - 1
    assert ordered[last_kept + 1] - ordered[last_kept] > 1e-4 * np.abs(reference).max()

    scores = jax.jit(lambda p: SCORES["grasp"](TANH_MLP, p, state, full_masks(p), G_LAYERS,
                                               (x, y), jax.random.key(13)))(params)
    # the values too: the engine's θ ⊙ Hg, normalised as the reference does, is minus the
    # reference's score (its two half-batches' H_half g sum to 4 Hg: the same after
    # normalising)
    ours = flat(scores, G_LAYERS)
    np.testing.assert_allclose(ours / abs(ours.sum()), -reference, rtol=2e-3,
                               atol=2e-4 * np.abs(reference).max())
    plan = PrunePlan({}, G_LAYERS, 0.5)
    base = kernels(full_masks(params), G_LAYERS)
    kept = flat(keep_counts(plan, scores, base, Counts({}, np.int32(keep.sum())), TIES),
                G_LAYERS) == 1
    np.testing.assert_array_equal(kept, keep)
    # the check has teeth: keeping the other end (the sign flipped) is far from it
    flipped = {layer: -s for layer, s in scores.items()}
    other = flat(keep_counts(plan, flipped, base, Counts({}, np.int32(keep.sum())), TIES),
                 G_LAYERS) == 1
    assert np.sum(other != keep) >= n // 2


# =============================================================== SynFlow with batch norm
#
# Reference: ganguli-lab/Synaptic-Flow, Pruners/pruners.py `SynFlow.score` (`linearize`
# takes the absolute value of every entry of model.state_dict(), batch-norm running means
# and variances included; R = sum of the outputs for an all-ones input of shape
# [1] + input_dim; score = |∂R/∂θ ⊙ θ|) and prune.py `prune_loop` (model.eval() before
# scoring: batch norm uses its running statistics). test_rounds_and_ties.py checks MLPs;
# here a conv net with batch norm, whose data-free pass must use eval mode and |state|.

BN_EPS = 1e-3
CB_INPUT = (5, 5, 2)
CB_LAYERS = ("conv1", "conv2", "out")


class ConvBN(nnx.Module):
    """conv 3x3 SAME (bias) -> BN -> ReLU -> conv 2x2 VALID (no bias) -> BN -> ReLU ->
    global average pool -> linear."""

    def __init__(self, rngs):
        self.conv1 = Conv(2, 3, (3, 3), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(3, epsilon=BN_EPS, rngs=rngs)
        self.conv2 = Conv(3, 4, (2, 2), padding="VALID", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, epsilon=BN_EPS, rngs=rngs)
        self.out = Linear(4, 3, rngs=rngs)

    def __call__(self, x, *, train=False, rngs=None):
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        x = nnx.relu(self.bn2(self.conv2(x), use_running_average=not train))
        return self.out(x.mean(axis=(1, 2)))


def conv_bn_model():
    def init(key):
        _, params, state = nnx.split(ConvBN(nnx.Rngs(key)), nnx.Param, ...)
        params, state = nnx.to_pure_dict(params), nnx.to_pure_dict(state)
        # every parameter and statistic random, of both signs (variances positive), so that
        # |params| and |state| both matter
        keys = iter(jax.random.split(jax.random.fold_in(key, 1), 16))
        params = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), params)
        for bn in ("bn1", "bn2"):
            shape = state[bn]["mean"].shape
            state[bn]["mean"] = jax.random.normal(next(keys), shape)
            state[bn]["var"] = jax.random.uniform(next(keys), shape, minval=0.2, maxval=2.0)
        return params, state

    return spec_of("conv_bn", nnx.eval_shape(lambda: ConvBN(nnx.Rngs(0))), init, CB_LAYERS)


def synflow_reference(params, state, masks):
    """|∂R/∂θ ⊙ θ| for θ = |kernels| ⊙ masks, R = 1ᵀ f(1) with |params|, |running
    statistics|, batch norm in eval mode ((x - mean) / sqrt(var + eps) · scale + bias), in
    plain lax ops (call under x64)."""
    a = jax.tree.map(lambda v: jnp.abs(jnp.asarray(v, jnp.float64)), params)
    s = jax.tree.map(lambda v: jnp.abs(jnp.asarray(v, jnp.float64)), state)
    theta = {layer: a[layer]["kernel"] * masks[layer] for layer in CB_LAYERS}

    def bn(h, name):
        return ((h - s[name]["mean"]) / jnp.sqrt(s[name]["var"] + BN_EPS) * a[name]["scale"]
                + a[name]["bias"])

    def r(k):
        h = jnp.ones((1, *CB_INPUT), jnp.float64)
        h = jax.nn.relu(bn(conv(h, k["conv1"], "SAME") + a["conv1"]["bias"], "bn1"))
        h = jax.nn.relu(bn(conv(h, k["conv2"], "VALID"), "bn2"))
        return jnp.sum(h.mean(axis=(1, 2)) @ k["out"] + a["out"]["bias"])

    grads = jax.jit(jax.grad(r))(theta)
    return {layer: np.asarray(jnp.abs(grads[layer] * theta[layer])) for layer in CB_LAYERS}


def conv_bn_setup(seed: int):
    """The ConvBN net at a seed, with random masks keeping about 70% of each kernel."""
    model = conv_bn_model()
    params, state = jax.jit(model.init)(jax.random.key(seed))
    rng = np.random.default_rng(seed + 1)
    masks = {layer: np.asarray(rng.random(params[layer]["kernel"].shape) >= 0.3, np.float32)
             for layer in CB_LAYERS}
    return model, params, state, masks, rng


def test_synflow_on_a_batch_norm_conv_net_uses_eval_mode_and_absolute_statistics():
    model, params, state, masks, rng = conv_bn_setup(21)
    batch = (jnp.asarray(rng.standard_normal((8, *CB_INPUT)), jnp.float32),
             jnp.zeros(8, jnp.int32))
    with Method("synflow").precision:  # the engine's float64, as the reference's double()
        scores = jax.jit(lambda p, s, m: SCORES["synflow"](model, p, s, m, CB_LAYERS, batch,
                                                           None))(
            params, state, with_kernels(full_masks(params), masks))
        expected = synflow_reference(params, state, masks)
    for layer in CB_LAYERS:
        got = np.asarray(scores[layer])
        assert got.dtype == np.float64
        assert np.abs(expected[layer]).max() > 0
        np.testing.assert_allclose(got, expected[layer], rtol=1e-10,
                                   atol=1e-12 * np.abs(expected[layer]).max())
        assert np.all(got[masks[layer] == 0] == 0)


def snip_eval_reference(params, state, masks, x, y):
    """|∂L/∂c| at c = 1 on the ConvBN net, batch norm in evaluation mode with its running
    statistics, as both SNIP references score (snip-public `snip/prune.py` feeds
    `is_train: False`; Synaptic-Flow's `prune.py` calls `model.eval()` before scoring)."""
    def bn(h, name):
        return ((h - state[name]["mean"]) / jnp.sqrt(state[name]["var"] + BN_EPS)
                * params[name]["scale"] + params[name]["bias"])

    def loss(c):
        k = {layer: params[layer]["kernel"] * masks[layer] * c[layer] for layer in CB_LAYERS}
        h = jax.nn.relu(bn(conv(x, k["conv1"], "SAME") + params["conv1"]["bias"], "bn1"))
        h = jax.nn.relu(bn(conv(h, k["conv2"], "VALID"), "bn2"))
        return cross_entropy(h.mean(axis=(1, 2)) @ k["out"] + params["out"]["bias"], y)

    grads = jax.jit(jax.grad(loss))({layer: jnp.ones_like(masks[layer]) for layer in CB_LAYERS})
    return {layer: np.abs(np.asarray(grads[layer])) for layer in CB_LAYERS}


def test_snip_on_a_batch_norm_conv_net_scores_in_evaluation_mode():
    model, params, state, masks, rng = conv_bn_setup(23)
    x = jnp.asarray(rng.standard_normal((8, *CB_INPUT)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
    scores = jax.jit(lambda p, s, m: SCORES["snip"](model, p, s, m, CB_LAYERS, (x, y),
                                                    jax.random.key(0)))(
        params, state, with_kernels(full_masks(params), masks))
    expected = snip_eval_reference(params, state, masks, x, y)
    for layer in CB_LAYERS:
        np.testing.assert_allclose(np.asarray(scores[layer]), expected[layer], rtol=1e-4,
                                   atol=1e-6 * expected[layer].max())
    # training mode (the batch's statistics) would score differently on this net
    train_mode = jax.jit(jax.grad(lambda c: cross_entropy(model.apply(with_kernels(
        params, {layer: params[layer]["kernel"] * masks[layer] * c[layer]
                 for layer in CB_LAYERS}), state, x, train=True)[0], y)))(
        {layer: jnp.ones_like(masks[layer]) for layer in CB_LAYERS})
    assert not np.allclose(np.abs(np.asarray(train_mode["conv1"])), expected["conv1"],
                           rtol=1e-2)


# ========================================================= Zhu & Gupta's gradual schedule
#
# Reference: tensorflow/model-optimization,
# tensorflow_model_optimization/python/core/sparsity/keras/pruning_schedule.py
# `PolynomialDecay` (power 3): p = clip((step - begin) / (end - begin), 0, 1), sparsity =
# final + (initial - final) (1 - p)^3, pruning only when begin <= step <= end and
# (step - begin) % frequency == 0 (`_should_prune_in_step`); and pruning_impl.py
# `_update_mask`: per weight tensor, keep k = max(round(size (1 - sparsity)), 1) of the
# largest |w| (pruned weights are zero, so they stay pruned).
#
# The engine's final counts are integers from its plan, so the schedule's final sparsity
# is 1 - final / size and its initial sparsity 0 (dense). Where the exact k sits within
# 1e-6 of a half, the two arithmetics (TF's float32, the engine's float32 of another
# formula) may round either way; both neighbours are accepted there and nowhere else.
#
# Difference, by design: TF's last event is the last begin + j·frequency <= end, at which
# the sparsity is below `final` unless frequency divides end - begin; the engine's config
# moves `end` onto that last event, so the level ends at exactly its counts (below).


def polynomial_decay(step, final, begin, end, initial=0.0, power=3):
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return final + (initial - final) * (1 - p) ** power


def should_prune(step, begin, end, frequency):
    return begin <= step <= end and (step - begin) % frequency == 0


def tf_kept(size: int, sparsity: float) -> tuple[int, ...]:
    """The kept counts `_update_mask` may give (two only within 1e-6 of a half)."""
    exact = size * (1 - sparsity)
    if abs(exact - math.floor(exact) - 0.5) < 1e-6:
        return max(math.floor(exact), 1), max(math.ceil(exact), 1)
    return (max(round(exact), 1),)


ZG_SHAPES = {"a": (10, 12), "b": (7, 9)}
ZG_PLAN = PrunePlan({"a": 0.5, "b": 0.3})


@pytest.mark.parametrize("begin, end, every", [(2, 20, 3), (0, 10, 1), (5, 6, 1)])
def test_gradual_prune_step_follows_polynomial_decay_at_every_event(begin, end, every):
    layers = tuple(ZG_SHAPES)
    counts = ZG_PLAN.counts(ZG_SHAPES, 3)
    final = {layer: int(counts[3].layers[layer]) for layer in layers}
    assert final == {"a": 15, "b": 22}  # 120 -> 60 -> 30 -> 15; 63 -> 44 -> 31 -> 22
    sizes = {layer: math.prod(shape) for layer, shape in ZG_SHAPES.items()}
    prune_step = jax.jit(gradual_pruning(Weights(layers), ZG_PLAN, counts[0], start=begin,
                                             end=end, every=every))
    controls = {"lr": np.float32(0), "counts": counts[3]}
    rng = np.random.default_rng(begin * 100 + end)
    masks = {layer: np.ones(shape, np.float32) for layer, shape in ZG_SHAPES.items()}
    events = 0
    for step in range(end + 3):
        # "training" between events: new weights of distinct magnitudes, pruned ones zero
        w = {layer: (rng.permutation(sizes[layer]).reshape(shape) + 1.0)
                    * rng.choice([-1.0, 1.0], shape)
             for layer, shape in ZG_SHAPES.items()}
        w = {layer: np.where(masks[layer] == 1, w[layer], 0.0).astype(np.float32)
             for layer in layers}
        params = {layer: {"kernel": jnp.asarray(w[layer])} for layer in layers}
        new = prune_step(params, {layer: {"kernel": jnp.asarray(masks[layer])}
                                  for layer in layers},
                         np.int32(step), controls, jax.random.key(step))
        new = {layer: np.asarray(new[layer]["kernel"]) for layer in layers}
        if not should_prune(step, begin, end, every):
            for layer in layers:
                np.testing.assert_array_equal(new[layer], masks[layer])
            continue
        events += 1
        for layer in layers:
            sparsity = polynomial_decay(step, 1 - final[layer] / sizes[layer], begin, end)
            allowed = tf_kept(sizes[layer], sparsity)
            k = int(new[layer].sum())
            assert k in allowed, (step, layer, k, allowed)
            # the k largest |w| of the tensor (pruned ones are 0), as `_update_mask` keeps
            order = np.argsort(-np.abs(w[layer]).ravel())
            expected = np.zeros(sizes[layer], np.float32)
            expected[order[:k]] = 1
            np.testing.assert_array_equal(new[layer].ravel(), expected)
            if step == end:
                assert k == final[layer]
        masks = new
    assert events == (end - begin) // every + 1


def test_cubic_interpolation_matches_polynomial_decay_on_a_grid():
    """`interpolate(..., "cubic")` at every event of many schedules and sizes, against the
    reference formula in float64 (no model: just the counts)."""
    checked = 0
    for size in (1, 7, 64, 999, 235200):
        for final in sorted({1, max(1, size // 10), max(1, size // 2), size}):
            for span in (1, 3, 7, 30):
                for j in range(span + 1):
                    remaining = np.float32(1 - j / span)  # the engine's remaining fraction
                    got = int(interpolate(Counts({"n": np.int32(size)}, np.int32(0)),
                                          Counts({"n": np.int32(final)}, np.int32(0)),
                                          remaining).layers["n"])
                    sparsity = polynomial_decay(j, 1 - final / size, 0, span)
                    assert got in tf_kept(size, sparsity), (size, final, span, j, got)
                    checked += 1
    assert checked > 400


def test_the_config_ends_the_schedule_on_its_last_event():
    """TF prunes at 0, 10, 20, 30 for begin 0, end 35, frequency 10, and its sparsity at 30
    is below the target; the engine prunes at the same steps and reaches the target at 30."""
    cfg = helpers.run_config("prune.schedule=gradual", "branches=[ticket]",
                             "prune.gradual.start=0", "prune.gradual.end=35",
                             "prune.gradual.every=10").in_steps(30)
    assert Gradual.from_config(cfg) == Gradual(start=0, end=30, every=10)
    tf_events = [s for s in range(40) if should_prune(s, 0, 35, 10)]
    engine_events = [s for s in range(40) if should_prune(s, 0, 30, 10)]
    assert tf_events == engine_events == [0, 10, 20, 30]
    assert polynomial_decay(30, 0.8, 0, 35) < 0.8  # TF's last event falls short
    assert polynomial_decay(30, 0.8, 0, 30) == 0.8  # the engine's reaches the target


# ======================================================================= global magnitude
#
# Reference: facebookresearch/open_lth, pruning/sparse_global.py `Strategy.prune`:
# number_of_weights_to_prune = ceil(fraction · remaining) (remaining = the survivors of the
# current mask over the prunable layers), threshold = sort(|w| of the survivors)
# [number_of_weights_to_prune], keep the survivors with |w| > threshold.
#
# Two differences in the count, pinned down below:
#   * the engine removes round(fraction · remaining) (half to even, float32: lottery's
#     `number_to_keep`, the same rule as its layerwise pruning), open_lth ceil(...);
#   * open_lth's threshold is the (n+1)-th smallest survivor and it keeps only |w| >
#     threshold, so it removes n + 1 weights, one more than it counted (its own test only
#     checks the fraction to within 1e-4). The engine removes exactly its count.
# With open_lth's threshold rule taken at the engine's count (threshold = the n-th
# smallest survivor), the selections are identical.

GM_SHAPES = {"a": (6, 5), "b": (5, 4), "c": (3, 3)}  # 59 weights


def open_lth_keep(weights: dict, mask: dict, fraction: float, n_prune=None) -> dict:
    """open_lth's global magnitude rule; `n_prune` replaces its count and removes its
    off-by-one (threshold = the n-th smallest survivor instead of the (n+1)-th)."""
    layers = list(weights)
    remaining = sum(int(mask[k].sum()) for k in layers)
    vector = np.concatenate([weights[k][mask[k] == 1] for k in layers])
    if n_prune is None:
        n = int(np.ceil(fraction * remaining))
        threshold = np.sort(np.abs(vector))[n]
    else:
        threshold = np.sort(np.abs(vector))[n_prune - 1]
    return {k: np.where(np.abs(weights[k]) > threshold, mask[k], 0.0) for k in layers}


def test_global_magnitude_keeps_what_open_lth_keeps():
    layers = tuple(GM_SHAPES)
    sizes = {k: math.prod(s) for k, s in GM_SHAPES.items()}
    fraction, levels = 0.2, 6
    plan = PrunePlan({}, layers, fraction)
    counts = plan.counts(GM_SHAPES, levels)
    keep = jax.jit(lambda scores, base, counts: keep_counts(plan, scores, base, counts, TIES))
    rng = np.random.default_rng(31)
    mask = {k: np.ones(s, np.float32) for k, s in GM_SHAPES.items()}
    differences = set()
    for level in range(1, levels + 1):
        # new "trained" weights each level: distinct magnitudes, both signs, and large
        # weights at pruned positions too (only survivors may be ranked)
        magnitudes = rng.permutation(sum(sizes.values())) + 1.0
        start, weights = 0, {}
        for k in layers:
            weights[k] = (magnitudes[start:start + sizes[k]].reshape(GM_SHAPES[k])
                          * rng.choice([-1.0, 1.0], GM_SHAPES[k]))
            start += sizes[k]
        remaining = sum(int(m.sum()) for m in mask.values())
        n_engine = remaining - int(counts[level].pool)
        kept = keep({k: jnp.abs(jnp.asarray(weights[k], jnp.float32)) for k in layers},
                    {k: jnp.asarray(m) for k, m in mask.items()}, counts[level])
        kept = {k: np.asarray(v) for k, v in kept.items()}
        # identical to open_lth's threshold rule at the engine's count
        expected = open_lth_keep(weights, mask, fraction, n_prune=n_engine)
        for k in layers:
            np.testing.assert_array_equal(kept[k], expected[k])
            assert np.all(kept[k][mask[k] == 0] == 0)
        # open_lth itself keeps a subset (both are top sets of the same survivors): it
        # removes ceil - round more, and one more at its threshold
        literal = open_lth_keep(weights, mask, fraction)
        extra = sum(int(kept[k].sum() - literal[k].sum()) for k in layers)
        assert all(np.all(literal[k] <= kept[k]) for k in layers)
        ceil_vs_round = int(np.ceil(fraction * remaining)) - n_engine
        assert extra == ceil_vs_round + 1
        differences.add(ceil_vs_round)
        mask = kept
    assert differences == {0, 1}  # levels where ceil and round agree, and where they differ


# ============================================================================ ERK plans
#
# Reference: google-research/rigl, rigl/sparse_utils.py `get_sparsities_erdos_renyi`
# (method erdos_renyi_kernel), ported in test_erk.py (`rigl_reference`). Here: a plan's ERK
# levels against it (each level's pool from the IMP rule, split by the RigL densities).


def test_erk_plan_levels_split_each_pool_by_rigl_densities():
    shapes = {"conv1": (3, 3, 3, 8), "conv2": (3, 3, 8, 16), "fc": (1024, 256),
              "out": (256, 10)}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(sizes.values())
    levels = 6
    plan = PrunePlan({}, tuple(shapes), 0.5, erk=True)
    counts = plan.counts(shapes, levels)
    pools = helpers.expected_counts(total, 0.5, levels)  # n - round(0.5 n) per level
    saw_dense = set()
    for level in range(1, levels + 1):
        got = {k: int(v) for k, v in counts[level].layers.items()}
        assert sum(got.values()) == pools[level]
        reference = rigl_reference(shapes, pools[level] / total, exact=True)
        for layer in shapes:
            assert abs(got[layer] - reference[layer] * sizes[layer]) < 1, (level, layer)
        saw_dense |= {layer for layer, d in reference.items() if d == 1.0}
    assert saw_dense == {"conv1", "out", "conv2"}  # saturation at the early levels
