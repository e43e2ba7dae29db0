"""Fuzzed bad configs: each one stops before training with exit status 2 and one line.

The cases are generated deterministically from tables: for every key a user sets, bad values
of each kind (wrong types, out-of-range values, unknown names), plus unknown keys and group
options, unparsable overrides and contradictory combinations of keys. Each case runs on a small
base config (a synthetic dataset or MNIST-1D, a few steps) as `lottery check ...` (every
check a run makes, from the overrides to the built setup, then stop instead of training):
`lottery.cli.main()` in this process, with `sys.argv` set (a new process per case would
cost seconds); a few run again as real `lottery` processes, training included. A case
passes when the command exits with status 2, prints exactly one line on stderr,
`lottery: error: ...`, which names the key at fault, prints no traceback, and writes no
record (a case that wrongly passed would exit 0).
"""

import logging
import random
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hydra.core.global_hydra import GlobalHydra

import lottery.cli

# ------------------------------------------------------------------------------- base configs

MLP = {  # LeNet-300-100 on 200 synthetic 8x8 images, 20 steps, one level, one member
    "dataset": "synthetic", "dataset.shape": "[8,8,1]", "dataset.train_size": "200",
    "dataset.validation_size": "50", "dataset.test_size": "50", "train.steps": "20",
    "train.eval_every": "10", "train.batch_size": "10", "prune.levels": "1", "replicates": "1",
    "branches": "[ticket]",
}
BASES = {
    "mlp": MLP,
    "sgd": {**MLP, "optimizer": "sgd"},
    "m1dmlp": {**MLP, "model": "mnist1d_mlp", "dataset.shape": "[40]"},
    "conv": {**MLP, "model": "conv2", "dataset.shape": "[8,8,3]"},
    "resnet": {**MLP, "model": "resnet20", "dataset.shape": "[8,8,3]"},
    "gradual": {**MLP, "prune.schedule": "gradual", "train.steps": "40"},
    "wandb": {**MLP, "logger": "wandb"},
    "mnist1d": {"experiment": "mnist1d_mlp", "train.steps": "20", "train.eval_every": "10",
                "train.batch_size": "10", "prune.levels": "1", "replicates": "1"},
    "cifar": {**{k: v for k, v in MLP.items() if not k.startswith("dataset")},
              "dataset": "cifar10", "model": "conv2"},  # never gets as far as the data
}


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    overrides: tuple[str, ...]
    mentions: str  # the message names this (the key at fault); a regex

    def argv(self) -> list[str]:
        merged = dict(BASES[self.base])
        extra = []
        for override in self.overrides:
            key, sep, value = override.partition("=")
            if sep and key in merged:
                merged[key] = value
            else:
                extra.append(override)
        return [f"{key}={value}" for key, value in merged.items()] + extra


# ---------------------------------------------------------------------- the kinds of bad value

WRONG = "<wrong type>"  # stands for a value drawn (seeded) from WRONG_TYPES
WRONG_TYPES = ["abc", "[1,2]", "{a: 1}", "true", "null"]
NULLABLE = {"prune.score_rounds", "prune.gradual.end", "rewind.finetune_lr"}  # null: a default
COUNT = [WRONG, "2.5", "0"]  # integers >= 1
FRACTION = [WRONG, "-0.1", "1"]  # numbers in [0, 1)
CHOICE = ["bogus", "[a,b]"]  # one of a few names
BOOL = ["maybe", "2"]

