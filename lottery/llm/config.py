"""The `lottery llm` config: its schema (Hydra structured configs, registered as
`llm_schema`, the base of conf/llm.yaml) and `validate` -> `LLMConfig`, on the same floor as
`lottery` and `lottery lm` (`lottery.config.schema`, `lottery.options`' checks: a bad value
is one `ConfigError` line naming the key).

    lottery llm model.path=DIR prune.method=sparsegpt prune.sparsity=2:4 \\
        calibration.path=c4.txt eval.path=wiki.test.raw save=pruned/
"""

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lottery.config import (NOT_CONFIG, OPEN, NoLogger, WandbLogger, filled, logger_config,
                            resolved, schema, section_of)
from lottery.llm import rules
from lottery.llm.oneshot import METHODS
from lottery.options import ConfigError, boolean, choice, integer, number, optional_text

__all__ = ["ConfigError", "LLMConfig", "validate"]
SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """The pretrained model (`model.*`): a local folder in the Hugging Face layout, or a
    hub name downloaded into the Hugging Face cache."""

    path: str | None = None  # a folder with config.json, *.safetensors, tokenizer.json
    name: str | None = None  # a hub name, e.g. meta-llama/Llama-2-7b-hf (when path is null)
    revision: str | None = None  # the hub revision (branch, tag or commit)


@dataclass(frozen=True)
class PruneConfig:
    """One-shot pruning (`prune.*`), layer by layer (lottery/llm/oneshot.py)."""

    method: str = "wanda"  # magnitude | wanda | sparsegpt
    sparsity: str | float = 0.5  # a fraction in [0, 1), or N:M (2:4, 4:8: keep N of every M)
    block: int = 128  # sparsegpt: columns per lazy block update
    damp: float = 0.01  # sparsegpt: dampening, a fraction of the mean Hessian diagonal


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration text (`calibration.*`): `samples` windows of `length` tokens at random
    starts (C4 in the papers, 128 windows of 2048 tokens)."""

    path: str | None = None  # a text file or a datasets split name:config:split
    samples: int = 128
    length: int | None = None  # null: the model's context
    batch: int = 8  # windows per forward pass


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity (`eval.*`) on consecutive windows of `length` tokens (WikiText-2 test in
    the papers, windows of the model's context)."""

    path: str | None = None  # a text file or a datasets split; null: no evaluation
    length: int | None = None  # null: the model's context
    max_windows: int | None = None  # null: every window
    batch: int = 8
    dense: bool = True  # also evaluate the unpruned model


@dataclass(frozen=True)
class LLMConfig:
    """The whole `lottery llm` run (conf/llm.yaml)."""

    logger: NoLogger | WandbLogger = field(default_factory=NoLogger, metadata=OPEN)
    task: str = "llm"
    name: str = "llm"  # experiment name: W&B group and output folder (outputs/llm/<name>/)
    seed: int = 0  # calibration windows and mask ties
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: str | None = None  # a folder for the pruned model (Hugging Face layout)
    save_dtype: str | None = None  # float32 | float16 | bfloat16; null: the checkpoint's
    resolved: dict = field(default_factory=dict, metadata=NOT_CONFIG)
    sparsity: rules.Sparsity | None = field(default=None, metadata=NOT_CONFIG)  # parsed


ConfigStore.instance().store(name="llm_schema", node=schema(LLMConfig))


def _text(value, key: str) -> str | None:
    return optional_text(value, key, "a path")


def _length(value, key: str) -> int | None:
    return None if value is None else integer(value, key, 2)


def validate(cfg: DictConfig | dict) -> LLMConfig:
    """The checked config, or `ConfigError` with one line saying what to fix."""
    raw = resolved(cfg)
    if raw.get("task") != "llm":
        raise ConfigError(f"this is not a `lottery llm` config (task={raw.get('task')!r})")
    top = filled(LLMConfig, raw, "")
    m = filled(ModelConfig, section_of(raw, "model", {}), "model")
    model = ModelConfig(_text(m["path"], "model.path"), _text(m["name"], "model.name"),
                        _text(m["revision"], "model.revision"))
    if not model.path and not model.name:
        raise ConfigError("give model.path=DIR (a model folder in the Hugging Face layout) "
                          "or model.name=ID (a hub name)", key="model.path")
    if model.path and not (Path(model.path).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.path={model.path} has no config.json; give a model folder "
                          "in the Hugging Face layout (config.json, *.safetensors, "
                          "tokenizer.json)", key="model.path")
    p = filled(PruneConfig, section_of(raw, "prune", {}), "prune")
    try:
        sparsity = rules.parse_sparsity(p["sparsity"])
    except ValueError as error:
        raise ConfigError(f"prune.sparsity: {error}") from None
    prune = PruneConfig(choice(p["method"], "prune.method", METHODS), p["sparsity"],
                        integer(p["block"], "prune.block", 1),
                        number(p["damp"], "prune.damp", 0, 1, "(]"))
    c = filled(CalibrationConfig, section_of(raw, "calibration", {}), "calibration")
    calibration = CalibrationConfig(_text(c["path"], "calibration.path"),
                                    integer(c["samples"], "calibration.samples", 1),
                                    _length(c["length"], "calibration.length"),
                                    integer(c["batch"], "calibration.batch", 1))
    if calibration.path is None and prune.method != "magnitude":
        raise ConfigError(f"prune.method={prune.method} needs calibration text: give "
                          "calibration.path=FILE", key="calibration.path")
    e = filled(EvalConfig, section_of(raw, "eval", {}), "eval")
    evaluation = EvalConfig(_text(e["path"], "eval.path"), _length(e["length"], "eval.length"),
                            None if e["max_windows"] is None
                            else integer(e["max_windows"], "eval.max_windows", 1),
                            integer(e["batch"], "eval.batch", 1),
                            boolean(e["dense"], "eval.dense"))
    save_dtype = (None if top["save_dtype"] is None
                  else choice(top["save_dtype"], "save_dtype", SAVE_DTYPES))
    return LLMConfig(
        logger=logger_config(section_of(raw, "logger", {"name": "none"})), task="llm",
        name=str(top["name"]), seed=integer(top["seed"], "seed", 0), model=model, prune=prune,
        calibration=calibration, eval=evaluation, save=_text(top["save"], "save"),
        save_dtype=save_dtype, resolved=raw, sparsity=sparsity)
