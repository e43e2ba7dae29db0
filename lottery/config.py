"""The run's config: one schema, one validation, every bad input one clear `ConfigError` line.

The schema is the frozen dataclasses below: each section's keys, defaults and what they
mean live here and nowhere else. Hydra composes against them (`schema` makes each one a
structured config, registered in Hydra's `ConfigStore` when this module is imported; the
YAML files in conf/ and the presets in conf/experiment/ override them), and `validate`
turns the composed config into a `RunConfig` of the same dataclasses, with the same names
(`cfg.train.steps`, `cfg.prune.at`, `cfg.rewind.step`, `cfg.prune.gradual.start`), before
anything is loaded or trained; the CLI prints the error and exits with status 2.

Every method owns its options: a schedule (`lottery.pruning.schedules`), a rewind mode
(`lottery.rewind`), the scoring method (`lottery.pruning.select.Method`) and a branch
(`lottery.branches`) check them in their `check` classmethod, which `validate` calls
through the registries. Dataset, model and optimizer options differ per name and are
checked by their readers and builders: those sections are open mappings here.
"""

import re
from dataclasses import MISSING, dataclass, field, fields, make_dataclass, replace
from difflib import get_close_matches
from fnmatch import fnmatchcase
from typing import Any, Dict

import jax
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING as REQUIRED
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lottery.branches import BRANCHES, members_of
from lottery.data import DATASETS, DataError, describe
from lottery.durations import to_steps
from lottery.models import MODELS, ModelError, build_model
from lottery.optim import OptimizerError, build_optimizer
from lottery.options import (ConfigError, boolean, choice, duration, fraction, integer,
                             number, override)
from lottery.platform import MEMBER_MODES
from lottery.precision import PRECISIONS
from lottery.pruning.masks import kernels
from lottery.pruning.prune import PlanError, PrunePlan
from lottery.pruning.schedules import SCHEDULES, StraightThroughSchedule
from lottery.pruning.scores import SCORES
from lottery.pruning.select import Method
from lottery.pruning.structured import StructureError, model_groups
from lottery.rewind import REWINDS

__all__ = ["ConfigError", "RunConfig", "validate"]  # ConfigError lives in lottery.options

SCOPES = ("layerwise", "global", "erk")
PRUNE_AT = ("trained", "init")
STRUCTURES = ("weights", "neurons", "channels", "nm")
DST_INITS = ("erk", "uniform")
STE = (False, True, "sr")
OPTIMIZERS = ("adam", "sgd")
MAX_STEPS = 2**31 - 1  # the device counts steps in int32
MAX_LEVELS = 1000  # each level trains the network again: more is a typo (and would spin the
#                   level counts for ever at a rate too small to empty a layer)
OPEN = {"open": True}  # field metadata: typed `Any` in the schema (its group's options
#                        carry their own schema, as the loggers do)
NOT_CONFIG = {"config": False}  # field metadata: not a config key (RunConfig.resolved)

# ------------------------------------------------------------------------------ the schema
# Each field's comment is its documentation (formerly in the YAML files). Durations are
# steps or "<n>ep" epochs (OpenLTH's notation); `RunConfig.in_steps` makes them steps.


@dataclass(frozen=True)
class MeshConfig:
    """How the devices are laid out (`train.mesh.*`, `lottery.mesh`): where a run computes,
    not what, so it is not part of the run's identity."""

    data: int | str = "auto"  # devices each member's batch is split over (data-parallel);
    #   auto: devices go to spreading the members first, the rest to the batch


@dataclass(frozen=True)
class TrainConfig:
    """How every level trains (`train.*`)."""

    steps: int | str = 5000  # iterations per level (rewound levels train from rewind.step
    #                          to here)
    batch_size: int = 60
    eval_every: int | str = 500  # iterations between evaluations on validation and test
    eval_batch_size: int = 1000
    save_weights: bool = False  # also save each level's trained ticket weights
    #                             (levels/trained_NN.npz)
    checkpoint_every: int | str = "5ep"  # within a level, checkpoint at the first evaluation
    #   this long after the last checkpoint (0: only between levels); a rerun resumes there
    members: str = "auto"  # how each device runs its members: vmap (batched) | map (one by
    #   one); auto: map on CPU when a device holds several members or the model has
    #   convolutions (faster there), vmap elsewhere
    precision: str = "fp32"  # fp32 | bf16: matmuls and activations in bfloat16; weights,
    #   optimizer state and masks stay float32 (pruned weights exactly zero)
    mesh: MeshConfig = field(default_factory=MeshConfig)