# (base, key, bad values, what the message must name (a regex); None: the key itself)
TABLE = [
    # dataset.*
    ("mlp", "dataset.name", CHOICE + ["5", "null"], r"dataset"),
    ("mlp", "dataset.train_size", COUNT + ["-7", "1e12"], None),
    ("mlp", "dataset.validation_size", COUNT, None),
    ("mlp", "dataset.test_size", ["0"], None),
    ("mlp", "dataset.num_classes", [WRONG, "1"], None),
    ("mlp", "dataset.shape", ["5", "[]", "[0,8,1]", "{h: 8}"], None),
    ("mlp", "dataset.noise", ["abc", "-1"], None),
    ("mlp", "dataset.seed", ["-1", "2.5"], None),
    ("mnist1d", "dataset.num_samples", ["abc", "5"], None),
    ("mnist1d", "dataset.seed", ["abc", "4294967296"], None),
    ("mnist1d", "dataset.validation_size", ["0", "4000"], None),
    ("cifar", "dataset.augment", BOOL, None),
    ("cifar", "dataset.path", ["5", "[a]"], None),
    ("cifar", "dataset.validation_size", ["50000"], None),
    # model.*
    ("mlp", "model.name", CHOICE, r"model"),
    ("mlp", "model.hidden", ["[300]", "[0,100]", "300", "[300,100,50]"], None),
    ("m1dmlp", "model.hidden", [WRONG, "0"], None),
    ("m1dmlp", "model.residual", BOOL, None),
    ("conv", "model.dropout", FRACTION, None),
    ("resnet", "model.width", [WRONG, "0.5", "0"], None),
    # optimizer.*
    ("mlp", "optimizer.name", CHOICE, r"optimizer"),
    ("mlp", "optimizer.lr", [WRONG, "0"], None),
    ("mlp", "optimizer.weight_decay", [WRONG, "-0.1"], None),
    ("mlp", "optimizer.milestones", ["5", "[abc]", "[-5]"], None),
    ("mlp", "optimizer.gamma", [WRONG, "-1"], None),
    ("mlp", "optimizer.warmup", [WRONG, "-1"], None),
    ("mlp", "+optimizer.b1", ["x", "1.5"], r"optimizer\.b1"),
    ("mlp", "+optimizer.eps", ["0"], r"optimizer\.eps"),
    ("sgd", "optimizer.momentum", [WRONG, "-0.5", "1"], None),
    ("sgd", "optimizer.nesterov", BOOL, None),
    # train.*
    ("mlp", "train.steps", [WRONG, "-1", "0", "10xx", "0ep", "3000000000"], None),
    ("mlp", "train.batch_size", COUNT, None),
    ("mlp", "train.eval_every", [WRONG, "-1", "0"], None),
    ("mlp", "train.eval_batch_size", [WRONG, "0"], None),
    ("mlp", "train.save_weights", BOOL, None),
    ("mlp", "train.members", ["bogus"], None),
    ("mlp", "train.checkpoint_every", [WRONG, "-1"], None),
    # prune.*
    ("mlp", "prune.levels", [WRONG, "2.5", "-1", "1000000000"], None),
    ("mlp", "prune.rate", FRACTION + ["1.5"], None),
    ("mlp", "prune.scope", CHOICE, None),
    ("mlp", "prune.layer_rates", ["[0.1]", "{out: 1.5}", "{out: abc}", "{fc9: 0.1}"],
     r"prune\.layer_rates|prune layer"),
    ("mlp", "prune.layers", ["fc1", "[]", "[fc9]", "[fc*9]"],
     r"prune\.layers|prune layer"),
    ("mlp", "prune.score", CHOICE, None),
    ("mlp", "prune.at", ["bogus"], None),
    ("mlp", "prune.schedule", ["bogus"], None),
    ("mlp", "prune.structure", CHOICE, None),
    ("mlp", "prune.score_batch", [WRONG, "0"], None),
    ("mlp", "prune.score_rounds", [WRONG, "0", "1000000000"], None),
    ("gradual", "prune.gradual.start", [WRONG, "-1"], r"prune\.gradual"),
    ("gradual", "prune.gradual.end", [WRONG, "0", "41"], r"prune\.gradual"),
    ("gradual", "prune.gradual.every", [WRONG, "0"], r"prune\.gradual"),
    # rewind.*
    ("mlp", "rewind.step", [WRONG, "-1", "20", "25"], None),
    ("mlp", "rewind.mode", ["bogus"], None),
    ("mlp", "rewind.finetune_lr", [WRONG, "0", "-1"], None),
    # top level
    ("mlp", "replicates", [WRONG, "0"], None),
    ("mlp", "seed", [WRONG, "-1", "4294967296"], None),
    ("mlp", "branches", ["[ticket,bogus]", "[reinit]", "[]", "ticket", "[ticket,ticket]"],
     None),
    ("mlp", "name", ["[a,b]", "''"], None),
    # logger.*
    ("mlp", "logger.name", ["bogus"], r"logger"),
    ("wandb", "logger.project", ["[a]", "''"], None),
    ("wandb", "logger.init_timeout", [WRONG, "0"], None),
]

