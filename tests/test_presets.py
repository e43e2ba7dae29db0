"""Presets: every `conf/experiment/*.yaml` composes and validates, its pruning schedule is
reachable, and lenet_mnist carries the paper's values (Frankle & Carbin 2019)."""

import re
from pathlib import Path

import jax
import pytest
from helpers import WEIGHTS, check_reachable, compose_config, expected_counts

from lottery.cli import CONF_DIR
from lottery.config import NoLogger, validate
from lottery.identity import run_id
from lottery.models import MODELS, build_model
from lottery.optim import build_optimizer
from lottery.pruning.masks import kernels

# presets of the other apps (a top-level `task: lm` or `task: llm`) are theirs:
# tests/test_lm_budget.py, tests/test_llm_oneshot.py
PRESETS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("*.yaml")
                 if not re.search(r"^task: (lm|llm)\b", path.read_text(), re.MULTILINE))
# input shape and classes of the file datasets (an image folder's classes are its own: 10)
INPUTS = {"mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
          "cifar10": ((32, 32, 3), 10), "mnist1d": ((40,), 10),
          "imagenet": ((224, 224, 3), 1000), "image_folder": ((64, 64, 3), 10)}
# what a user must add to a preset: the folder of an image-folder dataset
REQUIRED = {"resnet18_imagefolder": ["dataset.path=/data/imagenette2-320"]}


def compose_preset(name: str, base=None):
    return compose_config(f"experiment={name}", *REQUIRED.get(name, []), base=base)


def test_there_are_presets():
    assert "lenet_mnist" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_validates_and_is_reachable(name):
    cfg = validate(compose_preset(name))
    assert cfg.name == name
    assert "hydra" not in cfg.resolved
    if cfg.dataset["name"] == "synthetic":
        shape, classes = tuple(cfg.dataset["shape"]), cfg.dataset["num_classes"]
    else:
        shape, classes = INPUTS[cfg.dataset["name"]]
    model = build_model(cfg.model["name"], shape, classes,
                        **{k: v for k, v in cfg.model.items() if k != "name"})
    params = jax.eval_shape(model.init, jax.random.key(0))[0]
    shapes = {layer: tuple(kernel.shape) for layer, kernel in kernels(params,
                                                                     model.prunable).items()}
    check_reachable(cfg.prune_plan(model.prunable), shapes, cfg.prune.levels)  # raises if not


def preset(name: str):
    return validate(compose_preset(name))


@pytest.mark.parametrize("name, conv_rate", [
    ("conv2_cifar10", 0.1), ("conv4_cifar10", 0.1), ("conv6_cifar10", 0.15)])
def test_conv_presets_prune_every_conv_at_the_papers_rate(name, conv_rate):
    """Frankle & Carbin 2019, Figure 2: convs at 10% (Conv-6: 15%) per level, the hidden fc
    layers at 20%, the output layer at 10%; the pattern `convs.*` names every conv."""
    cfg = preset(name)
    prunable = MODELS[cfg.model["name"]].prunable
    convs = [layer for layer in prunable if layer.startswith("convs.")]
    assert len(convs) == int(cfg.model["name"][-1])
    assert cfg.prune.layer_rates == {**dict.fromkeys(convs, conv_rate), "out": 0.1}
    assert cfg.prune_plan(prunable).layer_rates == {
        **dict.fromkeys(convs, conv_rate), "fc1": 0.2, "fc2": 0.2, "out": 0.1}
    assert cfg.dataset["augment"] is False  # the paper trains without augmentation


@pytest.mark.parametrize("name", ["vgg16_cifar10", "vgg19_cifar10", "resnet20_warmup_cifar10"])
def test_presets_prune_every_conv_globally_and_leave_the_output_layer_dense(name):
    cfg = preset(name)
    prunable = MODELS[cfg.model["name"]].prunable
    plan = cfg.prune_plan(prunable)
    assert prunable[-1] == "fc" and "fc" not in plan.layers
    assert plan.layers == prunable[:-1] and plan.global_layers == prunable[:-1]
    assert (plan.layer_rates, plan.global_rate) == ({}, 0.2)


def test_resnet20_prunes_every_layer_globally():
    cfg = preset("resnet20_cifar10")
    plan = cfg.prune_plan(MODELS["resnet20"].prunable)
    assert plan.global_layers == MODELS["resnet20"].prunable and plan.global_rate == 0.2


@pytest.mark.parametrize("name, batch, epochs, warmup", [
    ("resnet20_cifar10", 128, 160, 0), ("vgg16_cifar10", 128, 160, 0),
    ("vgg19_cifar10", 64, 160, 10000)])
