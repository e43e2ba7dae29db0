"""The validated run configuration: every bad input is one clear `ConfigError` line.

`validate(cfg)` turns the composed Hydra config into a frozen `RunConfig` before anything
is loaded or trained; the CLI prints the error and exits with status 2.
"""

from dataclasses import dataclass, replace
from difflib import get_close_matches
from fnmatch import fnmatchcase

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lottery.branches import BRANCHES, members_of
from lottery.data import DATASETS, DataError, describe
from lottery.durations import DurationError, parse_duration, to_steps
from lottery.models import MODELS, ModelError, build_model
from lottery.optim import OptimizerError, build_optimizer
from lottery.platform import MEMBER_MODES
from lottery.pruning.prune import PrunePlan
from lottery.pruning.schedules import SCHEDULES
from lottery.pruning.scores import SCORES
from lottery.rewind import REWINDS

SCOPES = ("layerwise", "global", "erk")
PRUNE_AT = ("trained", "init")
STRUCTURES = ("weights", "neurons", "channels")
LOGGERS = ("none", "wandb")
OPTIMIZERS = ("adam", "sgd")
# The keys of the sections that `validate` reads whole (dataset, model and optimizer options
# are checked by their readers and builders); any other key is a typo, not a silent no-op.
KEYS = {
    "": ("name", "seed", "replicates", "branches", "dataset", "model", "optimizer", "train",
         "prune", "rewind", "logger"),
    "train": ("steps", "batch_size", "eval_every", "eval_batch_size", "save_weights",
              "checkpoint_every", "members"),
    "prune": ("levels", "rate", "scope", "layer_rates", "layers", "score", "at", "schedule",
              "structure", "score_batch", "score_rounds", "gradual"),
    "prune.gradual": ("start", "end", "every"),
    "rewind": ("step", "mode", "finetune_lr"),
    "logger": ("name", "project", "init_timeout"),  # project, init_timeout: wandb only
}
MAX_STEPS = 2**31 - 1  # the device counts steps in int32
MAX_LEVELS = 1000  # each level trains the network again: more is a typo (and would spin the
#                   level counts for ever at a rate too small to empty a layer)
MAX_SCORE_ROUNDS = 10_000  # SynFlow's paper uses 100


class ConfigError(Exception):
    """A config value that cannot run; the message names the key and how to fix it."""


