"""`train.precision=bf16`: bfloat16 matmuls and activations, float32 weights, optimizer
state and masks, and pruned weights exactly zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import driven_run, run_config

from lottery.config import ConfigError
from lottery.precision import to_precision

SMALL = ("dataset.shape=[8,8,1]", "branches=[ticket,random_prune]", "prune.levels=2")


def test_bf16_casts_float32_leaves_only_and_fp32_casts_nothing():
    tree = {"w": jnp.ones((2, 2), jnp.float32), "steps": jnp.arange(3), "flag": jnp.array(True)}
    cast = to_precision("bf16")(tree)
    assert cast["w"].dtype == jnp.bfloat16
    assert cast["steps"].dtype == tree["steps"].dtype and cast["flag"].dtype == jnp.bool_
    assert to_precision("fp32")(tree) is tree
    with pytest.raises(ConfigError, match="train.precision='fp16' is unknown; choose one of bf16, fp32"):
        run_config("train.precision=fp16")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {precision: driven_run(run_config(*SMALL, f"train.precision={precision}"),
                                  tmp_path_factory.mktemp(precision))
            for precision in ("fp32", "bf16")}


def test_a_bf16_run_keeps_float32_weights_and_pruned_weights_exactly_zero(runs):
    run = runs["bf16"]
    for level, (begun, ticket) in enumerate(zip(run.begun, run.tickets)):
        masks = begun.ticket_masks
        for layer, kernel in ticket.params.items():
            weights, mask = np.asarray(kernel["kernel"]), np.asarray(masks[layer]["kernel"])
            assert weights.dtype == np.float32, (level, layer)
            assert mask.dtype == np.float32
            pruned = mask == 0
            assert pruned.any() == (level > 0), (level, layer)
            assert np.all(weights[pruned] == 0.0), (level, layer)  # exactly, not nearly
        opt_leaves = jax.tree.leaves(begun.state.opt_state)
        assert all(leaf.dtype != jnp.bfloat16 for leaf in opt_leaves)


def test_bf16_computes_in_bfloat16_and_learns_as_fp32_does(runs):
    """The two runs start from the same weights and draw the same batches: bf16's rounding
    makes the trained weights differ (so the forward pass did compute in bfloat16), while
    what they learn agrees (the task is learnable: well above chance, 10%)."""
    fp32, bf16 = (runs[p].tickets[0].params for p in ("fp32", "bf16"))
    differences = [np.max(np.abs(np.asarray(fp32[layer]["kernel"]) -
                                 np.asarray(bf16[layer]["kernel"]))) for layer in fp32]
    assert max(differences) > 1e-4
    accuracy = {p: runs[p].summaries.query("level == 0 and branch == 'ticket'")
                ["final_test_accuracy"].to_numpy() for p in runs}
    assert np.all(accuracy["fp32"] > 0.5)
    np.testing.assert_allclose(accuracy["bf16"], accuracy["fp32"], atol=0.1)