def test_epoch_presets_at_cifar10s_steps_per_epoch(name, batch, epochs, warmup):
    """45,000 training images (5,000 held out): 351 steps per epoch at batch 128, 703 at 64
    (VGG-19: 112,480 steps, the paper's "112K iterations"); lr x0.1 at epochs 80 and 120."""
    cfg = preset(name)
    epoch = 45000 // batch
    steps = cfg.in_steps(epoch)
    assert (steps.train.steps, steps.train.eval_every, steps.rewind.step) == (
        epochs * epoch, 4 * epoch, 0)
    assert cfg.train.batch_size == batch and cfg.optimizer["warmup"] == warmup
    schedule = build_optimizer(**cfg.optimizer, steps_per_epoch=epoch).schedule
    at = [80 * epoch - 1, 80 * epoch, 120 * epoch - 1, 120 * epoch, epochs * epoch - 1]
    assert [float(schedule(step)) for step in at] == pytest.approx(
        [0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-6)
    if warmup:
        assert [float(schedule(step)) for step in (0, warmup // 2, warmup)] == pytest.approx(
            [0.0, 0.05, 0.1], rel=1e-6)


def test_lenet_mnist_has_the_paper_values():
    cfg = validate(compose_config("experiment=lenet_mnist", base=None))
    assert cfg.dataset == {"name": "mnist", "validation_size": 5000}
    assert cfg.model == {"name": "lenet_300_100", "hidden": [300, 100]}
    assert cfg.optimizer == {"name": "adam", "lr": 1.2e-3, "weight_decay": 0.0,
                             "milestones": [], "gamma": 0.1, "warmup": 0}  # no schedule
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every) == (50000, 60, 100)
    assert (cfg.prune.levels, cfg.prune.rate, cfg.prune.scope) == (15, 0.2, "layerwise")
    assert cfg.prune.layer_rates == {"out": 0.1}
    assert cfg.rewind.step == 0
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
    assert (cfg.train.steps, cfg.train.eval_every) == (6000, 500)
    assert (cfg.prune.levels, cfg.prune.rate) == (8, 0.3)
    assert cfg.prune.layer_rates == {"out": 0.1}  # the preset's exception stays
    assert cfg.prune_plan(("fc1", "fc2", "out")).layer_rates == {"fc1": 0.3, "fc2": 0.3, "out": 0.1}


def test_default_config_composes_and_validates():
    cfg = validate(compose_config(base=None))
    assert cfg.dataset["name"] == "mnist" and cfg.model["name"] == "lenet_300_100"
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every) == (5000, 60, 500)
    assert cfg.train.eval_batch_size == 1000
    assert (cfg.prune.levels, cfg.prune.rate, cfg.replicates, cfg.seed) == (3, 0.2, 2, 0)
    assert cfg.logger == NoLogger() and cfg.logger.name == "none"


@pytest.mark.parametrize("overrides, expected", [
    ([], "83e0f69544"),
    (["experiment=lenet_mnist"], "c610ec4acf"),
    (["experiment=pai_mnist1d"], "9cad7aecb5"),
    (["experiment=resnet20_cifar10"], "f359fea158"),
    (["prune.schedule=gradual", "branches=[ticket]"], "c3b7eda125"),
    (["rewind.mode=finetune", "rewind.finetune_lr=0.01"], "e69042e54c"),
])
def test_run_ids_are_those_from_before_the_schema(overrides, expected):
    """The ids these configs had at e0dbcb8, when the defaults were YAML (computed then with
    that commit's code): run folders made before the structured schema still resume."""
    composed = compose_config(*overrides, base=None)
    assert run_id(composed) == run_id(validate(composed).resolved) == expected


def test_a_plain_dict_takes_the_schema_defaults():
    """What a partial dict leaves out is the documented default (the values conf/ held)."""
    cfg = validate({"dataset": {"name": "synthetic"}, "model": {"name": "lenet_300_100"},
                    "optimizer": {"name": "adam", "lr": 1e-3}})
    assert (cfg.name, cfg.seed, cfg.replicates) == ("default", 0, 2)
    assert cfg.branches == ("ticket", "reinit", "random_prune")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every) == (5000, 60, 500)
    assert (cfg.train.eval_batch_size, cfg.train.checkpoint_every) == (1000, "5ep")
    assert (cfg.train.save_weights, cfg.train.members) == (False, "auto")
    assert (cfg.train.precision, cfg.train.mesh.data) == ("fp32", "auto")
    assert (cfg.prune.levels, cfg.prune.rate, cfg.prune.scope) == (3, 0.2, "layerwise")
    assert (cfg.prune.score, cfg.prune.at, cfg.prune.schedule) == ("magnitude", "trained",
                                                                   "iterative")
    assert (cfg.prune.structure, cfg.prune.score_batch, cfg.prune.score_rounds) == (
        "weights", 100, None)
    assert (cfg.prune.gradual.start, cfg.prune.gradual.end, cfg.prune.gradual.every) == (
        0, None, 100)
    assert (cfg.rewind.step, cfg.rewind.mode, cfg.rewind.finetune_lr) == (0, "weights", None)
    assert cfg.logger.name == "none"