UNKNOWN = [  # (base, overrides, what the message names)
    ("mlp", ["train.stepz=1"], r"train\.stepz"),
    ("mlp", ["+train.stepz=1"], r"train\.stepz"),
    ("mlp", ["+prune.levelz=2"], r"prune\.levelz"),
    ("mlp", ["+prune.gradual.evry=5"], r"prune\.gradual\.evry"),
    ("mlp", ["+rewind.stepz=0"], r"rewind\.stepz"),
    ("mlp", ["+trian.steps=5"], r"trian"),
    ("mlp", ["+logger.bogus=1"], r"logger\.bogus"),
    ("wandb", ["+logger.entity=me"], r"logger\.entity"),
    ("mlp", ["+dataset.foo=1"], r"dataset\.foo"),
    ("mlp", ["+model.bogus=1"], r"model\.bogus"),
    ("mlp", ["+optimizer.momentum=0.9"], r"optimizer\.momentum"),  # not an Adam option
    ("mlp", ["model=nope"], r"model/nope"),
    ("mlp", ["dataset=nope"], r"dataset/nope"),
    ("mlp", ["logger=nope"], r"logger/nope"),
    ("mlp", ["experiment=nope"], r"experiment/nope"),
    ("mlp", ["train.steps=["], r"train\.steps"),
    ("mlp", ["train.steps"], r"train\.steps"),
    ("mlp", ["name=${nope}"], r"nope"),
    ("mlp", ["train.steps=${train.nope}"], r"train\.nope"),
    ("mlp", ["train.steps=${oc.env:LOTTERY_FUZZ_UNSET}"], r"LOTTERY_FUZZ_UNSET"),
    ("mlp", ["train=5"], r"train"),
    ("mlp", ["prune.gradual=5"], r"prune\.gradual"),
    ("mlp", ["prune.layer_rates.out=0.1"], r"prune\.layer_rates"),  # needs a leading +
]