@dataclass(frozen=True)
class GradualConfig:
    """The cubic schedule s_t = s_f (1 - (1 - (t - start) / (end - start))^3) of
    prune.schedule=gradual (Zhu & Gupta 2017); checked by `schedules.Gradual`."""

    start: int | str = 0  # first pruning step (at or after rewind.step)
    end: int | str | None = None  # last pruning step, where the level's density is reached
    #                               (null: half-way)
    every: int | str = 100  # steps between pruning events


@dataclass(frozen=True)
class DstConfig:
    """Dynamic sparse training (prune.schedule=set|rigl, Mocanu et al. 2018, Evci et al.
    2020) and its static baseline (static); checked by `schedules.DynamicSparse`."""

    every: int | str = 100  # steps between mask updates (ΔT)
    fraction: float = 0.3  # α: an update at step t drops α (1 + cos(π t / stop)) / 2 of
    #                        each layer's active weights and grows as many
    stop: int | str | None = None  # no update from this step on (null: 75% of train.steps)
    init: str = "erk"  # erk | uniform: how the level's density is split over the layers


@dataclass(frozen=True)
class PruneConfig:
    """Pruning (`prune.*`): which units (structure), scored how (score, at), how many per
    layer (scope, rate, layer_rates), and when (schedule). Defaults: iterative magnitude
    pruning (conf/prune/imp.yaml)."""

    levels: int = 3
    rate: float = 0.2  # fraction of the remaining weights (or units) removed per level
    scope: str = "layerwise"  # layerwise | global (one threshold over the pooled layers) |
    #   erk (the pool's total split by Erdős–Rényi-Kernel, Evci et al. 2020)
    layer_rates: dict | None = None  # per-layer exceptions by layer name or pattern, e.g.
    #   {out: 0.1, "convs.*": 0.1}; 0 keeps a layer dense. Validated: every matched layer's
    #   rate (weights), by name or pattern (structures)
    layers: tuple[str, ...] | None = None  # layers (names or patterns like "stage*") to
    #   prune (null: all the model's prunable layers); biases never
    score: str = "magnitude"  # magnitude | random | snip (Lee et al. 2019) | grasp (Wang et
    #   al. 2020) | synflow (Tanaka et al. 2020; data-free, score_rounds rounds)
    at: str = "trained"  # trained: score the previous level's trained ticket (IMP);
    #   init: score the rewind weights (pruning at initialisation)
    schedule: str = "iterative"  # iterative: level l prunes level l-1's ticket by `rate`;
    #   oneshot: level l prunes the dense network straight to level l's density;
    #   gradual: level l trains once, pruning as it trains (Zhu & Gupta 2017);
    #   static | set | rigl: level l trains once at its density from a random mask, fixed
    #   (static) or dropping and growing weights as it trains (SET, RigL; prune.dst)
    structure: str = "weights"  # weights | neurons (of dense layers) | channels (of
    #   convolutions): whole units scored by the norm of their weights; `layers` then names
    #   structure groups (a producing layer, or stageS.stream in a ResNet) | nm: N:M
    #   sparsity of the weights (see `nm`)
    score_batch: int = 100  # training examples seen by snip and grasp
    score_rounds: int | None = None  # scoring rounds per pruning, density falling
    #   geometrically (null: the score's own, 100 for synflow as in its paper, 1 otherwise)
    gradual: GradualConfig = field(default_factory=GradualConfig)
    nm: tuple[int, int] = (2, 4)  # prune.structure=nm: keep N of every M consecutive weights
    #   along each kernel's input dimension (convolutions: input channels), for each output
    #   unit and position, ranked by any `score` within each group (lottery.pruning.nm).
    #   Level 1 prunes to N:M and a level cannot go below it: levels must be at most 1
    #   (gradual: N':M states from M:M down to N:M). `rate` is unused; scope must be
    #   layerwise; a layer_rates rate may only be 0 (the layer stays dense). Every pruned
    #   layer's inputs must be a multiple of M (else: leave it dense, or another M).
    ste: bool | str = False  # true: straight-through pruning (the forward pass uses the pruned
    #   weights, the dense weights take the gradient; masks chosen again at every step);
    #   sr: SR-STE (Zhou et al. 2021), which also decays the pruned weights by sr_decay
    sr_decay: float = 2e-4  # SR-STE's λ_W
    dst: DstConfig = field(default_factory=DstConfig)


