"""Instability analysis (Frankle, Dziugaite, Roy & Carbin 2020, "Linear Mode Connectivity and
the Lottery Ticket Hypothesis"): how far the error rises on the straight line between two
copies of a network trained from the same point with different data orders.

`interpolation_errors` evaluates the test error at `points` evenly spaced points
theta(alpha) = (1 - alpha) theta_a + alpha theta_b, alpha in [0, 1]; networks with batch
norm first re-estimate their running statistics at each point from training batches (the
averaged statistics of two networks are not the statistics of the averaged network; the
two ends keep their own, so the ends' errors are the networks' own).
`barrier` is the maximum error on the line minus the mean of the two ends' errors: about 0
when the copies are linearly connected (stable), large when SGD noise sent them to
different modes. Pure and traceable.
"""

import jax
import jax.numpy as jnp

from lottery.state import Network
from lottery.train import split_metrics

POINTS = 30  # evenly spaced interpolation points, as the paper


def _mix(alpha, a, b):
    return jax.tree.map(lambda x, y: (1 - alpha) * x + alpha * y, a, b)


def recompute_statistics(model, params, model_state, batches, key):
    """The running statistics after a training-mode pass over each of `batches` (shape
    (n, batch, ...)); with batch norm's momentum m, the start's weight left is m**n."""
    def one(state, x):
        return model.apply(params, state, x, train=True, key=key)[1], None

    return jax.lax.scan(one, model_state, batches)[0]


def test_error(model, params, model_state, split):
    """Error (1 - accuracy) on a split of padded batches `(x, y, weight)`."""
    return 1 - split_metrics(model, Network(params, model_state), split)[1]


def interpolation_errors(model, a, b, split, statistics_batches=None, points: int = POINTS,
                         key=None):
    """Test errors at `points` points from network `a` to network `b`, each `(params,
    model_state)`; `statistics_batches` (training inputs, (n, batch, ...)) re-estimate batch
    norm statistics at each point (ignored for models without state)."""
    key = jax.random.key(0) if key is None else key
    has_state = bool(jax.tree.leaves(a[1]))

    def at(alpha):
        params, model_state = _mix(alpha, a[0], b[0]), _mix(alpha, a[1], b[1])
        if has_state and statistics_batches is not None:  # the ends keep their own
            model_state = jax.lax.cond(
                (alpha > 0) & (alpha < 1),
                lambda s: recompute_statistics(model, params, s, statistics_batches, key),
                lambda s: s, model_state)
        return test_error(model, params, model_state, split)

    return jax.lax.map(at, jnp.linspace(0.0, 1.0, points))


def barrier(errors):
    """Maximum error along the path minus the mean of the end points' errors."""
    errors = jnp.asarray(errors)
    return errors.max(-1) - (errors[..., 0] + errors[..., -1]) / 2