@pytest.mark.parametrize("text, message", [
    ("train:\n  stepz: 5\n", "experiment/typo.yaml: train.stepz is not a config key (did you "
     "mean train.steps?); the keys of train are steps, batch_size, eval_every, "
     "eval_batch_size, save_weights, checkpoint_every, members, precision, mesh"),
    ("task: lm\n", "experiment/typo sets task, so it is a config of another command (task: lm: "
     "`lottery lm`), not of the IMP command: run `lottery lm experiment=typo` instead"),
])
def test_a_preset_with_a_key_outside_the_schema_fails_in_one_line(text, message, tmp_path,
                                                                    monkeypatch, capsys):
    import shutil

    import lottery.cli

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\n" + text)
    monkeypatch.setattr(lottery.cli, "CONF_DIR", str(conf))
    with pytest.raises(SystemExit) as exit_:
        lottery.cli.check_overrides(["experiment=typo"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"lottery: error: {message}\n"


LENET_WITHOUT_LAYER_RATES = "347c6dae68"  # experiment=lenet_mnist prune.layer_rates=null at
#                                           8718380 (computed then with that commit's code)


@pytest.mark.parametrize("emptied", [["prune.layer_rates=null"], ["~prune.layer_rates.out"]])
def test_an_empty_mapping_null_and_deleted_keys_are_the_same_run(emptied):
    """issue 17.5: removing the preset's only per-layer rate (`~prune.layer_rates.out` leaves
    `{}`) and `prune.layer_rates=null` mean the same config (no per-layer rate), so they are
    one run: one id, that of the null spelling before the ids normalised empty mappings, so
    its run folders still resume."""
    composed = compose_config("experiment=lenet_mnist", *emptied, base=None)
    assert validate(composed).prune.layer_rates == {}
    assert run_id(composed) == run_id(validate(composed).resolved) == LENET_WITHOUT_LAYER_RATES
    assert run_id(compose_config("experiment=lenet_mnist", base=None)) == "c610ec4acf"


def test_an_empty_mapping_on_the_defaults_is_the_default_run():
    """`prune.layer_rates={}` where the default is null sets nothing: the default config's id
    (pinned above). (On a preset, `prune.layer_rates={}` merges into its rates: a no-op.)"""
    composed = compose_config("prune.layer_rates={}", base=None)
    assert run_id(composed) == run_id(validate(composed).resolved) == "83e0f69544"


def test_a_plain_dict_has_the_id_of_the_same_config_with_its_defaults_written_out():
    """issue 17.5: a key left out takes the schema's default, so it is the same run as the
    config that writes the default out (the values written here by hand from the schema's
    documented defaults)."""
    sections = {"dataset": {"name": "synthetic"}, "model": {"name": "lenet_300_100"},
                "optimizer": {"name": "adam", "lr": 1e-3}}
    written = {**sections, "name": "default", "seed": 0, "replicates": 2,
               "branches": ["ticket", "reinit", "random_prune"],
               "train": {"steps": 5000, "batch_size": 60, "eval_every": 500,
                         "eval_batch_size": 1000, "save_weights": False,
                         "checkpoint_every": "5ep", "members": "auto"},
               "prune": {"levels": 3, "rate": 0.2, "scope": "layerwise", "layer_rates": None,
                         "layers": None, "score": "magnitude", "at": "trained",
                         "schedule": "iterative", "structure": "weights", "score_batch": 100,
                         "score_rounds": None,
                         "gradual": {"start": 0, "end": None, "every": 100}},
               "rewind": {"step": 0, "mode": "weights", "finetune_lr": None}}
    partial = {**sections, "train": {"steps": 5000}, "prune": {"gradual": {"every": 100}}}
    assert run_id(validate(partial).resolved) == run_id(validate(written).resolved)
    assert run_id(validate(sections).resolved) == run_id(validate(written).resolved)
    assert run_id(validate({**sections, "seed": 1}).resolved) != run_id(
        validate(written).resolved)
