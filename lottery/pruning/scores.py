"""Pruning scores: higher means more worth keeping. Pure, traceable functions.

Two kinds live here:

* the historical helpers `magnitude(params, layers)` and `uniform_random(key, params,
  layers)`, used directly by IMP and the random-pruning control;
* the uniform interface `SCORES[name](model, params, model_state, masks, layers, batch, key)
  -> {layer: scores shaped like the layer's kernel}` used by the pruning engine, for ONE
  network (the engine vmaps it over replicates and jits it). `model` is a `ModelSpec`,
  `params`/`model_state` its pure dicts, `masks` 0/1 arrays with the params' structure,
  `layers` the prunable layer paths to score, `batch = (x, y)` training examples (x float32
  with the model's input shape, y integer labels), `key` a PRNG key.

Every score is computed on the *masked* network: θ = params ⊙ masks. Pruned entries get
finite (usually zero) scores; the engine only ranks surviving entries, so their value is
irrelevant. Gradient-based scores (SNIP, GraSP) differentiate with respect to the
effective (masked) kernels θ only; biases and batch-norm parameters are held fixed, as the
reference implementations only take gradients with respect to conv / linear weights.

Magnitude pruning at initialisation is `SCORES["magnitude"]` applied to the initial weights.
"""

import jax
import jax.numpy as jnp
import optax

from lottery.pruning.masks import apply_masks, kernels, with_kernels

GRASP_TEMPERATURE = 200.0


def magnitude(params, layers):
    """|w| of each prunable kernel (Han et al. 2015; Frankle & Carbin 2019)."""
    return {layer: jnp.abs(w) for layer, w in kernels(params, layers).items()}


def uniform_random(key, params, layers):
    """Independent uniform scores: pruning by them removes a random subset."""
    keys = jax.random.split(key, len(layers))
    return {layer: jax.random.uniform(k, w.shape)
            for k, (layer, w) in zip(keys, kernels(params, layers).items())}


# --- the engine's interface --------------------------------------------------------------


def _mean_cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()


def _kernel_loss(model, theta, model_state, layers, batch, key, temperature=1.0, train=True):
    """The mean cross-entropy on `batch` (in training or evaluation mode) as a function of
    the prunable kernels of the masked params `theta` (everything else fixed), and those
    kernels."""
    x, y = batch

    def loss(ks):
        logits, _ = model.apply(with_kernels(theta, ks), model_state, x, train=train,
                                key=key if train else None)
        return _mean_cross_entropy(logits / temperature, y)

    return loss, kernels(theta, layers)


def magnitude_score(model, params, model_state, masks, layers, batch, key):
    """|θ| of each prunable kernel of the masked network (magnitude pruning; applied to the
    initial weights, magnitude pruning at initialisation). Ignores `batch` and `key`."""
    del model, model_state, batch, key
    return magnitude(apply_masks(params, masks), layers)


def random_score(model, params, model_state, masks, layers, batch, key):
    """Uniform random scores in [0, 1) from `key` (random pruning)."""
    del model, model_state, masks, batch
    return uniform_random(key, params, layers)


def snip(model, params, model_state, masks, layers, batch, key):
    """SNIP connection sensitivity (Lee et al. 2019): |g ⊙ θ| with g = ∂L/∂θ.

    L is the mean cross-entropy of the masked network on `batch` in evaluation mode (batch
    norm uses its running statistics, no dropout; `key` is unused), as both reference
    implementations score (snip-public's `prune.py` feeds `is_train: False`, Synaptic-Flow's
    `prune_loop` calls `model.eval()`). |g ⊙ θ| is the paper's
    |∂L/∂c| at c = 1 for the multiplicative connection variables c. The paper's
    normalisation by the sum of scores is a positive constant and does not change the
    ranking, so it is left out. Pruned entries score exactly 0.
    """
    theta = apply_masks(params, masks)
    loss, ks = _kernel_loss(model, theta, model_state, layers, batch, key, train=False)
    grads = jax.grad(loss)(ks)
    return {layer: jnp.abs(grads[layer] * ks[layer]) for layer in layers}


