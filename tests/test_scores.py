"""Pruning scores of the engine's interface (`SCORES`) against hand-computed values.

Most checks use a tiny hand-written model whose scores have closed forms: a two-layer
linear network with a batch-norm-like centring of the hidden layer,

    z = x W1 + b1,   h = z - mu,   logits = h W2 + b2,

where mu is the batch mean of z in training mode and the state's running mean in
evaluation mode. In training mode b1 cancels and h = (x - mean(x)) W1.
"""

from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery.models import ModelSpec, build_model
from lottery.pruning.masks import (
    MASK_DTYPE,
    apply_masks,
    full_masks,
    kernels,
    with_kernels,
)
from lottery.pruning.scores import GRASP_TEMPERATURE, SCORES, magnitude, uniform_random

LAYERS = ("fc1", "out")
N_IN, N_HIDDEN, N_OUT, N_BATCH = 3, 4, 2, 5


def _init(key):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    params = {
        "fc1": {"kernel": jax.random.normal(k1, (N_IN, N_HIDDEN)),
                "bias": jax.random.normal(k2, (N_HIDDEN,))},
        "out": {"kernel": jax.random.normal(k3, (N_HIDDEN, N_OUT)),
                "bias": jax.random.normal(k4, (N_OUT,))},
    }
    # a running mean with both signs, so that SynFlow's |state| matters
    state = {"fc1": {"mean": jax.random.normal(k5, (N_HIDDEN,))}}
    return params, state


def _apply(params, state, x, train=False, key=None):
    z = x.reshape(x.shape[0], -1) @ params["fc1"]["kernel"] + params["fc1"]["bias"]
    mu = jnp.mean(z, axis=0) if train else state["fc1"]["mean"]
    logits = (z - mu) @ params["out"]["kernel"] + params["out"]["bias"]
    return logits, ({"fc1": {"mean": mu}} if train else state)


TINY = ModelSpec("tiny_centred_linear", _init, _apply, LAYERS)


@pytest.fixture(scope="module")
def setup():
    params, state = TINY.init(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (N_BATCH, N_IN))
    y = jax.random.randint(ky, (N_BATCH,), 0, N_OUT)
    masks = full_masks(params)
    masks["fc1"]["kernel"] = jnp.asarray([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], MASK_DTYPE)
    masks["out"]["kernel"] = jnp.asarray([[1, 1], [0, 1], [1, 1], [1, 0]], MASK_DTYPE)
    return params, state, masks, (x, y)