@dataclass(frozen=True)
class RewindConfig:
    """How each pruned level retrains (`rewind.*`; modes in `lottery.rewind`).
      weights:  rewind the surviving weights to step `step` of the dense run: 0 is the
                initialisation (Frankle & Carbin 2019); k > 0 late rewinding (Frankle et al.
                2020).
      lr:       keep the trained weights, replay the learning-rate schedule from step `step`
                (learning-rate rewinding, Renda et al. 2020).
      finetune: keep the trained weights, train train.steps - step steps at a constant rate
                `finetune_lr` (null: the schedule's last rate, as Renda et al. 2020
                fine-tune)."""

    step: int | str = 0
    mode: str = "weights"
    finetune_lr: float | None = None


@dataclass(frozen=True)
class NoLogger:
    """logger=none: only the local record (record.jsonl in the run's output directory)."""

    name: str = "none"


@dataclass(frozen=True)
class WandbLogger:
    """logger=wandb: the local record plus Weights & Biases, offline unless $WANDB_MODE says
    otherwise (`wandb sync <run dir>/wandb/offline-run-*` uploads later). group = name,
    job_type = branch."""

    name: str = "wandb"
    project: str = "lottery"
    init_timeout: float = 60  # seconds to wait for W&B to start


LOGGERS = {"none": NoLogger, "wandb": WandbLogger}


@dataclass(frozen=True)
class RunConfig:
    """The whole run (conf/config.yaml), its fields in the order Hydra composes them."""

    dataset: dict = field(default_factory=dict)  # name + the reader's options (conf/dataset/)
    model: dict = field(default_factory=dict)  # name + the builder's options (conf/model/)
    optimizer: dict = field(default_factory=dict)  # name + its options (conf/optimizer/)
    prune: PruneConfig = field(default_factory=PruneConfig)
    rewind: RewindConfig = field(default_factory=RewindConfig)
    logger: NoLogger | WandbLogger = field(default_factory=NoLogger, metadata=OPEN)
    name: str = "default"  # experiment name: W&B group and output folder
    seed: int = 0
    replicates: int = 2  # independent networks per branch (different seeds)
    branches: tuple[str, ...] = ("ticket", "reinit", "random_prune")
    train: TrainConfig = field(default_factory=TrainConfig)
    resolved: dict = field(default_factory=dict, metadata=NOT_CONFIG)  # the whole resolved
    #   config as composed (a plain dict's left-out keys at their defaults), for the record,
    #   W&B and the run's identity (lottery.identity)

    @property
    def stack_size(self) -> int:
        return self.replicates * len(members_of(self.branches))

    def in_steps(self, steps_per_epoch: int) -> "RunConfig":
        """This config with every duration in steps (epochs are `steps_per_epoch` steps),
        checked again now that epochs are known."""
        def steps(value):
            return None if value is None else to_steps(value, steps_per_epoch)

        train, gradual, dst = self.train, self.prune.gradual, self.prune.dst
        run = replace(
            self,
            train=replace(train, steps=steps(train.steps), eval_every=steps(train.eval_every),
                          checkpoint_every=steps(train.checkpoint_every)),
            rewind=replace(self.rewind, step=steps(self.rewind.step)),
            prune=replace(self.prune, gradual=replace(
                gradual, start=steps(gradual.start), end=steps(gradual.end),
                every=steps(gradual.every)),
                dst=replace(dst, every=steps(dst.every), stop=steps(dst.stop))))
        _check_durations(run.train.steps, run.train.eval_every, run.rewind.step,
                         steps_per_epoch)
        _check_methods(run)
        return run

    def prune_plan(self, names: tuple[str, ...]) -> PrunePlan:
        """The plan over `names` (the model's prunable layers, or its structure groups).
        Layerwise: every chosen name at `rate` unless `layer_rates` names it. Global and ERK:
        the chosen names not in `layer_rates` form one pool at `rate`."""
        prune = self.prune
        nm = prune.structure == "nm"
        rates, layers = _resolve(prune.layer_rates, prune.layers, names, self.model["name"],
                                 "weights" if nm else prune.structure)
        layers = layers or names
        if nm:  # N of every M in each chosen layer; a rate of 0 leaves one dense (unpruned)
            n, m = prune.nm
            return PrunePlan({layer: 1 - n / m for layer in layers if rates.get(layer) != 0},
                             nm=prune.nm)
        scope = SCHEDULES[prune.schedule].scope(prune)  # dynamic sparse training: dst.init
        if scope == "layerwise":
            return PrunePlan({layer: rates.get(layer, prune.rate) for layer in layers})
        own = {layer: rate for layer, rate in rates.items() if layer in layers}
        return PrunePlan(own, tuple(layer for layer in layers if layer not in own), prune.rate,
                         erk=scope == "erk")


