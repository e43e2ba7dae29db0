"""What a run is built from: its config in steps, data, model, pruning method and trainer.

`build(cfg)` loads the data and builds every piece once, refusing an impossible schedule
with a `ConfigError` before anything trains; the level loop (`lottery.imp`) only calls them.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import jax

from lottery.branches import BRANCHES, branch_of, members_of
from lottery.config import ConfigError, RunConfig, unit_groups
from lottery.data import STREAMED, Dataset, StreamedDataset, load_dataset
from lottery.level_start import LevelPrograms, level_programs
from lottery.mesh import MeshError
from lottery.models import ModelSpec, build_model
from lottery.optim import OptimizerError, build_optimizer
from lottery.pruning.prune import PlanError, PrunePlan
from lottery.pruning.schedules import Schedule, in_words, schedule_of, structure_words
from lottery.pruning.select import Method
from lottery.pruning.units import NM, Structures, Weights
from lottery.rewind import REWINDS
from lottery.state import Layout, Network
from lottery.train import Trainer


@dataclass(frozen=True)
class Setup:
    cfg: RunConfig  # every duration in steps
    data: Dataset | StreamedDataset
    model: ModelSpec
    plan: PrunePlan
    units: Weights | NM | Structures  # what a level prunes: weights, N:M groups of them,
    #                                  neurons or channels
    counts: list  # Counts of units kept at each level 0..levels
    weights: dict[str, int]  # prunable weights per layer
    measured: tuple[str, ...]  # the layers whose remaining weights make up `density`
    chunk: int  # steps per compiled training call: gcd(eval_every, steps, rewind step)
    trainer: Trainer
    layout: Layout  # which rows of the stack are which branch and replicate
    schedule: Schedule
    method: Method
    rewind: object  # a `lottery.rewind.REWINDS` mode

    @cached_property
    def programs(self) -> LevelPrograms:
        """The compiled programs that start a level (`lottery.level_start`), made once."""
        return level_programs(self)

    @cached_property
    def hooks(self) -> list:
        """The hooks of the branches and the schedule that have them, made once."""
        hooks = [BRANCHES[b].hooks(self) for b in self.cfg.branches]
        return [hook for hook in hooks + [self.schedule.level_hooks(self)] if hook]

    @property
    def uses_inverted(self) -> bool:
        return any(branch_of(b).uses_inverted for b in self.layout.branches)


def _options(section: dict) -> dict:
    return {key: value for key, value in section.items() if key != "name"}


def _units(cfg: RunConfig, model: ModelSpec) -> tuple[PrunePlan, object, tuple[str, ...]]:
    """The plan, the units it prunes (`Weights`, `NM` or `Structures`), and the layers
    whose remaining weights make up `density`: the pruned ones (N:M: with those it leaves
    dense), or every prunable layer where whole units go (their consumers lose inputs)."""
    prune = cfg.prune
    if prune.structure == "weights":
        plan = cfg.prune_plan(model.prunable)
        return plan, Weights(plan.layers), plan.layers
    if prune.structure == "nm":
        plan = cfg.prune_plan(model.prunable)
        return plan, NM(plan.layers, *prune.nm), prune.layers or model.prunable
    groups = unit_groups(prune.structure, model)
    plan = cfg.prune_plan(tuple(group.name for group in groups))
    return (plan, Structures(tuple(group for group in groups if group.name in plan.layers)),
            model.prunable)


def _check_streamable(cfg: RunConfig) -> None:
    """Refuse what a run on a streamed dataset (`lottery.data.stream`) cannot do yet."""
    if "instability" in cfg.branches:  # its error barrier reads a resident test set
        raise ConfigError(f"branches=instability is not supported on the streamed dataset "
                          f"{cfg.dataset['name']} yet: drop it from branches, or use a "
                          "dataset held in memory")


def build(cfg: RunConfig, devices=None) -> Setup:
    """Load the data and build everything a run needs, on `devices` (default: all of the
    run's); refuses impossible schedules."""
    if cfg.dataset["name"] in STREAMED:
        _check_streamable(cfg)  # before reading the folder
    data = load_dataset(cfg.dataset["name"], **_options(cfg.dataset))
    streamed = isinstance(data, StreamedDataset)
    train_size = data.train_size if streamed else len(data.x_train)
    if cfg.train.batch_size > train_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the "
                          f"{train_size} training examples of {data.name}")
    model = build_model(cfg.model["name"], data.input_shape, data.num_classes,
                        **_options(cfg.model))
    params = Network(*jax.eval_shape(model.init, jax.random.key(0))).params
    plan, units, measured = _units(cfg, model)
    try:
        counts = plan.counts(units.shapes(params), cfg.prune.levels)
    except PlanError as error:
        raise ConfigError(str(error)) from None
    steps_per_epoch = train_size // cfg.train.batch_size
    cfg = cfg.in_steps(steps_per_epoch)
    chunk = math.gcd(cfg.train.eval_every, cfg.train.steps, cfg.rewind.step)
    try:
        optimizer = build_optimizer(**cfg.optimizer, steps_per_epoch=steps_per_epoch)
    except OptimizerError as error:
        raise ConfigError(str(error)) from None
    schedule = schedule_of(cfg)
    train = cfg.train
    try:
        trainer = Trainer(model, optimizer, data, train.batch_size, chunk, cfg.stack_size,
                          train.eval_batch_size, train.members,
                          schedule.step_hooks(units, plan, counts, optimizer), train.mesh.data,
                          train.precision, devices)
    except MeshError as error:
        raise ConfigError(str(error)) from None
    rewind = REWINDS[cfg.rewind.mode].from_config(cfg)
    return Setup(cfg, data, model, plan, units, counts, model.param_counts(params), measured,
                 chunk, trainer,
                 Layout(members_of(cfg.branches), cfg.replicates), schedule,
                 schedule.method(Method.from_config(cfg)), rewind)


def describe(setup: Setup) -> str:
    """The pruning method in words, for the log."""
    prune = setup.cfg.prune
    if setup.schedule.own_words:  # not scored pruning: its own words
        return f"{in_words(prune)}; {setup.rewind.describe()}"
    return (f"{prune.schedule} {prune.scope} pruning of {structure_words(prune)} by {prune.score} "
            f"scores of the {'initial' if prune.at == 'init' else 'trained'} network; "
            f"{setup.rewind.describe()}")