def np_(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@cache
def jitted(name, **kwargs):
    return jax.jit(partial(SCORES[name], TINY, layers=LAYERS, **kwargs))


def score(name, params, state, masks, batch, key=None, **kwargs):
    """SCORES[name] on the tiny model, jitted (one compilation per score and options)."""
    key = jax.random.key(7) if key is None else key
    return jitted(name, **kwargs)(params, state, masks, batch=batch, key=key)


def assert_close(actual, expected, rtol=1e-4):
    """Agreement relative to the largest entry (scores of different layers differ in scale)."""
    for layer in LAYERS:
        a, e = np.asarray(actual[layer]), np.asarray(expected[layer])
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_registry():
    assert set(SCORES) == {"magnitude", "random", "snip", "grasp", "synflow"}


def test_magnitude(setup):
    params, state, masks, batch = setup
    p, m = np_(params), np_(masks)
    assert_close(score("magnitude", params, state, masks, batch),
                 {layer: np.abs(p[layer]["kernel"] * m[layer]["kernel"]) for layer in LAYERS})
    # the historical helper is unchanged
    assert_close(magnitude(params, LAYERS),
                 {layer: np.abs(p[layer]["kernel"]) for layer in LAYERS})


def test_random(setup):
    """Draws in [0, 1) that depend on the key alone: not on the weights, the masks or the
    batch (Synaptic-Flow's `Rand` scores i.i.d. noise too: any i.i.d. continuous draw
    prunes a uniformly random subset), a different stream for each layer."""
    params, state, masks, batch = setup
    key = jax.random.key(3)
    scores = score("random", params, state, masks, batch, key)
    x, y = batch
    again = score("random", jax.tree.map(lambda a: 3 * a + 1, params), state,
                  full_masks(params), (x + 1, (y + 1) % N_OUT), key)
    for layer in LAYERS:
        s = np.asarray(scores[layer])
        assert s.shape == params[layer]["kernel"].shape
        assert np.all((s >= 0) & (s < 1))
        np.testing.assert_array_equal(s, again[layer])
    assert not np.allclose(np.asarray(scores["fc1"]).ravel()[:8],
                           np.asarray(scores["out"]).ravel()[:8])
    other = score("random", params, state, masks, batch, jax.random.key(4))
    assert not np.allclose(other["fc1"], scores["fc1"])
    # the historical helper the random-pruning control uses: uniform, key-dependent too
    helper = uniform_random(key, params, LAYERS)
    assert all(np.all((np.asarray(h) >= 0) & (np.asarray(h) < 1)) for h in helper.values())


def test_snip_closed_form(setup):
    """|g ⊙ θ| with the gradient of the mean cross-entropy written out by hand, evaluation
    mode as SNIP's references score (the running mean centres h, b1 stays)."""
    params, state, masks, (x, y) = setup
    p, m, s = np_(params), np_(masks), np_(state)
    w1 = p["fc1"]["kernel"] * m["fc1"]["kernel"]
    w2 = p["out"]["kernel"] * m["out"]["kernel"]
    xs = np.asarray(x, np.float64)
    h = xs @ w1 + p["fc1"]["bias"] - s["fc1"]["mean"]
    logits = h @ w2 + p["out"]["bias"]
    d = (softmax(logits) - np.eye(N_OUT)[np.asarray(y)]) / N_BATCH  # dL/dlogits
    g2 = h.T @ d
    g1 = xs.T @ (d @ w2.T)
    expected = {"fc1": np.abs(g1 * w1), "out": np.abs(g2 * w2)}
    scores = score("snip", params, state, masks, (x, y))
    assert_close(scores, expected)
    for layer in LAYERS:  # pruned entries score exactly 0
        assert np.all(np.asarray(scores[layer])[m[layer]["kernel"] == 0] == 0)


def test_snip_finite_differences(setup):
    """The gradient in SNIP against central differences of the loss (float64 numpy)."""
    params, state, masks, (x, y) = setup
    p, m, s = np_(params), np_(masks), np_(state)
    xs = np.asarray(x, np.float64)
    labels = np.asarray(y)

    def loss(w1, w2):  # evaluation mode: centred by the running mean
        h = xs @ w1 + p["fc1"]["bias"] - s["fc1"]["mean"]
        logp = np.log(softmax(h @ w2 + p["out"]["bias"]))
        return -logp[np.arange(N_BATCH), labels].mean()

    w = {layer: p[layer]["kernel"] * m[layer]["kernel"] for layer in LAYERS}
    expected = {}
    for layer in LAYERS:
        grad = np.zeros_like(w[layer])
        for index in np.ndindex(grad.shape):
            plus = {k: v.copy() for k, v in w.items()}
            minus = {k: v.copy() for k, v in w.items()}
            plus[layer][index] += 1e-6
            minus[layer][index] -= 1e-6
            grad[index] = (loss(plus["fc1"], plus["out"]) - loss(minus["fc1"], minus["out"])) / 2e-6
        expected[layer] = np.abs(grad * w[layer])
    assert_close(score("snip", params, state, masks, (x, y)), expected, rtol=1e-3)


@pytest.mark.parametrize("temperature", [200.0, 1.0])
def test_grasp_against_explicit_hessian(setup, temperature):
    """θ ⊙ Hg against the full Hessian of the loss (logits / T) in the flattened masked
    kernels from `jax.hessian`: an independent route to the Hessian-gradient product."""
    params, state, masks, (x, y) = setup
    theta = apply_masks(params, masks)
    ks = kernels(theta, LAYERS)
    sizes = [ks[layer].size for layer in LAYERS]
    flat = jnp.concatenate([ks[layer].ravel() for layer in LAYERS])

    def unflatten(v):
        parts = jnp.split(v, np.cumsum(sizes)[:-1])
        return {layer: part.reshape(ks[layer].shape) for layer, part in zip(LAYERS, parts)}

    def loss(v):
        logits, _ = TINY.apply(with_kernels(theta, unflatten(v)), state, x, train=True)
        logp = jax.nn.log_softmax(logits / temperature)
        return -jnp.mean(logp[jnp.arange(N_BATCH), y])

    g = np.asarray(jax.jit(jax.grad(loss))(flat), np.float64)
    hessian = np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)
    assert np.allclose(hessian, hessian.T, rtol=1e-4, atol=1e-6 * np.abs(hessian).max())
    expected = {layer: np.asarray(v, np.float64)
                for layer, v in unflatten(np.asarray(flat, np.float64) * (hessian @ g)).items()}
    kwargs = {} if temperature == 200.0 else {"temperature": temperature}  # 200 is the default
    scores = score("grasp", params, state, masks, (x, y), **kwargs)
    assert_close(scores, expected, rtol=2e-3)
    # the sign convention: higher θ ⊙ Hg = keep; GraSP's S(-θ) = -θ ⊙ Hg is removed highest
    assert any(np.any(np.asarray(scores[layer]) < 0) for layer in LAYERS)
    for layer in LAYERS:
        assert np.all(np.asarray(scores[layer])[np.asarray(masks[layer]["kernel"]) == 0] == 0)


def test_grasp_temperature_matters(setup):
    assert GRASP_TEMPERATURE == 200.0
    params, state, masks, batch = setup
    hot = score("grasp", params, state, masks, batch)
    cold = score("grasp", params, state, masks, batch, temperature=1.0)
    assert not np.allclose(np.asarray(hot["fc1"]) / np.abs(hot["fc1"]).max(),
                           np.asarray(cold["fc1"]) / np.abs(cold["fc1"]).max(), atol=1e-3)