def keys(cls) -> tuple[str, ...]:
    """The config keys of a schema dataclass."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("config", True))


_SCHEMAS = {}


def schema(cls):
    """`cls` as a Hydra structured config: the same keys, order and defaults, not frozen (so
    that overrides merge into it), each value typed `Any`. OmegaConf's typed nodes would
    convert silently (`true` or `1` to a float, "2" to a bool, 5 to "5"), changing what a
    user wrote (and the run's identity) and answering a bad value with a multi-line
    message: `validate` checks every value instead (`train=5` too). Nested sections default
    to their schemas; mappings stay open (`Dict[str, Any]`)."""
    if cls not in _SCHEMAS:
        specs = []
        for f in fields(cls):
            if not f.metadata.get("config", True):
                continue
            factory = f.default_factory
            if f.metadata.get("open"):
                specs.append((f.name, Any, field(default=REQUIRED)))  # its group sets it
            elif factory is dict:
                specs.append((f.name, Dict[str, Any], field(default_factory=dict)))
            elif factory is not MISSING:
                specs.append((f.name, Any, field(default_factory=schema(factory))))
            elif isinstance(f.default, tuple):
                specs.append((f.name, Any, field(default_factory=lambda d=f.default: list(d))))
            else:
                specs.append((f.name, Any, field(default=f.default)))
        _SCHEMAS[cls] = make_dataclass(cls.__name__, specs)
    return _SCHEMAS[cls]


def register() -> None:
    """The schema in Hydra's ConfigStore: `run_schema`, the base of conf/config.yaml's
    defaults list, and `schema/logger/<name>`, the base of each conf/logger/<name>.yaml."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=schema(RunConfig))
    for name, cls in LOGGERS.items():
        store.store(group="schema/logger", name=name, node=schema(cls))


register()

# -------------------------------------------------------------------------------- validate


def section_of(cfg: dict, key: str, default=None) -> dict:
    """The mapping at `key` of `cfg` (`default` when absent); a value that is not one is a
    `ConfigError`."""
    value = cfg.get(key, default)
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a config group or mapping, got {value!r}")
    return value


def unknown_key(path: str, cls) -> str:
    """The message for `path` (dotted), which is not a key of the schema `cls`."""
    where, _, key = path.rpartition(".")
    known = keys(cls)
    close = get_close_matches(key, known, n=1)
    hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
    return (f"{path} is not a config key{hint}; the keys of {where or 'the config'} are "
            f"{', '.join(known)}")


def _schema_at(path: str, root=None):
    """The schema dataclass of the section at dotted `path` ("" the root) of `root` (a
    root schema, RunConfig unless given), or None."""
    cls = root or RunConfig
    for name in filter(None, path.split(".")):
        factory = {f.name: f.default_factory for f in fields(cls)}.get(name)
        if factory is None or factory is MISSING or factory is dict:
            return None
        cls = factory
    return cls


def unknown_in_file(error: Exception, root=None) -> str | None:
    """One line for a config file (a preset, a group option) that sets a key the schema
    `root` (RunConfig unless given) does not have, which Hydra refuses while composing; None
    for any other error."""
    root = root or RunConfig
    key_error = error.__context__
    path = getattr(key_error, "full_key", None)
    if not isinstance(key_error, ConfigKeyError) or not path:
        return None
    source = re.match(r"In '([^']+)'", str(error))
    option = source.group(1) if source else None
    if path == "task" and "task" not in keys(root):  # an LM preset given to the IMP command
        command = f"lottery lm {option.replace('/', '=', 1)}" if option else "lottery lm ..."
        return (f"{option or 'the config'} sets task, so it is a config of another command "
                f"(task: lm: `lottery lm`), not of the IMP command: run `{command}` instead")
    cls = _schema_at(path.rpartition(".")[0], root)
    if cls is None:
        return None
    return (f"{option}.yaml: " if option else "") + unknown_key(path, cls)


def unknown_override(error: Exception, root=None) -> str | None:
    """One line for a command-line override of a key the schema `root` (RunConfig unless
    given) does not have (`prune.scor=x`), which Hydra refuses while composing: the key and
    the nearest one; None for any other error."""
    cause = error.__cause__
    path = getattr(cause, "full_key", None)
    if not str(error).startswith("Could not override") or not path or not isinstance(
            cause, (ConfigAttributeError, ConfigKeyError)):
        return None
    cls = _schema_at(path.rpartition(".")[0], root)
    if cls is None or path.rpartition(".")[2] in keys(cls):
        return None
    return unknown_key(path, cls)


def filled(cls, section: dict, where: str) -> dict:
    """`section` on the defaults of `cls`, refusing a key that nothing reads
    (`+train.stepz=5`): it would be silently ignored."""
    for key in section:
        if key not in keys(cls):
            raise ConfigError(unknown_key(f"{where}.{key}" if where else str(key), cls))
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    return {**defaults, **section}


def with_defaults(raw: dict, cls) -> dict:
    """`raw` with every key of the schema `cls` that it leaves out at its default, sections
    within too, as Hydra composes them (a tuple as a list); keys it has are kept as they are.
    A plain dict and the composed config that mean the same are then the same run
    (`lottery.identity`)."""
    out = dict(raw)
    for f in fields(cls):
        if not f.metadata.get("config", True) or f.metadata.get("open"):
            continue
        factory = f.default_factory
        if factory is dict:  # an open section (dataset, model, optimizer): its group's
            continue  #        options, not the schema's
        if factory is not MISSING:
            if f.name not in out:
                out[f.name] = with_defaults({}, factory)
            elif isinstance(out[f.name], dict):
                out[f.name] = with_defaults(out[f.name], factory)
        elif f.name not in out:
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


_SPECS = {}  # (model, input shape, classes, options) -> its abstract ModelSpec: a command
#               validates twice
_KERNELS = {}  # the same keys -> the shapes of its prunable kernels (prune.structure=nm)


def unit_groups(structure: str, model) -> tuple:
    """The groups of units (`lottery.pruning.structured`) that `prune.structure` removes from
    `model` (a ModelSpec); one `ConfigError` where it has none."""
    try:
        return model_groups(model, structure)
    except StructureError as error:
        kinds = sorted({group.kind for group in model.groups}) or ["weights"]
        fix = override("prune.structure", kinds[0])
        raise ConfigError(f"prune.structure={structure}: {error}: use {fix}",
                          key="prune.structure", fix=fix) from None


def _check_inputs(cfg: RunConfig) -> None:
    """The dataset's options and sizes, the model against the dataset's input shape, and the
    pruned layers or units against the model, without loading any data (the model is built
    abstractly: no weights are made)."""
    name = cfg.dataset["name"]
    try:
        data = describe(name, **{k: v for k, v in cfg.dataset.items() if k != "name"})
    except DataError as error:
        raise ConfigError(str(error)) from None
    if data is None:  # a dataset known only once it loads: setup.build checks it then
        return
    if cfg.train.batch_size > data.train_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the "
                          f"{data.train_size} training examples of {name}: use a smaller batch")
    options = {k: v for k, v in cfg.model.items() if k != "name"}
    key = (cfg.model["name"], data.input_shape, data.num_classes, repr(sorted(options.items())))
    if key not in _SPECS:
        try:
            _SPECS[key] = build_model(cfg.model["name"], data.input_shape, data.num_classes,
                                      **options)
        except ModelError as error:
            raise ConfigError(str(error)) from None
    if cfg.prune.structure == "nm":  # every N:M layer's inputs in groups of M
        spec = _SPECS[key]
        if key not in _KERNELS:
            params = jax.eval_shape(spec.init, jax.random.key(0))[0]
            _KERNELS[key] = {layer: tuple(k.shape)
                             for layer, k in kernels(params, spec.prunable).items()}
        plan = cfg.prune_plan(spec.prunable)
        try:
            plan.counts(_KERNELS[key], cfg.prune.levels)
        except PlanError as error:
            fitting = [layer for layer in plan.layers
                       if _KERNELS[key][layer][-2] % cfg.prune.nm[1] == 0]
            if not fitting:
                raise ConfigError(str(error), key="prune.nm") from None
            fix = f"prune.layers=[{','.join(fitting)}]"
            raise ConfigError(f"{error}; {fix} prunes the layers that fit", key="prune.layers",
                              fix=fix) from None
    elif cfg.prune.structure != "weights":  # the weights' names were matched by `_prune`
        groups = unit_groups(cfg.prune.structure, _SPECS[key])
        cfg.prune_plan(tuple(group.name for group in groups))


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


