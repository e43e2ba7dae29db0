"""Presets: every `conf/experiment/*.yaml` composes and validates, its pruning schedule is
reachable, and lenet_mnist carries the paper's values (Frankle & Carbin 2019)."""

from pathlib import Path

import jax
import pytest

from helpers import WEIGHTS, compose_config, expected_counts
from lottery.cli import CONF_DIR
from lottery.config import validate
from lottery.imp import check_reachable
from lottery.models import build_model

PRESETS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
INPUTS = {"mnist": ((28, 28, 1), 10)}  # input shape and classes of the file datasets


def test_there_are_presets():
    assert "lenet_mnist" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_validates_and_is_reachable(name):
    cfg = validate(compose_config(f"experiment={name}", base=None))
    assert cfg.name == name
    assert "hydra" not in cfg.resolved
    if cfg.dataset["name"] == "synthetic":
        shape, classes = tuple(cfg.dataset["shape"]), cfg.dataset["num_classes"]
    else:
        shape, classes = INPUTS[cfg.dataset["name"]]
    model = build_model(cfg.model["name"], shape, classes,
                        **{k: v for k, v in cfg.model.items() if k != "name"})
    weights = model.param_counts(jax.eval_shape(model.init, jax.random.key(0))[0])
    check_reachable(cfg.prune_plan(model.prunable), weights, cfg.levels)  # raises if not


def test_lenet_mnist_has_the_paper_values():
    cfg = validate(compose_config("experiment=lenet_mnist", base=None))
    assert cfg.dataset == {"name": "mnist", "validation_size": 5000}
    assert cfg.model == {"name": "lenet_300_100", "hidden": [300, 100]}
    assert cfg.optimizer == {"name": "adam", "lr": 1.2e-3, "weight_decay": 0.0,
                             "milestones": [], "gamma": 0.1, "warmup": 0}  # no schedule
    assert (cfg.steps, cfg.batch_size, cfg.eval_every) == (50000, 60, 100)
    assert (cfg.levels, cfg.rate, cfg.scope) == (15, 0.2, "layerwise")
    assert cfg.layer_rates == {"out": 0.1}
    assert cfg.rewind_step == 0
    assert cfg.branches == ("ticket", "reinit", "random_prune")
    plan = cfg.prune_plan(("fc1", "fc2", "out"))
    assert plan.layer_rates == {"fc1": 0.2, "fc2": 0.2, "out": 0.1}
    # 15 levels reach 3.6% of the weights (the preset's comment and the paper)
    final = {layer: expected_counts(WEIGHTS[layer], plan.layer_rates[layer], 15)[15]
             for layer in WEIGHTS}
    assert final == {"fc1": 8275, "fc2": 1056, "out": 206}
    assert round(100 * sum(final.values()) / sum(WEIGHTS.values()), 1) == 3.6


def test_command_line_overrides_win_over_the_preset():
    cfg = validate(compose_config("experiment=lenet_mnist", "train.steps=6000",
                                  "train.eval_every=500", "prune.levels=8", "prune.rate=0.3",
                                  base=None))
    assert (cfg.steps, cfg.eval_every, cfg.levels, cfg.rate) == (6000, 500, 8, 0.3)
    assert cfg.layer_rates == {"out": 0.1}  # the preset's exception stays
    assert cfg.prune_plan(("fc1", "fc2", "out")).layer_rates == {"fc1": 0.3, "fc2": 0.3, "out": 0.1}


def test_default_config_composes_and_validates():
    cfg = validate(compose_config(base=None))
    assert cfg.dataset["name"] == "mnist" and cfg.model["name"] == "lenet_300_100"
    assert (cfg.steps, cfg.batch_size, cfg.eval_every, cfg.eval_batch_size) == (5000, 60, 500, 1000)
    assert (cfg.levels, cfg.rate, cfg.replicates, cfg.seed) == (3, 0.2, 2, 0)
    assert cfg.logger == {"name": "none"}
