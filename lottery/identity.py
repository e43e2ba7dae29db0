"""A run's identity: a short hash of its resolved config, so that the same config always
lands in the same output directory (and W&B name), and a repeated command or sweep finds
its finished runs instead of redoing them.

    run_id(cfg)            # a composed DictConfig (with or without the `hydra` node) or the
                           # resolved dict (`RunConfig.resolved`): the same 10 hex digits
    ${lottery_id:}         # the same id inside a Hydra config (conf/config.yaml: run.dir,
                           # sweep.subdir); registered when this module is imported

The hash covers everything that can change a run's results; it leaves out the `hydra` node
(output paths, launcher, sweeper: where and how a run is launched, not what it computes) and
`logger` (whether rows are mirrored to W&B), and `train.mesh` (how the devices are laid
out: the same results to float tolerance). It hashes the config normalised, so that two
spellings of the same config are one run:
  - keys are sorted, so the order in which overrides were given does not matter;
  - an empty mapping is null: `prune.layer_rates=null`, `prune.layer_rates={}` and a preset's
    rates all deleted (`~prune.layer_rates.out`) set no rate alike (null is the canonical
    form, so the ids of configs that never held an empty mapping are those from before);
  - a key left out is its default: Hydra composes every key of the schema, and
    `config.validate` fills the defaults into a plain dict's `RunConfig.resolved`.
  - a key added since ids were first published (`LATER`) counts only when it is not at its
    default, so that the runs of older versions keep their ids.
A value's spelling still counts (`train.steps=1000` and `train.steps=1000ep` are different
configs even where they mean the same number of steps).
"""

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

RESOLVER = "lottery_id"
IGNORED = ("hydra", "logger")  # top-level keys that cannot change a run's results
PLACEMENT = ("mesh",)  # train.* keys that say where a run computes (devices), not what
# keys added after run ids were first published, by section, hashed only when they differ
# from their default: a run that does not use them keeps the id it always had
LATER = {"train": {"precision": "fp32"},
         "prune": {"nm": [2, 4], "ste": False, "sr_decay": 2e-4,
                   "dst": {"every": 100, "fraction": 0.3, "stop": None, "init": "erk"}}}
# the same for one task's configs ("" = top-level keys): `lottery lm`'s pretrained models
LATER_BY_TASK = {"lm": {"": {"save": None},
                        "model": {"path": None, "name": None, "revision": None}}}
LENGTH = 10  # hex digits: 40 bits, no collision in any realistic number of runs


def _resolved(config) -> dict:
    """The config as a plain dict, resolved, without the `hydra` node. The node is dropped
    before resolving: its run/sweep dirs interpolate `${lottery_id:}` themselves."""
    if isinstance(config, DictConfig):
        raw = OmegaConf.to_container(config, resolve=False)
        raw.pop("hydra", None)
        return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    return dict(config)


def _normal(value):
    """`value` with every empty mapping, at any depth, as None (null)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()} or None
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def _drop_defaults(section: dict, later: dict) -> dict:
    """`section` without the `later` keys that hold their default."""
    return {k: v for k, v in section.items()
            if not (k in later and _normal(v) == _normal(later[k]))}


def run_id(config) -> str:
    """10 hex digits of sha256 over the canonical JSON of the resolved config, less `IGNORED`,
    empty mappings as null."""
    content = {k: _normal(v) for k, v in _resolved(config).items() if k not in IGNORED}
    later_by_section = {**LATER, **LATER_BY_TASK.get(content.get("task"), {})}
    content = _drop_defaults(content, later_by_section.get("", {}))
    for section, later in later_by_section.items():
        if section and isinstance(content.get(section), dict):
            content[section] = _drop_defaults(
                {k: v for k, v in content[section].items()
                 if not (section == "train" and k in PLACEMENT)}, later)
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:LENGTH]


def _lottery_id(*, _root_: DictConfig) -> str:
    # Hydra resolves hydra.run.dir (a single run) and hydra.sweep.subdir (each sweep job, in
    # the launcher's worker process) with `_root_` = the whole config of that job, `hydra`
    # node included; run_id drops the node, so both give the id of the task config alone.
    return run_id(_root_)


if not OmegaConf.has_resolver(RESOLVER):
    # Launchers (joblib, submitit) carry registered resolvers to their workers in Hydra's
    # singleton state, pickling this function by reference (the worker imports this module).
    OmegaConf.register_new_resolver(RESOLVER, _lottery_id, use_cache=False)
