"""The models' layers with CPU-friendly gradients (`lottery.models.layers`): the same values
and the same first and second derivatives as the plain JAX operations they replace. On the
CPU path (`lottery.platform`; on in the tests) they use the CPU kernels, which take no
forward-mode autodiff; off it they are the plain layers, forward mode included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lottery import platform
from lottery.models import layers


def _random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("x_shape", [(6, 5), (2, 6, 5)])
def test_matmul_values_and_gradients_equal_the_plain_product(x_shape):
    x, w, g = _random(x_shape, 0), _random((5, 3), 1), _random((*x_shape[:-1], 3), 2)
    np.testing.assert_allclose(layers.matmul(x, w), x @ w, rtol=1e-6)
    ours = jax.vjp(layers.matmul, x, w)[1](g)
    plain = jax.vjp(jnp.matmul, x, w)[1](g)
    for a, b in zip(ours, plain):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # stacked members (vmap) and jit, as the trainer runs it
    xs, ws = _random((4, *x_shape), 3), _random((4, 5, 3), 4)

    def loss(product):
        return jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.tanh(product(x, w))),
                                         argnums=(0, 1))))

    for a, b in zip(loss(layers.matmul)(xs, ws), loss(jnp.matmul)(xs, ws)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_second_derivatives_reverse_over_reverse():
    x, w, v = _random((6, 5), 0), _random((5, 3), 1), _random((5, 3), 2)

    def hvp(product):
        grad = jax.grad(lambda w: jnp.sum(jnp.tanh(product(x, w)) ** 2))
        return jax.grad(lambda w: jnp.vdot(grad(w), v))(w)

    np.testing.assert_allclose(hvp(layers.matmul), hvp(jnp.matmul), rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="forward-mode"):  # the documented cost
        jax.jvp(lambda w: layers.matmul(x, w), (w,), (v,))


def weights_jvp(model, x):
    """The outputs' derivative in the direction of all-ones weights (forward mode)."""
    graphdef, weights = nnx.split(model)
    ones = jax.tree.map(jnp.ones_like, weights)
    return jax.jvp(lambda w: nnx.merge(graphdef, w)(x), (weights,), (ones,))[1]


def check_forward_mode(ours, plain, x, cpu_path):
    """On the CPU path jvp fails (the kernel is in use); off it, it equals the plain layer's."""
    if cpu_path:
        with pytest.raises(TypeError, match="forward-mode"):
            weights_jvp(ours, x)
    else:
        np.testing.assert_allclose(weights_jvp(ours, x), weights_jvp(plain, x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu_path", [True, False], ids=["cpu path", "plain"])
def test_linear_matches_nnx_linear(cpu_path):
    ours = layers.Linear(5, 3, rngs=nnx.Rngs(0))
    plain = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    x = _random((7, 5), 1)

    def grads(model):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

    with platform.cpu_path(cpu_path):
        np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(plain))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        check_forward_mode(ours, plain, x, cpu_path)


def test_dot_general_passes_other_products_to_lax():
    """On the CPU path too, anything but the plain product is `lax.dot_general` (forward
    mode included)."""
    a, b = _random((2, 4, 5), 2), _random((2, 5, 3), 3)
    numbers = (((2,), (1,)), ((0,), (0,)))
    batched, tangent = jax.jvp(lambda a: layers.dot_general(a, b, numbers), (a,), (a,))
    np.testing.assert_allclose(batched, jnp.einsum("bij,bjk->bik", a, b), rtol=1e-5)
    np.testing.assert_allclose(tangent, batched, rtol=1e-5)  # linear in a


@pytest.mark.parametrize("cpu_path", [True, False], ids=["cpu path", "plain"])
def test_conv_gradient_equals_the_plain_convolution(cpu_path):
    ours = layers.Conv(3, 4, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    plain = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    x = _random((2, 8, 8, 3), 1)

    def grads(model):
        return nnx.grad(lambda m: jnp.sum(jnp.tanh(m(x))))(model)

    with platform.cpu_path(cpu_path):
        np.testing.assert_allclose(ours(x), plain(x), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(plain))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        check_forward_mode(ours, plain, x, cpu_path)
