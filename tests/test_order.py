"""The training order: `index_shuffle` is a permutation of every size, different for every
key and statistically uniform; `batch_indices` draws each example at most once per epoch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery.data.order import batch_indices, index_shuffle


@pytest.mark.parametrize("n", [1, 2, 3, 10, 600, 1023, 4096, 4097, 55000])
def test_index_shuffle_is_a_permutation_of_range_n(n):
    order = np.asarray(index_shuffle(jax.random.key(n), jnp.arange(n), n))
    assert order.dtype == np.int32
    assert np.array_equal(np.sort(order), np.arange(n))
    if n >= 600:
        assert np.mean(order == np.arange(n)) < 0.01  # really shuffled


def test_index_shuffle_depends_on_the_key_only():
    n, positions = 55000, jnp.arange(0, 55000, 7)
    a, b = (np.asarray(index_shuffle(jax.random.key(s), positions, n)) for s in (0, 1))
    assert np.array_equal(a, np.asarray(index_shuffle(jax.random.key(0), positions, n)))
    assert np.mean(a == b) < 0.01
    # a position's index is the same whichever other positions are asked for with it
    assert np.array_equal(a[:10], np.asarray(index_shuffle(jax.random.key(0), positions[:10], n)))


def _chi_square(counts):
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("n", [5, 8, 10])
def test_index_shuffle_is_uniform_over_keys(n):
    draws = 6000
    orders = np.asarray(jax.vmap(lambda k: index_shuffle(k, jnp.arange(n), n))(
        jax.random.split(jax.random.key(0), draws)))
    where = np.zeros((n, n))  # position x index
    np.add.at(where, (np.tile(np.arange(n), draws), orders.ravel()), 1)
    pairs = np.zeros((n, n))  # the indices at positions 0 and 1
    np.add.at(pairs, (orders[:, 0], orders[:, 1]), 1)
    assert np.all(np.diag(pairs) == 0)
    pairs = pairs[~np.eye(n, dtype=bool)]
    # chi-square statistics against their degrees of freedom ((n-1)^2 and n(n-1)-1):
    # a bias of a few percent in any cell would push them several times higher
    assert _chi_square(where) < 2 * (n - 1) ** 2
    assert _chi_square(pairs) < 2 * (n * (n - 1) - 1)


def test_batch_indices_draw_each_example_once_per_epoch_then_reshuffle():
    n, batch = 610, 60  # 10 steps per epoch, 10 examples left out of each
    key = jax.random.key(3)
    steps = jnp.arange(7, 27)  # from the middle of epoch 0 to the end of epoch 2
    batches = np.asarray(batch_indices(key, steps, n, batch))
    assert batches.shape == (20, batch)
    epoch1 = batches[3:13].ravel()
    assert len(set(epoch1)) == 10 * batch and epoch1.max() < n
    assert not np.array_equal(epoch1, batches[13:].ravel())  # epoch 2 has its own order
    # a chunk computes the same batches as any other chunk covering those steps
    assert np.array_equal(batches[5:8], np.asarray(batch_indices(key, jnp.arange(12, 15), n,
                                                                 batch)))
    assert not np.array_equal(batches, np.asarray(batch_indices(jax.random.key(4), steps, n,
                                                                batch)))