def test_synflow_closed_form(setup):
    """R = 1ᵀ f(1) for |params| ⊙ masks and |state| in evaluation mode:
    R = Σ_j (Σ_i |W1_ij| + |b1_j| - |mu_j|) Σ_k |W2_jk| + Σ_k |b2_k|, so
    ∂R/∂W1_ij = Σ_k |W2_jk| and ∂R/∂W2_jk = Σ_i |W1_ij| + |b1_j| - |mu_j|."""
    params, state, masks, batch = setup
    p, m, s = np_(params), np_(masks), np_(state)
    a1 = np.abs(p["fc1"]["kernel"]) * m["fc1"]["kernel"]
    a2 = np.abs(p["out"]["kernel"]) * m["out"]["kernel"]
    hidden = a1.sum(axis=0) + np.abs(p["fc1"]["bias"]) - np.abs(s["fc1"]["mean"])
    expected = {"fc1": np.abs(a1 * a2.sum(axis=1)[None, :]),
                "out": np.abs(a2 * hidden[:, None])}
    scores = score("synflow", params, state, masks, batch)
    assert_close(scores, expected)
    # data-free: only the input shape of the batch is used
    x, y = batch
    again = score("synflow", params, state, masks, (x * 3 + 1, (y + 1) % N_OUT),
                  jax.random.key(99))
    for layer in LAYERS:
        np.testing.assert_array_equal(scores[layer], again[layer])


def test_synflow_pure_linear_formula():
    """The brief's example f(x) = x W1 W2 (no biases, zero state): score_W1[i, j] =
    |W1[i, j]| Σ_k |W2[j, k]|."""
    w1 = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]], np.float32)
    w2 = np.array([[2.0, -1.0, 0.5], [-0.25, 1.0, 4.0]], np.float32)
    params = {"fc1": {"kernel": jnp.asarray(w1), "bias": jnp.zeros(2)},
              "out": {"kernel": jnp.asarray(w2), "bias": jnp.zeros(3)}}
    state = {"fc1": {"mean": jnp.zeros(2)}}
    batch = (jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32))
    scores = score("synflow", params, state, full_masks(params), batch)
    np.testing.assert_allclose(scores["fc1"], np.abs(w1) * np.abs(w2).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(scores["out"], np.abs(w2) * np.abs(w1).sum(axis=0)[:, None],
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["magnitude", "snip", "grasp", "synflow"])
def test_masked_entries_behave_as_zero_weights(setup, name):
    """Scoring (params, masks) is scoring params ⊙ masks with nothing pruned."""
    params, state, masks, batch = setup
    masked = score(name, params, state, masks, batch)
    zeroed = score(name, apply_masks(params, masks), state, full_masks(params), batch)
    dense = score(name, params, state, full_masks(params), batch)
    for layer in LAYERS:
        np.testing.assert_allclose(masked[layer], zeroed[layer], rtol=1e-5, atol=1e-12)
        assert not np.allclose(masked[layer], dense[layer])


@pytest.mark.parametrize("name", sorted(SCORES))
def test_jit_and_vmap_over_replicates(setup, name):
    """The engine's use: jit of vmap over 2 replicates (params, state, masks, key batched;
    the batch shared), equal to scoring each replicate on its own."""
    _, _, masks, batch = setup
    inits = [TINY.init(jax.random.key(seed)) for seed in (10, 11)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[i[0] for i in inits])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[i[1] for i in inits])
    both_masks = jax.tree.map(lambda a: jnp.stack([a, jnp.ones_like(a)]), masks)
    keys = jax.random.split(jax.random.key(5), 2)
    def one_network(p, s, m, k):
        return SCORES[name](TINY, p, s, m, LAYERS, batch, k)

    batched = jax.jit(jax.vmap(one_network))(params, state, both_masks, keys)
    for r in range(2):
        one = jax.tree.map(lambda a, r=r: a[r], (params, state, both_masks))
        single = SCORES[name](TINY, *one, LAYERS, batch, keys[r])
        for layer in LAYERS:
            np.testing.assert_allclose(batched[layer][r], single[layer], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_registry_model(name):
    """LeNet-300-100 with a third of each kernel pruned: kernel shapes, all finite."""
    model = build_model("lenet_300_100", (28, 28, 1), 10)
    params, state = model.init(jax.random.key(0))
    masks = full_masks(params)
    rng = np.random.default_rng(0)
    new = {layer: jnp.asarray(rng.random(k.shape) >= 1 / 3, MASK_DTYPE)
           for layer, k in kernels(masks, model.prunable).items()}
    masks = with_kernels(masks, new)
    kx, ky = jax.random.split(jax.random.key(1))
    batch = (jax.random.normal(kx, (8, 28, 28, 1)), jax.random.randint(ky, (8,), 0, 10))
    fn = jax.jit(partial(SCORES[name], model, layers=model.prunable))
    scores = fn(params, state, masks, batch=batch, key=jax.random.key(2))
    assert set(scores) == set(model.prunable)
    for layer, k in kernels(params, model.prunable).items():
        s = np.asarray(scores[layer])
        assert s.shape == k.shape
        assert np.all(np.isfinite(s))
        if name != "random":
            assert np.all(s[np.asarray(new[layer]) == 0] == 0)
            assert np.any(s != 0)

