"""Every preset with every method the README offers (each `prune.structure`, `prune.schedule`
and `rewind.mode`) either validates or fails in one line that names the override fixing it;
applying that override makes it validate without undoing the user's choice. A setting the
user never wrote is named with the preset it came from (issue 17, item 2)."""

import itertools

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from test_presets import PRESETS, compose_preset

from lottery import cli
from lottery.config import STRUCTURES, ConfigError, validate
from lottery.pruning.schedules import SCHEDULES
from lottery.rewind import REWINDS

CHOICES = {"prune.structure": STRUCTURES, "prune.schedule": tuple(SCHEDULES),
           "rewind.mode": tuple(REWINDS)}


def apply(cfg, fix: str) -> None:
    """Apply the overrides of `fix` to the composed `cfg` as Hydra would: `~key` deletes,
    `key=value` sets the parsed value."""
    for override in OverridesParser.create().parse_overrides(fix.split()):
        parent, _, leaf = override.key_or_group.rpartition(".")
        if override.is_delete():
            del OmegaConf.select(cfg, parent)[leaf]
        else:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)


def fixed(cfg, chosen: dict) -> list[str]:
    """Validate `cfg`, applying each error's named fix until it validates; the fixes used.
    Each error is one line that contains its fix; a fix keeps the user's choices unless the
    choice itself is what cannot run (its key is the error's)."""
    fixes = []
    for _ in range(5):
        try:
            validate(cfg)
            return fixes
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message and error.fix and error.fix in message, message
            apply(cfg, error.fix)
            fixes.append(error.fix)
            for key, value in chosen.items():
                assert OmegaConf.select(cfg, key) == value or error.key == key, (message, key)
            if error.key in chosen:  # the choice itself could not run: the fix is the choice
                chosen[error.key] = OmegaConf.select(cfg, error.key)
    raise AssertionError(f"still failing after {fixes}")


@pytest.mark.parametrize("preset", PRESETS)
def test_each_method_on_each_preset_runs_or_names_its_fix(preset):
    base = compose_preset(preset)
    needed = {}
    for values in itertools.product(*CHOICES.values()):
        chosen = dict(zip(CHOICES, values))
        cfg = OmegaConf.create(OmegaConf.to_container(base))
        for key, value in chosen.items():
            OmegaConf.update(cfg, key, value)
        needed[values] = fixed(cfg, chosen)
    if preset == "lenet_mnist":  # the paper's output-layer rate names no neuron group
        assert needed[("neurons", "iterative", "weights")] == ["prune.layer_rates=null"]
        assert needed[("weights", "iterative", "weights")] == []
        assert needed[("channels", "oneshot", "lr")] == ["prune.structure=neurons",
                                                          "prune.layer_rates=null"]
        assert needed[("weights", "gradual", "weights")] == ["branches=[ticket]"]
    if preset == "conv2_cifar10":  # channels keep the conv rates, drop the output layer's
        assert needed[("channels", "iterative", "weights")] == ["~prune.layer_rates.out"]
    if preset == "pai_mnist1d":  # shuffle cannot restart pruned weights: random_prune can
        assert needed[("weights", "iterative", "lr")] == [
            "branches=[ticket,reinit,inverted,random_prune]"]


def precheck_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.check_overrides(list(args))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_preset_setting_that_does_not_apply_names_the_preset_and_the_fix(capsys):
    line = precheck_error(capsys, "experiment=lenet_mnist", "prune.structure=neurons")
    assert line.startswith("lottery: error: prune.layer_rates names 'out', not a neuron group")
    assert line.endswith("drop it with prune.layer_rates=null; prune.layer_rates={out: 0.1} "
                         "comes from experiment=lenet_mnist, not from your overrides")
    cli.check_overrides(["experiment=lenet_mnist", "prune.structure=neurons",
                         "prune.layer_rates=null"])  # the named fix: no error
    line = precheck_error(capsys, "experiment=conv2_cifar10", "prune.structure=channels")
    assert "drop it with ~prune.layer_rates.out; prune.layer_rates={convs.*: 0.1, out: 0.1} " \
           "comes from experiment=conv2_cifar10" in line
    cli.check_overrides(["experiment=conv2_cifar10", "prune.structure=channels",
                         "~prune.layer_rates.out"])


def test_a_setting_the_user_wrote_is_not_blamed_on_the_preset(capsys):
    line = precheck_error(capsys, "experiment=lenet_mnist", "prune.structure=neurons",
                          "prune.layer_rates.out=0.2")
    assert line.endswith("drop it with prune.layer_rates=null")
    line = precheck_error(capsys, "experiment=lenet_mnist", "prune.schedule=gradual")
    assert line.endswith("use branches=[ticket]")  # the schema's default, not the preset's