CONTRADICTIONS = [  # (base, overrides, the message (a regex))
    ("mlp", ["rewind.step=1ep"], r"rewind\.step=20 must be below train\.steps=20"),
    ("mlp", ["rewind.step=25", "train.steps=1ep", "train.eval_every=5"],
     r"rewind\.step=25 must be below train\.steps=20 \(20 steps per epoch\)"),
    ("mlp", ["train.eval_every=25"], r"train\.eval_every=25 .*train\.steps=20"),
    ("mlp", ["train.eval_every=2ep"], r"train\.eval_every.*train\.steps"),
    ("mlp", ["train.batch_size=500"], r"train\.batch_size=500 exceeds the 200 training"),
    ("mlp", ["train.batch_size=201", "train.steps=1ep"], r"train\.batch_size=201"),
    ("mnist1d", ["dataset.num_samples=100", "dataset.validation_size=80"],
     r"dataset\.validation_size=80 must be below the 80 training examples"),
    ("gradual", ["branches=[ticket,reinit]"], r"prune\.schedule=gradual .*branches=\[ticket\]"),
    ("gradual", ["prune.score=snip"], r"prune\.schedule=gradual .*prune\.score=magnitude"),
    ("gradual", ["prune.at=init"], r"prune\.schedule=gradual .*prune\.at=trained"),
    ("gradual", ["prune.gradual.start=30", "prune.gradual.end=20"], r"prune\.gradual"),
    ("gradual", ["rewind.step=10", "prune.gradual.start=5"], r"prune\.gradual.*rewind\.step=10"),
    ("gradual", ["prune.gradual.end=3ep"], r"prune\.gradual.*train\.steps=40"),
    ("mlp", ["prune.structure=neurons", "prune.score=snip"], r"prune\.structure=neurons"),
    ("conv", ["prune.structure=channels", "prune.score=grasp"], r"prune\.structure=channels"),
    ("conv", ["prune.structure=channels", "prune.scope=erk"], r"prune\.scope=erk"),
    ("mlp", ["prune.structure=channels"], r"channel"),
    ("mlp", ["prune.structure=nm", "prune.nm=[2,3]"], r"prune\.nm=\[2,3\].* fc1 has 64 inputs"),
    ("conv", ["prune.structure=nm"], r"prune\.nm=\[2,4\].* convs\.0 has 3 inputs"),
    ("mlp", ["prune.structure=nm", "prune.scope=global"], r"prune\.scope=global"),
    ("mlp", ["prune.structure=nm", "prune.levels=2"], r"prune\.levels=2"),
    ("mlp", ["prune.structure=nm", "+prune.layer_rates.out=0.5"], r"prune\.layer_rates"),
    ("mlp", ["prune.levels=60", "prune.rate=0.9"], r"prune\.levels=60 at rate 0\.9 empties"),
    ("mlp", ["prune.levels=5", "prune.rate=0.99"], r"prune\.levels=5 at rate 0\.99 empties"),
    ("mlp", ["prune.levels=30", "prune.scope=global", "prune.rate=0.9"],
     r"prune\.levels=30 empties the global pool"),
    ("mlp", ["prune.levels=40", "prune.structure=neurons", "prune.rate=0.9"],
     r"prune\.levels=40 .*empties"),
    ("mlp", ["prune.layers=[fc1]", "+prune.layer_rates.out=0.1"], r"prune\.layer_rates names out"),
    ("mlp", ["model=conv2", "dataset.shape=[40]"], r"model conv2.*\(40,\)"),
    ("mlp", ["model=lenet5", "dataset.shape=[40]"], r"model lenet5.*\(40,\)"),
    ("mlp", ["model=resnet20", "dataset.shape=[40]"], r"model resnet20.*\(40,\)"),
    ("mlp", ["model=conv6", "dataset.shape=[4,4,3]"], r"model conv6.*\(4, 4, 3\)"),
    ("mlp", ["model=lenet5_caffe", "dataset.shape=[8,8,1]"], r"model lenet5_caffe.*\(8, 8, 1\)"),
    ("mlp", ["model=vgg11", "dataset.shape=[8,8,3]"], r"model vgg11.*\(8, 8, 3\)"),
    ("mnist1d", ["model=conv2", "~model.hidden"], r"model conv2.*\(40,\)"),
    ("mnist1d", ["model=lenet5", "~model.hidden"], r"model lenet5.*\(40,\)"),
    ("mnist1d", ["model=conv2"], r"model\.hidden is not an option of model conv2"),  # preset's
    ("mnist1d", ["train.batch_size=4000"], r"train\.batch_size=4000 exceeds"),
    ("mlp", ["branches=[instability]"], r"branches must include ticket"),
    ("mlp", ["branches=[ticket,instability_b]"], r"branches='instability_b' is unknown"),
]


def _id(base: str, overrides) -> str:
    return (base + ":" if base != "mlp" else "") + " ".join(overrides)