def grasp(model, params, model_state, masks, layers, batch, key, *,
          temperature=GRASP_TEMPERATURE):
    """GraSP (Wang et al. 2020), in the higher-is-keep convention: θ ⊙ Hg.

    GraSP's score is S(-θ) = -θ ⊙ Hg, where g = ∂L/∂θ and H = ∂²L/∂θ² for the prunable
    kernels θ of the masked network, and GraSP removes the weights with the HIGHEST S(-θ)
    (those whose removal least reduces the gradient flow); keeping the highest θ ⊙ Hg is the
    same selection. L is the mean training-mode cross-entropy with the logits divided by
    `temperature` (T = 200 in the reference implementation), for both g and Hg; batch norm
    uses the batch's statistics and `key` drives dropout, if any (the same draw for both):
    training mode, as GraSP's own code scores (its `.eval()` is commented out; Synaptic-Flow
    scores GraSP in evaluation mode).

    Hg is a Hessian-vector product with the Hessian of the kernels only (biases and
    batch-norm parameters are held fixed), computed as the reference code does: the
    gradient of `g · ∇L` with respect to the weights, g held constant (reverse over reverse:
    on the CPU path the models' layers take no forward-mode autodiff, see
    `lottery.models.layers`).

    The same `batch` is used for g and Hg. (The reference code accumulates g over two halves
    of its batch and then adds the two halves' H_half g: a positive multiple of Hg for the
    whole batch, up to batch-norm statistics being those of each half rather than of the
    whole batch.) The reference code's normalisation by |Σ scores| is a positive constant
    and does not change the ranking, so it is left out.
    """
    theta = apply_masks(params, masks)
    loss, ks = _kernel_loss(model, theta, model_state, layers, batch, key, temperature)
    grad_fn = jax.grad(loss)
    g = grad_fn(ks)
    hg = jax.grad(lambda k: optax.tree.vdot(grad_fn(k), jax.lax.stop_gradient(g)))(ks)
    return {layer: ks[layer] * hg[layer] for layer in layers}


def _abs_floats(tree, dtype):
    """|leaf| in `dtype` of every floating-point leaf of `tree` (other leaves unchanged)."""
    def absolute(a):
        floating = hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
        return jnp.abs(a).astype(dtype) if floating else a

    return jax.tree.map(absolute, tree)


def synflow(model, params, model_state, masks, layers, batch, key):
    """One SynFlow scoring pass (Tanaka et al. 2020): |∂R/∂θ ⊙ θ|, data-free.

    All params and the floating-point model state (batch-norm running statistics) are
    replaced by their absolute values, the masks are applied (θ = |params| ⊙ masks), and
    R = 1ᵀ f(1) is the sum of the evaluation-mode logits (running batch-norm statistics,
    no dropout, as the reference code runs the model in eval mode) for an all-ones input of
    shape (1, *input_shape), the input shape being `batch[0].shape[1:]`. Only the shape of
    `batch` is used, and `key` is ignored. Pruned entries score exactly 0.

    This is ONE scoring pass. SynFlow proper is iterative: the engine prunes for 100 rounds
    to exponentially decreasing densities (density^(k/100) after round k), re-scoring the
    masked network with this function before each round.

    Numerics: R is a product of |weights| through the depth of the network (ResNet-56 at
    init: far above float32's 3e38), so the network is computed in float64 where the
    caller enables it (`jax.enable_x64`, as the engine does for SynFlow, like the reference
    code's `model.double()`), else in float32. The engine refuses non-finite scores.
    """
    del key
    input_shape = batch[0].shape[1:]
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is on
    theta = apply_masks(_abs_floats(params, wide), masks)
    state = _abs_floats(model_state, wide)
    ones = jnp.ones((1, *input_shape), wide)

    def r(ks):
        logits, _ = model.apply(with_kernels(theta, ks), state, ones, train=False)
        return jnp.sum(logits)

    ks = kernels(theta, layers)
    grads = jax.grad(r)(ks)
    return {layer: jnp.abs(grads[layer] * ks[layer]) for layer in layers}


SCORES = {
    "magnitude": magnitude_score,
    "random": random_score,
    "snip": snip,
    "grasp": grasp,
    "synflow": synflow,
}
# The rounds a score prunes in when prune.score_rounds is null (1 for any score not named):
# SynFlow is iterative by design, 100 rounds in its paper (Tanaka et al. 2020).
DEFAULT_ROUNDS = {"synflow": 100}