def _matching(pattern, prunable) -> list[str]:
    """The prunable layers (or structure groups) a name or shell-style pattern (`convs.*`,
    `stage?.*.conv1`) names."""
    return [layer for layer in prunable if fnmatchcase(layer, str(pattern))]


def _no_such(key: str, missing: list, kept: list, prunable, model: str, structure: str):
    """The error for names in `key` (prune.layers or prune.layer_rates) that match none of
    `prunable`, with the override that removes them: `~key.name` each, or `key=null` (or
    `prune.layers=[kept]`) where every name misses or a name is a pattern."""
    what = "prunable layer" if structure == "weights" else f"{structure[:-1]} group"
    extra = ("" if structure == "weights" else
             "; an output layer's units are the classes: never removed")
    if key == "prune.layers":
        fix = override(key, kept or None)
    elif kept and all(re.fullmatch(r"\w+", str(name)) for name in missing):
        fix = " ".join(f"~{key}.{name}" for name in missing)
    else:
        fix = override(key, None)
    names = ", ".join(repr(str(name)) for name in missing)
    them = "it" if len(missing) == 1 else "them"
    return ConfigError(f"{key} names {names}, not a {what} of {model} (its {what}s are "
                       f"{', '.join(prunable)}{extra}): drop {them} with {fix}", key=key, fix=fix)