def generate(seed: int = 6) -> list[Case]:
    """Every (key, bad value) of TABLE (a seeded draw of the wrong types where it says WRONG),
    then the unknown names and the contradictions."""
    rng = random.Random(seed)
    cases = []
    for base, key, values, mentions in TABLE:
        mentions = mentions or re.escape(key.lstrip("+"))
        wrong = [v for v in WRONG_TYPES if not (v == "null" and key in NULLABLE)]
        drawn = []
        for value in values:
            drawn += [rng.choice(wrong)] if value == WRONG else [value]
        for value in drawn:
            override = f"{key}={value}"
            cases.append(Case(_id(base, [override]), base, (override,), mentions))
    for base, overrides, mentions in UNKNOWN + CONTRADICTIONS:
        cases.append(Case(_id(base, overrides), base, tuple(overrides), mentions))
    ids = [case.id for case in cases]
    assert len(set(ids)) == len(ids), "case ids must be distinct"
    return cases


CASES = generate()


def test_there_are_at_least_200_distinct_cases(processes):  # (starts the processes early)
    assert len(CASES) >= 200
    assert len({(case.base, case.overrides) for case in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- in process


def _logging_state():
    loggers = [logging.root, *(logger for logger in logging.Logger.manager.loggerDict.values()
                               if isinstance(logger, logging.Logger))]
    return [(logger, logger.handlers[:], logger.level, logger.disabled, logger.propagate)
            for logger in loggers]


@pytest.fixture
def fresh_hydra(monkeypatch):
    """Hydra's global state and the logging it configures for each run (handlers on the
    captured streams) are reset; `lottery check` mode is left as it was."""
    monkeypatch.setattr(lottery.cli, "CHECK_ONLY", lottery.cli.CHECK_ONLY)
    # Hydra's logging setup shuts every handler down; absl's (JAX imports absl) then closes
    # its stream unless that is the current sys.stderr, and under pytest its stream is
    # pytest's own capture file, which the rest of the session still writes to.
    from absl.logging import get_absl_handler

    monkeypatch.setattr(get_absl_handler().python_handler, "stream", sys.__stderr__)
    GlobalHydra.instance().clear()
    state = _logging_state()
    yield
    GlobalHydra.instance().clear()
    for logger, handlers, level, disabled, propagate in state:
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.disabled, logger.propagate = disabled, propagate


def check(case: Case, code, out: str, err: str, root) -> None:
    where = f"{case.id}: exit {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, where
    assert code == 2, where
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, where
    assert lines[0].startswith("lottery: error: "), where
    assert re.search(case.mentions, lines[0], re.IGNORECASE), \
        f"{case.id}: the message does not name {case.mentions!r}: {lines[0]}"
    assert not list(root.rglob("record.jsonl")), where


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_config_fails_in_one_line(case, tmp_path, monkeypatch, capfd, fresh_hydra):
    monkeypatch.chdir(tmp_path)  # anything written to the working directory lands here
    monkeypatch.setattr(sys, "argv", ["lottery", "check", *case.argv(),
                                      f"hydra.run.dir={tmp_path}/run"])
    try:
        lottery.cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capfd.readouterr()
    check(case, code, out, err, tmp_path)


# --------------------------------------------------------------------------- as processes

PROCESS_CASES = ["train.steps=10xx", "prune.rate=1.5", "+train.stepz=1",
                 "model=conv2 dataset.shape=[40]"]


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """A few cases as real `lottery` processes, started by the module's first test so that
    they run beside the in-process cases; the tests at the end of the module wait for them."""
    root = tmp_path_factory.mktemp("fuzz-processes")
    started = {}
    for case in (case for case in CASES if case.id in PROCESS_CASES):
        folder = root / re.sub(r"\W", "_", case.id)
        folder.mkdir()
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            started[case.id] = case, folder, subprocess.Popen(
                [sys.executable, "-m", "lottery.cli", *case.argv(), f"hydra.run.dir={folder}/run"],
                cwd=folder, stdout=out, stderr=err)
    assert sorted(started) == sorted(PROCESS_CASES)
    yield started
    for _, _, process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("case_id", PROCESS_CASES)
def test_bad_config_fails_in_one_line_as_a_process(processes, case_id):
    case, folder, process = processes[case_id]
    code = process.wait(timeout=240)
    check(case, code, (folder / "stdout").read_text(), (folder / "stderr").read_text(),
          folder)
