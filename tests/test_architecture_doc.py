"""docs/architecture.md's "Adding things" examples run, and do what they say.

Each Python block of the page is executed in one namespace holding the engine's names and
copies of its registries (the real registries stay as they are); each new entry is then
checked against a hand computation on a tiny case."""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lottery.branches as branches
from lottery.branches import Branch, LevelStart, _with_masks
from lottery.data import DATASETS, Dataset
from lottery.models import MODELS, build_model
from lottery.pruning.masks import apply_masks, full_masks, kernels, with_kernels
from lottery.pruning.schedules import SCHEDULES, Schedule
from lottery.pruning.scores import SCORES, _mean_cross_entropy
from lottery.pruning.units import Weights
from lottery.state import LevelEntry, Network

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def run_examples() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 5
    namespace = dict(
        math=math, jax=jax, jnp=jnp, np=np, nnx=nnx, dataclass=dataclass, Branch=Branch,
        Network=Network, Schedule=Schedule, Dataset=Dataset, _with_masks=_with_masks,
        apply_masks=apply_masks, kernels=kernels, with_kernels=with_kernels,
        _mean_cross_entropy=_mean_cross_entropy, SCORES=dict(SCORES),
        SCHEDULES=dict(SCHEDULES), BRANCHES=dict(branches.BRANCHES), MODELS=dict(MODELS),
        DATASETS=dict(DATASETS))
    for block in blocks:
        exec(block, namespace)
    return namespace


def test_the_examples_register_working_pieces(monkeypatch):
    added = run_examples()
    assert "tiny_mlp" not in MODELS and "blobs" not in DATASETS  # the real ones untouched

    data = added["DATASETS"]["blobs"](train_size=50, test_size=10)
    assert data.x_train.shape == (50, 2) and data.x_test.shape == (10, 2)
    np.testing.assert_array_equal(data.y_train, data.x_train[:, 0] * data.x_train[:, 1] > 0)

    monkeypatch.setitem(MODELS, "tiny_mlp", added["MODELS"]["tiny_mlp"])
    model = build_model("tiny_mlp", (2,), 2, hidden=4)
    params, state = model.init(jax.random.key(0))
    assert model.prunable == ("fc1", "out") and params["fc1"]["kernel"].shape == (2, 4)

    # the score: |dL/dw| by hand for the linear output layer: h^T (softmax - onehot) / n
    masks = full_masks(params)
    x, y = data.x_train[:8], data.y_train[:8]
    scores = added["SCORES"]["gradient_magnitude"](model, params, state, masks,
                                                   ("fc1", "out"), (x, y), None)
    h = np.maximum(x @ np.asarray(params["fc1"]["kernel"]) + np.asarray(params["fc1"]["bias"]), 0)
    logits = h @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = np.abs(h.T @ (p - np.eye(2)[y]) / len(x))
    np.testing.assert_allclose(scores["out"], expected, rtol=1e-4, atol=1e-6)

    # the schedule scores the rewind point among the last ticket's survivors
    entry = LevelEntry("rewind", "ticket masks", "trained", "dense")
    schedule = added["SCHEDULES"]["from_init"]()
    assert schedule.source(entry) == "rewind"
    assert schedule.base_masks(0, entry, "full") == "full"
    assert schedule.base_masks(2, entry, "full") == "ticket masks"

    # the branch starts from the negated rewind weights under the ticket's masks
    half = jax.tree.map(lambda m: m.at[..., 0].set(0), masks)
    start = Network(params, state)
    level = LevelStart(start, half, None, None, None)
    network, got = added["BRANCHES"]["sign_flip"].start(model, Weights(model.prunable), level,
                                                        None)
    np.testing.assert_array_equal(network.params["fc1"]["kernel"],
                                  -params["fc1"]["kernel"] * half["fc1"]["kernel"])
    assert got is half