def _resolve(layer_rates: dict, layers, prunable, model: str, structure: str = "weights"):
    """`(layer_rates, layers)` with their names and patterns matched against `prunable`: an
    exact name beats any pattern, wherever it is listed."""
    if layers is not None:
        missing = [pattern for pattern in layers if not _matching(pattern, prunable)]
        if missing:
            kept = [pattern for pattern in layers if pattern not in missing]
            raise _no_such("prune.layers", missing, kept, prunable, model, structure)
        matched = {hit for pattern in layers for hit in _matching(pattern, prunable)}
        layers = tuple(layer for layer in prunable if layer in matched)
    missing = [pattern for pattern in layer_rates if not _matching(pattern, prunable)]
    if missing:
        kept = [pattern for pattern in layer_rates if pattern not in missing]
        raise _no_such("prune.layer_rates", missing, kept, prunable, model, structure)
    rates = {}
    for pattern, rate in layer_rates.items():
        hits = [hit for hit in _matching(pattern, prunable) if layers is None or hit in layers]
        if not hits:
            raise ConfigError(f"prune.layer_rates names {pattern}, which prune.layers="
                              f"{list(layers)} leaves out")
        exact = pattern in prunable
        rates.update({hit: rate for hit in hits if exact or hit not in layer_rates})
    return rates, layers


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


def _check_methods(cfg: RunConfig) -> None:
    """Every method's own checks, through the registries. Each registered schedule and rewind
    mode checks its options even when another is chosen (a bad value fails today, not the
    day it is used); the chosen one also checks them against the rest of the config."""
    for name, schedule in SCHEDULES.items():
        schedule.check(cfg, chosen=name == cfg.prune.schedule)
    StraightThroughSchedule.check(cfg, chosen=bool(cfg.prune.ste))
    for name, mode in REWINDS.items():
        mode.check(cfg, chosen=name == cfg.rewind.mode)
    Method.check(cfg)
    for branch in cfg.branches:
        BRANCHES[branch].check(cfg)


def _check_structure(prune: PruneConfig) -> None:
    """Refuse pruning whole units (or N:M groups) by a score, an allocation or a number of
    levels that has no meaning for them."""
    if prune.structure == "weights":
        return
    if prune.structure == "nm":
        _check_nm(prune)
        return
    if prune.score not in ("magnitude", "random"):
        raise ConfigError(f"prune.structure={prune.structure} scores whole units by the norm "
                          f"of their weights: use prune.score=magnitude (or random), not "
                          f"{prune.score}")
    if prune.scope == "erk":
        raise ConfigError(f"prune.scope=erk allocates weights per layer; with "
                          f"prune.structure={prune.structure} use layerwise or global")


def _check_nm(prune: PruneConfig) -> None:
    n, m = prune.nm
    if prune.scope != "layerwise":
        raise ConfigError(f"prune.scope={prune.scope} allocates a density over the layers, but "
                          f"prune.structure=nm keeps {n} of every {m} weights in every pruned "
                          "layer: use prune.scope=layerwise", key="prune.scope",
                          fix="prune.scope=layerwise")
    for layer, rate in prune.layer_rates.items():
        if rate != 0:
            raise ConfigError(f"prune.layer_rates gives {layer} the rate {rate}, but with "
                              f"prune.structure=nm every pruned layer keeps {n} of every {m} "
                              f"weights: a rate can only be 0 (the layer stays dense); use "
                              f"prune.layer_rates.{layer}=0, or prune.layer_rates=null to "
                              "prune every layer N:M", key="prune.layer_rates",
                              fix="prune.layer_rates=null")
    if prune.levels > 1:
        raise ConfigError(f"prune.levels={prune.levels}: with prune.structure=nm level 1 prunes "
                          f"to {n}:{m} and a level cannot go below N:M: use prune.levels=1",
                          key="prune.levels", fix="prune.levels=1")