def _int(value, key: str, low: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer{why}")
    if value < low:
        raise ConfigError(f"{key}={value} must be at least {low}{why}")
    return value


def _seed(value) -> int:
    seed = _int(value, "seed", 0)
    if seed >= 2**32:
        raise ConfigError(f"seed={seed} must be below 2**32")
    return seed


def _bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def _fraction(value, key: str, why: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number in [0, 1){why}")
    if not 0 <= value < 1:
        raise ConfigError(f"{key}={value} must be in [0, 1){why}")
    return float(value)


def _choice(value, key: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; choose one of {', '.join(sorted(choices))}")
    return value


def _section(cfg: dict, key: str) -> dict:
    value = cfg.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a config group or mapping, got {value!r}")
    return value


def _known_keys(section: dict, where: str, known=None) -> None:
    """Refuse a key that nothing reads (`+train.stepz=5`): it would be silently ignored."""
    known = KEYS[where] if known is None else known
    for key in section:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            close = get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"{path} is not a config key{hint}; the keys of "
                              f"{where or 'the config'} are {', '.join(known)}")


_FITTING = set()  # (model, input shape, classes, options) that build: a command validates twice


def _check_inputs(cfg: "RunConfig") -> None:
    """The dataset's options and sizes, and the model against the dataset's input shape,
    without loading any data (the model is built abstractly: no weights are made)."""
    name = cfg.dataset["name"]
    try:
        data = describe(name, **{k: v for k, v in cfg.dataset.items() if k != "name"})
    except DataError as error:
        raise ConfigError(str(error)) from None
    if data is None:  # a dataset known only once it loads: imp.build checks it then
        return
    if cfg.batch_size > data.train_size:
        raise ConfigError(f"train.batch_size={cfg.batch_size} exceeds the {data.train_size} "
                          f"training examples of {name}: use a smaller batch")
    options = {k: v for k, v in cfg.model.items() if k != "name"}
    key = (cfg.model["name"], data.input_shape, data.num_classes, repr(sorted(options.items())))
    if key not in _FITTING:
        try:
            build_model(cfg.model["name"], data.input_shape, data.num_classes, **options)
        except ModelError as error:
            raise ConfigError(str(error)) from None
        _FITTING.add(key)


@dataclass(frozen=True)
class RunConfig:
    name: str
    seed: int
    replicates: int
    branches: tuple[str, ...]
    dataset: dict
    model: dict
    optimizer: dict
    steps: int | str  # a duration: steps, or "<n>ep" until `in_steps` resolves it
    batch_size: int
    eval_every: int | str
    eval_batch_size: int
    members: str  # how a device runs its members: auto | vmap | map
    save_weights: bool  # save each level's trained ticket weights (levels/trained_NN.npz)
    checkpoint_every: int | str  # steps between checkpoints within a level (0: levels only)
    levels: int
    rate: float
    scope: str  # layerwise | global | erk
    layer_rates: dict  # layer -> rate (weights: patterns matched against the model's layers)
    prune_layers: tuple[str, ...] | None  # the chosen layers (or patterns), or all
    score: str  # magnitude | random | snip | grasp | synflow
    schedule: str  # iterative | oneshot | gradual
    prune_at: str  # trained | init: the weights that are scored
    structure: str  # weights | neurons | channels
    score_batch: int  # training examples that data-dependent scores see
    score_rounds: int  # scoring rounds per pruning (SynFlow: 100)
    gradual: dict  # start, end, every: durations of the gradual schedule
    rewind_step: int | str
    rewind_mode: str  # weights | lr | finetune
    finetune_lr: float | None  # fine-tuning's constant rate (None: the schedule's last)
    logger: dict
    resolved: dict  # the whole resolved config, for the record and W&B

    @property
    def stack_size(self) -> int:
        return self.replicates * len(members_of(self.branches))

    def in_steps(self, steps_per_epoch: int) -> "RunConfig":
        """This config with every duration in steps (epochs are `steps_per_epoch` steps)."""
        steps, eval_every, rewind_step = (
            to_steps(value, steps_per_epoch) for value in
            (self.steps, self.eval_every, self.rewind_step))
        _check_durations(steps, eval_every, rewind_step, steps_per_epoch)
        gradual = dict(self.gradual)
        if self.schedule == "gradual":
            gradual = _gradual_steps(gradual, steps, rewind_step, steps_per_epoch)
        return replace(self, steps=steps, eval_every=eval_every, rewind_step=rewind_step,
                       gradual=gradual,
                       checkpoint_every=to_steps(self.checkpoint_every, steps_per_epoch))

    def prune_plan(self, names: tuple[str, ...]) -> PrunePlan:
        """The plan over `names` (the model's prunable layers, or its structure groups).
        Layerwise: every chosen name at `rate` unless `layer_rates` names it. Global and ERK:
        the chosen names not in `layer_rates` form one pool at `rate`."""
        rates, layers = _resolve(self.layer_rates, self.prune_layers, names,
                                 self.model["name"], self.structure)
        layers = layers or names
        if self.scope == "layerwise":
            return PrunePlan({layer: rates.get(layer, self.rate) for layer in layers})
        own = {layer: rate for layer, rate in rates.items() if layer in layers}
        return PrunePlan(own, tuple(layer for layer in layers if layer not in own), self.rate,
                         erk=self.scope == "erk")


def _duration(value, key: str, low: int):
    try:
        count, _ = parse_duration(value, key)
    except DurationError as error:
        raise ConfigError(str(error)) from None
    if count < low:
        raise ConfigError(f"{key}={value!r} must be at least {low}")
    return value


def _flatten(mapping: dict, prefix: str = "") -> dict:
    """Nested keys joined by dots: `prune.layer_rates.stage1.0.conv1=0.1` on the command line
    nests in Hydra; a layer path is one dotted name."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matching(pattern, prunable, model: str, structure: str = "weights") -> list[str]:
    """The prunable layers (or structure groups) a name or shell-style pattern (`convs.*`,
    `stage?.*.conv1`) names."""
    hits = [layer for layer in prunable if fnmatchcase(layer, str(pattern))]
    if not hits:
        what = "prunable layer" if structure == "weights" else f"{structure[:-1]} group"
        extra = ("" if structure == "weights" else
                 " (an output layer's units are the classes: never removed)")
        raise ConfigError(f"prune layer {pattern!r} is not a {what} of {model}; its "
                          f"{what}s are {', '.join(prunable)}{extra}")
    return hits


def _resolve(layer_rates: dict, layers, prunable, model: str, structure: str = "weights"):
    """`(layer_rates, layers)` with their names and patterns matched against `prunable`: an
    exact name beats any pattern, wherever it is listed."""
    if layers is not None:
        matched = {hit for pattern in layers
                   for hit in _matching(pattern, prunable, model, structure)}
        layers = tuple(layer for layer in prunable if layer in matched)
    rates = {}
    for pattern, rate in layer_rates.items():
        hits = [hit for hit in _matching(pattern, prunable, model, structure)
                if layers is None or hit in layers]
        if not hits:
            raise ConfigError(f"prune.layer_rates names {pattern}, which prune.layers="
                              f"{list(layers)} leaves out")
        exact = pattern in prunable
        rates.update({hit: rate for hit in hits if exact or hit not in layer_rates})
    return rates, layers


def _gradual_steps(gradual: dict, steps: int, rewind_step: int, steps_per_epoch=None) -> dict:
    """The gradual schedule in steps: `end` defaults to half of training; pruning happens at
    start, start + every, ..., end, inside [rewind.step, train.steps]."""
    start, every = (to_steps(gradual[key], steps_per_epoch or 1) for key in ("start", "every"))
    end = gradual.get("end")
    end = max(start, rewind_step) + (steps - max(start, rewind_step)) // 2 if end is None \
        else to_steps(end, steps_per_epoch or 1)
    if not rewind_step <= start < end <= steps:
        raise ConfigError(f"prune.gradual: start={start} and end={end} (steps) must satisfy "
                          f"rewind.step={rewind_step} <= start < end <= train.steps={steps}")
    if every < 1:
        raise ConfigError(f"prune.gradual.every={every} steps must be at least 1")
    last = start + (end - start) // every * every  # the last pruning event
    if last >= steps:
        raise ConfigError(f"prune.gradual: the last pruning step, {last} (start={start}, "
                          f"end={end}, every={every}), is never trained: a level trains steps "
                          f"{rewind_step} to {steps - 1}, so it would end above its target "
                          f"density; use prune.gradual.end={steps - 1} or less (or a longer "
                          "train.steps)")
    return {"start": start, "end": last, "every": every}


def _check_durations(steps: int, eval_every: int, rewind_step: int, steps_per_epoch=None):
    epoch = f" ({steps_per_epoch} steps per epoch)" if steps_per_epoch else ""
    for key, value in (("train.steps", steps), ("train.eval_every", eval_every)):
        if value < 1:
            raise ConfigError(f"{key} is {value} steps{epoch}: it must be at least 1 step")
    if steps > MAX_STEPS:
        raise ConfigError(f"train.steps={steps}{epoch} must be at most 2**31 - 1 = {MAX_STEPS} "
                          "steps: the device counts steps in 32-bit integers")
    if eval_every > steps:
        raise ConfigError(f"train.eval_every={eval_every} must be at most train.steps={steps}"
                          f"{epoch}: a level is evaluated every eval_every steps and at its end")
    if rewind_step >= steps:
        raise ConfigError(f"rewind.step={rewind_step} must be below train.steps={steps}{epoch}: "
                          "the rewind point is a step of the dense training run")


def _check_method(score, schedule, prune_at, structure, scope, branches) -> None:
    """Refuse combinations of pruning choices that have no meaning."""
    if schedule == "gradual":
        if list(branches) != ["ticket"]:
            raise ConfigError(f"prune.schedule=gradual prunes while one network trains, so "
                              f"branches={list(branches)} cannot be built: use branches=[ticket]")
        if score != "magnitude" or prune_at != "trained":
            raise ConfigError("prune.schedule=gradual prunes by the magnitude of the weights as "
                              "they train (Zhu & Gupta 2017): use prune.score=magnitude and "
                              "prune.at=trained")
    if structure != "weights":
        if score not in ("magnitude", "random"):
            raise ConfigError(f"prune.structure={structure} scores whole units by the norm of "
                              f"their weights: use prune.score=magnitude (or random), not {score}")
        if scope == "erk":
            raise ConfigError(f"prune.scope=erk allocates weights per layer; with "
                              f"prune.structure={structure} use layerwise or global")


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Check types, ranges, names and cross-field constraints; raise one `ConfigError`."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    except OmegaConfBaseException as error:  # an interpolation that does not resolve
        where = getattr(error, "full_key", None) or "the config"
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{where} does not resolve: {reason}") from None
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    if raw.get("task") not in (None, "imp"):  # another app's config, e.g. experiment=lm_tiny
        raise ConfigError(f"task={raw['task']!r}: this is a config of `lottery {raw['task']}`, "
                          f"not of the IMP command: run `lottery {raw['task']} ...` instead")
    _known_keys({k: v for k, v in raw.items() if k != "task"}, "")
    dataset, model = _section(raw, "dataset"), _section(raw, "model")
    optimizer, train = _section(raw, "optimizer"), _section(raw, "train")
    prune, rewind, logger = _section(raw, "prune"), _section(raw, "rewind"), _section(raw, "logger")

    _choice(dataset.get("name"), "dataset", DATASETS)
    _choice(model.get("name"), "model", MODELS)
    _choice(optimizer.get("name"), "optimizer", OPTIMIZERS)
    _choice(logger.get("name"), "logger", LOGGERS)
    for where, section in (("train", train), ("prune", prune), ("rewind", rewind)):
        _known_keys(section, where)
    _known_keys(logger, "logger", KEYS["logger"] if logger["name"] == "wandb" else ("name",))
    if logger["name"] == "wandb":
        project, timeout = logger.get("project", "lottery"), logger.get("init_timeout", 60)
        if not isinstance(project, str) or not project:
            raise ConfigError(f"logger.project={project!r} must be a W&B project name")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"logger.init_timeout={timeout!r} must be a positive number of "
                              "seconds")
    name = raw.get("name", "default")
    if isinstance(name, bool) or not isinstance(name, (str, int)) or name == "":
        raise ConfigError(f"name={name!r} must be a non-empty string: it names the output "
                          "folder and the W&B group")

    branches = raw.get("branches")
    if isinstance(branches, str) or not isinstance(branches, (list, tuple)) or not branches:
        raise ConfigError(f"branches={branches!r} must be a non-empty list, e.g. "
                          "'branches=[ticket,reinit,random_prune]'")
    for branch in branches:
        _choice(branch, "branches", BRANCHES)
    if len(set(branches)) != len(branches):
        raise ConfigError(f"branches={list(branches)} names a branch twice")
    if "ticket" not in branches:
        raise ConfigError("branches must include ticket: its trained weights choose each level's masks")

    steps = _duration(train.get("steps"), "train.steps", 1)
    eval_every = _duration(train.get("eval_every"), "train.eval_every", 1)
    rewind_step = _duration(rewind.get("step"), "rewind.step", 0)
    if all(isinstance(v, int) for v in (steps, eval_every, rewind_step)):
        _check_durations(steps, eval_every, rewind_step)  # epochs are checked once data loads
    try:
        build_optimizer(**optimizer, steps_per_epoch=1)
    except OptimizerError as error:
        raise ConfigError(str(error)) from None
    structure = _choice(prune.get("structure", "weights"), "prune.structure", STRUCTURES)
    prunable = MODELS[model["name"]].prunable
    layer_rates = prune.get("layer_rates") or {}
    if not isinstance(layer_rates, dict):
        raise ConfigError(f"prune.layer_rates={layer_rates!r} must map layer names to rates")
    layers = prune.get("layers")
    if layers is not None and (isinstance(layers, str) or not isinstance(layers, (list, tuple))):
        raise ConfigError(f"prune.layers={layers!r} must be a list of layer names or null")
    if layers is not None and not layers:
        raise ConfigError("prune.layers=[] names no layer: give layer names, or null for all")
    why = ": the fraction of the remaining weights removed per level"
    rates = {pattern: _fraction(rate, f"prune.layer_rates.{pattern}", why)
             for pattern, rate in _flatten(layer_rates).items()}  # nested keys: dotted names
    if structure == "weights":  # structure groups are known once the model is built
        rates, layers = _resolve(rates, layers, prunable, model["name"])
    score = _choice(prune.get("score", "magnitude"), "prune.score", SCORES)
    schedule = _choice(prune.get("schedule", "iterative"), "prune.schedule", SCHEDULES)
    prune_at = _choice(prune.get("at", "trained"), "prune.at", PRUNE_AT)
    scope = _choice(prune.get("scope"), "prune.scope", SCOPES)
    rewind_mode = _choice(rewind.get("mode", "weights"), "rewind.mode", REWINDS)
    finetune_lr = rewind.get("finetune_lr")
    if finetune_lr is not None and (isinstance(finetune_lr, bool) or not isinstance(
            finetune_lr, (int, float)) or finetune_lr <= 0):
        raise ConfigError(f"rewind.finetune_lr={finetune_lr!r} must be a positive number, or "
                          "null for the schedule's last learning rate")
    gradual = prune.get("gradual") or {}
    if not isinstance(gradual, dict):
        raise ConfigError(f"prune.gradual={gradual!r} must map start, end and every to durations")
    _known_keys(gradual, "prune.gradual")
    gradual = {"start": gradual.get("start", 0), "end": gradual.get("end"),
               "every": gradual.get("every", 100)}
    for key in ("start", "every"):
        _duration(gradual[key], f"prune.gradual.{key}", 0 if key == "start" else 1)
    if gradual["end"] is not None:
        _duration(gradual["end"], "prune.gradual.end", 1)
    _check_method(score, schedule, prune_at, structure, scope, branches)
    if "shuffle" in branches and schedule == "iterative" and rewind_mode != "weights":
        raise ConfigError(f"branches include shuffle, which permutes the ticket's mask over the "
                          f"whole layer: with rewind.mode={rewind_mode} and iterative pruning it "
                          "would start weights pruned at earlier levels again at exactly 0; use "
                          "random_prune (which then draws among the trained survivors), or "
                          "rewind.mode=weights")
    if schedule == "gradual" and all(
            isinstance(v, int) for v in (steps, rewind_step, *gradual.values()) if v is not None):
        _gradual_steps(gradual, steps, rewind_step)  # epochs are checked once data loads
    score_rounds = prune.get("score_rounds")
    if score_rounds is not None and _int(score_rounds, "prune.score_rounds", 1) > MAX_SCORE_ROUNDS:
        raise ConfigError(f"prune.score_rounds={score_rounds} must be at most "
                          f"{MAX_SCORE_ROUNDS}: every round scores the whole network")
    levels = _int(prune.get("levels"), "prune.levels", 0, " (the number of pruning levels)")
    if levels > MAX_LEVELS:
        raise ConfigError(f"prune.levels={levels} must be at most {MAX_LEVELS}: each level "
                          "trains the network again")
    run = RunConfig(
        name=str(name),
        seed=_seed(raw.get("seed")),
        replicates=_int(raw.get("replicates"), "replicates", 1),
        branches=tuple(branches),
        dataset=dataset, model=model, optimizer=optimizer,
        steps=steps,
        batch_size=_int(train.get("batch_size"), "train.batch_size", 1),
        eval_every=eval_every,
        eval_batch_size=_int(train.get("eval_batch_size", 1000), "train.eval_batch_size", 1),
        members=_choice(train.get("members", "auto"), "train.members", MEMBER_MODES),
        save_weights=_bool(train.get("save_weights", False), "train.save_weights"),
        checkpoint_every=_duration(train.get("checkpoint_every", "5ep"), "train.checkpoint_every", 0),
        levels=levels,
        rate=_fraction(prune.get("rate"), "prune.rate", why),
        scope=scope,
        layer_rates=rates,
        prune_layers=tuple(layers) if layers else None,
        score=score,
        schedule=schedule,
        prune_at=prune_at,
        structure=structure,
        score_batch=_int(prune.get("score_batch", 100), "prune.score_batch", 1),
        score_rounds=(100 if score == "synflow" else 1) if score_rounds is None else
        _int(score_rounds, "prune.score_rounds", 1),
        gradual=gradual,
        rewind_step=rewind_step,
        rewind_mode=rewind_mode,
        finetune_lr=None if finetune_lr is None else float(finetune_lr),
        logger=logger,
        resolved=raw,
    )
    _check_inputs(run)
    return run