def resolved(cfg) -> dict:
    """A composed config (or a plain dict) as a plain dict, resolved, without `hydra`; an
    interpolation that does not resolve is one `ConfigError` line."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    except OmegaConfBaseException as error:  # an interpolation that does not resolve
        where = getattr(error, "full_key", None) or "the config"
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{where} does not resolve: {reason}") from None
    return {k: v for k, v in raw.items() if k != "hydra"}


def _resolved(cfg) -> dict:
    raw = resolved(cfg)
    if raw.get("task") not in (None, "imp"):  # another app's config, e.g. experiment=lm_tiny
        raise ConfigError(f"task={raw['task']!r}: this is a config of `lottery {raw['task']}`, "
                          f"not of the IMP command: run `lottery {raw['task']} ...` instead")
    return raw


def _train(section: dict) -> TrainConfig:
    train = filled(TrainConfig, section, "train")
    return TrainConfig(
        steps=duration(train["steps"], "train.steps", 1),
        batch_size=integer(train["batch_size"], "train.batch_size", 1),
        eval_every=duration(train["eval_every"], "train.eval_every", 1),
        eval_batch_size=integer(train["eval_batch_size"], "train.eval_batch_size", 1),
        save_weights=boolean(train["save_weights"], "train.save_weights"),
        checkpoint_every=duration(train["checkpoint_every"], "train.checkpoint_every", 0),
        members=choice(train["members"], "train.members", MEMBER_MODES),
        precision=choice(train["precision"], "train.precision", PRECISIONS),
        mesh=_mesh(train.get("mesh", {})))  # a plain dict may leave the section out


def _mesh(section) -> MeshConfig:
    if not isinstance(section, dict):
        raise ConfigError(f"train.mesh={section!r} must map data to auto or a device count")
    data = filled(MeshConfig, section, "train.mesh")["data"]
    if data != "auto":
        data = integer(data, "train.mesh.data", 1, " or auto")
    return MeshConfig(data)


RATE = ": the fraction of the remaining weights removed per level"


def _prune(section: dict, model: str) -> PruneConfig:
    prune = filled(PruneConfig, section, "prune")
    gradual = {} if prune.get("gradual") is None else prune["gradual"]
    if not isinstance(gradual, dict):
        raise ConfigError(f"prune.gradual={gradual!r} must map start, end and every to durations")
    structure = choice(prune["structure"], "prune.structure", STRUCTURES)
    layer_rates, layers = prune["layer_rates"] or {}, prune["layers"]
    if not isinstance(layer_rates, dict):
        raise ConfigError(f"prune.layer_rates={layer_rates!r} must map layer names to rates")
    if layers is not None and (isinstance(layers, str) or not isinstance(layers, (list, tuple))):
        raise ConfigError(f"prune.layers={layers!r} must be a list of layer names or null")
    if layers is not None and not layers:
        raise ConfigError("prune.layers=[] names no layer: give layer names, or null for all")
    rates = {pattern: fraction(rate, f"prune.layer_rates.{pattern}", RATE)
             for pattern, rate in _flatten(layer_rates).items()}  # nested keys: dotted names
    if structure in ("weights", "nm"):  # layers; structure groups: once the model is built
        rates, layers = _resolve(rates, layers, MODELS[model].prunable, model)
    levels = integer(prune["levels"], "prune.levels", 0, " (the number of pruning levels)")
    if levels > MAX_LEVELS:
        raise ConfigError(f"prune.levels={levels} must be at most {MAX_LEVELS}: each level "
                          "trains the network again")
    return PruneConfig(
        nm=_nm(prune["nm"]), ste=_ste(prune["ste"]),
        sr_decay=number(prune["sr_decay"], "prune.sr_decay", 0, float("inf"), "[)"),
        dst=_dst(prune.get("dst")),
        levels=levels, rate=fraction(prune["rate"], "prune.rate", RATE),
        scope=choice(prune["scope"], "prune.scope", SCOPES), layer_rates=rates,
        layers=tuple(layers) if layers else None,
        score=choice(prune["score"], "prune.score", SCORES),
        at=choice(prune["at"], "prune.at", PRUNE_AT),
        schedule=choice(prune["schedule"], "prune.schedule", SCHEDULES), structure=structure,
        score_batch=prune["score_batch"], score_rounds=prune["score_rounds"],
        gradual=GradualConfig(**filled(GradualConfig, gradual, "prune.gradual")))


def _nm(value) -> tuple[int, int]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"prune.nm={value!r} must be [N, M], e.g. prune.nm=[2,4]")
    n, m = integer(value[0], "prune.nm", 1, " (N of [N, M])"), integer(value[1], "prune.nm", 2,
                                                                     " (M of [N, M])")
    if n >= m:
        raise ConfigError(f"prune.nm=[{n},{m}] must keep fewer than all: N < M, e.g. [2,4]")
    return n, m


def _ste(value):
    if value not in STE or isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(f"prune.ste={value!r} must be false, true or sr")
    return value


def _dst(section) -> DstConfig:
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(f"prune.dst={section!r} must map every, fraction, stop and init")
    dst = filled(DstConfig, section, "prune.dst")
    return DstConfig(every=duration(dst["every"], "prune.dst.every", 1),
                     fraction=number(dst["fraction"], "prune.dst.fraction", 0, 1, "(]"),
                     stop=None if dst["stop"] is None else duration(dst["stop"],
                                                                    "prune.dst.stop", 1),
                     init=choice(dst["init"], "prune.dst.init", DST_INITS))


def _rewind(section: dict) -> RewindConfig:
    rewind = filled(RewindConfig, section, "rewind")
    return RewindConfig(step=duration(rewind["step"], "rewind.step", 0),
                        mode=choice(rewind["mode"], "rewind.mode", REWINDS),
                        finetune_lr=rewind["finetune_lr"])


def logger_config(section: dict) -> NoLogger | WandbLogger:
    """The checked `logger` section (also `lottery lm`'s)."""
    cls = LOGGERS[choice(section.get("name"), "logger", LOGGERS)]
    logger = cls(**filled(cls, section, "logger"))
    if isinstance(logger, WandbLogger):
        if not isinstance(logger.project, str) or not logger.project:
            raise ConfigError(f"logger.project={logger.project!r} must be a W&B project name")
        if isinstance(logger.init_timeout, bool) or not isinstance(
                logger.init_timeout, (int, float)) or logger.init_timeout <= 0:
            raise ConfigError(f"logger.init_timeout={logger.init_timeout!r} must be a positive "
                              "number of seconds")
    return logger


def _top(raw: dict) -> dict:
    """The top-level values, checked."""
    top = filled(RunConfig, {k: v for k, v in raw.items() if k != "task"}, "")
    name = top["name"]
    if isinstance(name, bool) or not isinstance(name, (str, int)) or name == "":
        raise ConfigError(f"name={name!r} must be a non-empty string: it names the output "
                          "folder and the W&B group")
    branches = top["branches"]
    if isinstance(branches, str) or not isinstance(branches, (list, tuple)) or not branches:
        raise ConfigError(f"branches={branches!r} must be a non-empty list, e.g. "
                          "'branches=[ticket,reinit,random_prune]'")
    for branch in branches:
        choice(branch, "branches", BRANCHES)
    if len(set(branches)) != len(branches):
        raise ConfigError(f"branches={list(branches)} names a branch twice")
    if "ticket" not in branches:
        raise ConfigError("branches must include ticket: its trained weights choose each "
                          "level's masks")
    seed = integer(top["seed"], "seed", 0)
    if seed >= 2**32:
        raise ConfigError(f"seed={seed} must be below 2**32")
    return {"name": str(name), "seed": seed, "branches": tuple(branches),
            "replicates": integer(top["replicates"], "replicates", 1)}


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Check types, ranges, names and cross-field constraints; raise one `ConfigError`. `cfg`
    is a composed config, or a plain dict (missing keys take the schema's defaults)."""
    raw = _resolved(cfg)
    top = _top(raw)
    dataset, model = section_of(raw, "dataset"), section_of(raw, "model")
    optimizer = section_of(raw, "optimizer")
    choice(dataset.get("name"), "dataset", DATASETS)
    choice(model.get("name"), "model", MODELS)
    choice(optimizer.get("name"), "optimizer", OPTIMIZERS)
    logger = logger_config(section_of(raw, "logger", {"name": "none"}))
    train = _train(section_of(raw, "train", {}))
    rewind = _rewind(section_of(raw, "rewind", {}))
    if all(isinstance(v, int) for v in (train.steps, train.eval_every, rewind.step)):
        _check_durations(train.steps, train.eval_every, rewind.step)  # epochs: once data loads
    try:
        build_optimizer(**optimizer, steps_per_epoch=1)
    except OptimizerError as error:
        raise ConfigError(str(error)) from None
    prune = _prune(section_of(raw, "prune", {}), model["name"])
    run = RunConfig(dataset=dataset, model=model, optimizer=optimizer, prune=prune,
                    rewind=rewind, logger=logger, train=train,
                    resolved=with_defaults(raw, RunConfig), **top)
    _check_methods(run)  # first: a schedule that cannot prune the structure says so
    _check_structure(prune)
    _check_inputs(run)
    return run
