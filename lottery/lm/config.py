"""The `lottery lm` config: its schema and `validate`, on the IMP engine's config floor.

The schema is the frozen dataclasses below (each section's keys, defaults and what they
mean), made Hydra structured configs by `lottery.config.schema` and registered in Hydra's
`ConfigStore` as `lm_schema`, the base of conf/lm.yaml's defaults list, when this module is
imported; the LM presets in conf/experiment/ (`task: lm`) override them. `validate` turns
the composed config into an `LMConfig` of the same dataclasses with the same names
(`cfg.prune.score`, `cfg.budget.exact`, `cfg.finetune.kd_alpha`, `cfg.measure.batch`), plus
what the run derives from them: `dense_model` (the `gpt.GPTConfig`), `budget_kind` and
`targets`. A bad value is one `lottery.options.ConfigError` line naming the key, checked
with `lottery.options`' helpers, as the IMP config is.

Checked here: sizes and step counts, fractions, the score method, structure, variant and
baseline names, the budget (exactly one kind; a parameter budget below the dense model's
size and above the smallest model the chosen structures can reach), and an explicit
`prune.remove` request (through `compact.check_masks`: no layer may lose all its heads or
FFN units). A latency budget is checked against the measured dense model when the run
starts (`budget.check_latency`).
"""

import re
from dataclasses import dataclass, field, replace

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lottery.config import (NOT_CONFIG, OPEN, NoLogger, WandbLogger, filled, logger_config,
                            resolved, schema, section_of)
from lottery.lm import gpt, prune
from lottery.lm.compact import check_masks
from lottery.lm.scores import METHODS
from lottery.options import (ConfigError, boolean, choice, integer, names, number,
                             optional_text, positive)

__all__ = ["ConfigError", "LMConfig", "validate"]  # ConfigError lives in lottery.options

VARIANTS = ("prune", "prune_kd")
BASELINES = ("scratch", "ticket")
BUDGETS = ("params_fraction", "max_params", "min_tokens_per_second")

# ------------------------------------------------------------------------------ the schema
# Each field's comment is its documentation (formerly in conf/lm.yaml).


@dataclass(frozen=True)
class DataConfig:
    """The corpus (`data.*`); its held-out tail is cut in two: "val" (early stop), "test"."""

    source: str = "stdlib"  # the Python standard library's source, or a path to a text file
    max_bytes: int = 4000000
    validation_fraction: float = 0.05  # the held-out tail: first half "val" (early stop),
    #                                    second "test"
    eval_windows: int = 128  # fixed windows of each of val and test


@dataclass(frozen=True)
class ModelConfig:
    """The dense model (`model.*`): `layers` equal pre-LN blocks, byte vocabulary; or a
    pretrained model (`path` or `name`, `lottery.llm`), its sizes from its config.json."""

    layers: int = 4
    d_model: int = 128
    heads: int = 4
    head_dim: int | None = None  # null: d_model / heads
    ffn: int = 512
    context: int = 64  # training and evaluation windows (tokens; a pretrained model's too)
    path: str | None = None  # a pretrained model's folder in the Hugging Face layout
    name: str | None = None  # or its hub name (downloaded into the Hugging Face cache)
    revision: str | None = None  # the hub revision (branch, tag or commit)


@dataclass(frozen=True)
class PretrainConfig:
    """The dense model's training (`pretrain.*`); also the scratch and ticket controls'
    schedule."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 3.0e-3  # Adam, warmup then cosine decay to 10%
    warmup: int = 100
    eval_every: int = 250


@dataclass(frozen=True)
class PruneConfig:
    """Each round's removal (`prune.*`)."""

    score: str = "taylor"  # weight | taylor | wanda (lottery/lm/scores.py)
    structures: tuple[str, ...] = ("heads", "ffn")  # any of heads, ffn, layers
    fraction: float = 0.2  # of each kind's surviving units removed per round
    score_batches: int = 4  # batches (finetune.batch_size) the scores see
    max_rounds: int = 20
    remove: dict | None = None  # removed before the first round, e.g. {heads: {0: [1, 2]},
    #                             layers: [3]}


@dataclass(frozen=True)
class FinetuneConfig:
    """After each round (`finetune.*`): fresh Adam, warmup then cosine decay."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 1.0e-3
    warmup: int = 10
    eval_every: int = 50
    kd_alpha: float = 0.5  # prune_kd: alpha * T^2 KL(teacher || student) + (1 - alpha) * LM loss
    kd_temperature: float = 2.0


@dataclass(frozen=True)
class BudgetConfig:
    """The deployment budget (`budget.*`): exactly one of params_fraction, max_params and
    min_tokens_per_second; a list gives several targets from one trajectory."""

    params_fraction: float | tuple[float, ...] | None = (0.5, 0.25)  # of the dense model's
    #                                                                  parameters
    max_params: int | tuple[int, ...] | None = None
    min_tokens_per_second: float | tuple[float, ...] | None = None  # measured forward
    #                                                   throughput of the compacted model
    exact: bool = True  # parameter budgets: the round that would pass a target removes only
    #   what reaching it needs (lands within one FFN unit); false: whole rounds


@dataclass(frozen=True)
class MeasureConfig:
    """Tokens/s (`measure.*`): forward passes of (batch, model.context)."""

    batch: int = 32
    repeats: int = 5


@dataclass(frozen=True)
class LMConfig:
    """The whole `lottery lm` run (conf/lm.yaml), its fields in the order Hydra composes
    them; after them, what `validate` derives (not config keys)."""

    logger: NoLogger | WandbLogger = field(default_factory=NoLogger, metadata=OPEN)
    task: str = "lm"  # marks LM configs and presets (the IMP command refuses them)
    name: str = "lm"  # experiment name: W&B group and output folder (outputs/lm/<name>/)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    variants: tuple[str, ...] = VARIANTS  # prune: LM loss; prune_kd: distilled from the dense
    #                                       model (finetune.kd_*)
    baselines: tuple[str, ...] = BASELINES  # controls for each target the first variant reached
    quantize: bool = True  # int8 (per output channel) of every result
    save: str | None = None  # a pretrained model: a folder for the models that meet a target
    #                          (<save>/<variant>/round-<r>, Hugging Face layout)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    resolved: dict = field(default_factory=dict, metadata=NOT_CONFIG)  # the whole resolved
    #   config as composed, for the record, W&B and the run's identity (lottery.identity)
    dense_model: gpt.GPTConfig | None = field(default=None, metadata=NOT_CONFIG)  # `model`;
    #   a pretrained model's `lottery.llm.spec.ModelSpec` (None until a hub model is fetched)
    budget_kind: str = field(default="params", metadata=NOT_CONFIG)  # or "tokens_per_second"
    targets: tuple[float, ...] = field(default=(), metadata=NOT_CONFIG)  # absolute: parameter
    #   counts (descending) or tokens/s (ascending)


ConfigStore.instance().store(name="lm_schema", node=schema(LMConfig))

# -------------------------------------------------------------------------------- validate


SIZES = ("layers", "d_model", "heads", "head_dim", "ffn")  # a pretrained model's come from
#                                                           its config.json


def _pretrained(section: dict, sizes: ModelConfig):
    """(ModelConfig, its `ModelSpec`) of a pretrained model given by model.path (read now),
    (ModelConfig, None) for one given by model.name (read when the run downloads it), or
    None for the byte model. `sizes`: the checked byte-model keys (`pretrained_checks`
    compares them with the checkpoint's)."""
    from lottery.llm import hf

    m = filled(ModelConfig, section, "model")
    path = optional_text(m["path"], "model.path")
    name, revision = optional_text(m["name"], "model.name"), optional_text(m["revision"],
                                                                           "model.revision")
    if not path and not name:
        return None
    model = replace(sizes, path=path, name=name, revision=revision)
    if not path:
        return model, None
    try:
        return model, hf.read_spec(hf.locate(path))
    except hf.CheckpointError as error:
        raise ConfigError(f"model.path: {error}", key="model.path") from None


def pretrained_checks(cfg: "LMConfig", spec) -> tuple[str, tuple[float, ...]]:
    """The budget's (kind, targets) for a pretrained model of `spec`, and what it cannot
    take: sizes other than its own (a size key may keep its default, or say the
    checkpoint's: a preset written for the same model), windows longer than its context,
    head removal from GPT-2, `prune.remove`."""
    from lottery.llm import compact, model

    own = {"layers": spec.layers, "d_model": spec.d_model, "heads": spec.heads,
           "head_dim": spec.head_dim, "ffn": spec.ffn}
    for key in SIZES:
        value = getattr(cfg.model, key)
        if value not in (getattr(ModelConfig, key), own[key]):
            raise ConfigError(f"model.{key}={value} differs from the pretrained model's "
                              f"{own[key]} (its config.json); leave model.{key} out",
                              key=f"model.{key}")
    if cfg.model.context > spec.context:
        raise ConfigError(f"model.context={cfg.model.context} exceeds the pretrained model's "
                          f"context of {spec.context} tokens; give a shorter window",
                          key="model.context")
    if spec.family == "gpt2" and "heads" in cfg.prune.structures:
        raise ConfigError(f"prune.structures: {compact.GPT2_HEADS}; use "
                          "prune.structures=[ffn,layers]", key="prune.structures")
    if cfg.prune.remove:
        raise ConfigError("prune.remove is for the byte model; a pretrained model's rounds "
                          "choose what they remove", key="prune.remove")
    chosen = cfg.prune.structures
    smallest = model.param_count(compact.resized(
        spec, 1 if "heads" in chosen else spec.kv_heads, 1 if "ffn" in chosen else spec.ffn,
        spec.layers - 1 if "layers" in chosen else 0))
    budget = {k: getattr(cfg.budget, k) for k in BUDGETS}
    return _targets(budget, model.param_count(spec), smallest, cfg.prune.structures)


def _model(section: dict) -> tuple[ModelConfig, gpt.GPTConfig]:
    m = filled(ModelConfig, section, "model")
    layers = integer(m["layers"], "model.layers", 1)
    heads = integer(m["heads"], "model.heads", 1)
    d = integer(m["d_model"], "model.d_model", 1)
    head_dim = m["head_dim"]
    if head_dim is None and d % heads:
        raise ConfigError(f"model.d_model={d} is not a multiple of model.heads={heads}; "
                          "set model.head_dim")
    head_dim = d // heads if head_dim is None else integer(head_dim, "model.head_dim", 1)
    model = ModelConfig(layers=layers, d_model=d, heads=heads, head_dim=m["head_dim"],
                        ffn=integer(m["ffn"], "model.ffn", 1),
                        context=integer(m["context"], "model.context", 1))
    try:
        dense = gpt.GPTConfig(256, model.context, d, head_dim, (heads,) * layers,
                              (model.ffn,) * layers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return model, dense


def smallest_params(model: gpt.GPTConfig, structures) -> int:
    """Parameters of the smallest model that pruning `structures` can reach."""
    layers = 1 if "layers" in structures else model.layers
    heads = 1 if "heads" in structures else model.heads[0]
    ffn = 1 if "ffn" in structures else model.ffn[0]
    return gpt.param_count(gpt.GPTConfig(model.vocab, model.context, model.d_model,
                                         model.head_dim, (heads,) * layers, (ffn,) * layers))


def _remove(remove, model: gpt.GPTConfig):
    """An explicit removal the model can take, or None."""
    if not remove:
        return None
    try:
        check_masks(model, prune.request_masks(model, remove))
    except (gpt.PruneRequestError, TypeError, ValueError, AttributeError) as error:
        message = re.sub(r"remove the layer with masks\['layers'\]\[(\d+)\] = 0 \(or pass "
                         r"allow_empty_layers=True[^)]*\)",
                         r"remove the whole layer with prune.remove.layers=[\1]", str(error))
        raise ConfigError(f"prune.remove: {message}") from None
    return remove


def _targets(b: dict, dense: int, smallest: int, structures
             ) -> tuple[str, tuple[float, ...]]:
    given = {k: b[k] for k in BUDGETS if b[k] is not None}
    if len(given) != 1:
        raise ConfigError("set exactly one of budget.params_fraction, budget.max_params, "
                          f"budget.min_tokens_per_second (got {', '.join(given) or 'none'})")
    key, value = next(iter(given.items()))
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(f"budget.{key} is empty; give a number or a list of numbers")
    if key == "min_tokens_per_second":
        return "tokens_per_second", tuple(sorted(
            float(positive(v, f"budget.{key}", " (tokens/s)")) for v in values))
    if key == "params_fraction":
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1:
                raise ConfigError(f"budget.params_fraction={v} is not below 1: the dense model "
                                  f"({dense:,} parameters) already meets it; use a fraction "
                                  "in (0, 1)")
        counts = [number(v, f"budget.{key}", 0, 1) * dense for v in values]
    else:
        counts = []
        for v in values:
            count = integer(v, f"budget.{key}", 1)
            if count >= dense:
                raise ConfigError(f"budget.max_params={count:,} is larger than the model "
                                  f"({dense:,} parameters): nothing to prune; give fewer")
            counts.append(count)
    if min(counts) < smallest:
        raise ConfigError(f"budget of {min(counts):,.0f} parameters cannot be reached by "
                          f"pruning {'+'.join(structures)}: the smallest such model has "
                          f"{smallest:,} (the embeddings are never pruned)")
    return "params", tuple(sorted(counts, reverse=True))


def _frozen(value):
    """A list as a tuple (a validated config is hashable where it can be)."""
    return tuple(value) if isinstance(value, list) else value


def _phase(cls, section: dict, where: str) -> dict:
    """A training phase's keys, checked (pretrain, or finetune's first five)."""
    p = filled(cls, section, where)
    return {"steps": integer(p["steps"], f"{where}.steps", 1),
            "batch_size": integer(p["batch_size"], f"{where}.batch_size", 1),
            "lr": number(p["lr"], f"{where}.lr", 0, 1, "(]"),
            "warmup": integer(p["warmup"], f"{where}.warmup", 0),
            "eval_every": integer(p["eval_every"], f"{where}.eval_every", 1)}


def validate(cfg: DictConfig | dict) -> LMConfig:
    """The checked config, or `ConfigError` with one line saying what to fix. `cfg` is a
    composed config, or a plain dict (missing keys take the schema's defaults)."""
    raw = resolved(cfg)
    if raw.get("task") != "lm":
        raise ConfigError(f"this is not a `lottery lm` config (task={raw.get('task')!r}); "
                          "use an LM preset such as experiment=transformer_budget")
    top = filled(LMConfig, raw, "")
    model, dense = _model(section_of(raw, "model", {}))
    pretrained = _pretrained(section_of(raw, "model", {}), model)
    if pretrained:
        model, dense = pretrained  # dense: its ModelSpec (None until a hub model is fetched)
    p = filled(PruneConfig, section_of(raw, "prune", {}), "prune")
    structures = names(p["structures"], "prune.structures", prune.STRUCTURES)
    score = choice(p["score"], "prune.score", METHODS)
    remove = p["remove"] if pretrained else _remove(p["remove"], dense)
    b = filled(BudgetConfig, section_of(raw, "budget", {}), "budget")
    kind, targets = ("params", ()) if pretrained else _targets(
        b, gpt.param_count(dense), smallest_params(dense, structures), structures)
    pretrain = PretrainConfig(**_phase(PretrainConfig, section_of(raw, "pretrain", {}),
                                       "pretrain"))
    f = filled(FinetuneConfig, section_of(raw, "finetune", {}), "finetune")
    finetune = FinetuneConfig(
        **_phase(FinetuneConfig, f, "finetune"),
        kd_alpha=number(f["kd_alpha"], "finetune.kd_alpha", 0, 1, "[]"),
        kd_temperature=number(f["kd_temperature"], "finetune.kd_temperature", 0, 100, "(]"))
    variants = names(top["variants"], "variants", VARIANTS)
    baselines = names(top["baselines"], "baselines", BASELINES, empty=True)
    d = filled(DataConfig, section_of(raw, "data", {}), "data")
    if not isinstance(d["source"], str) or not d["source"]:
        raise ConfigError(f"data.source={d['source']!r} must be 'stdlib' or a file path")
    data = DataConfig(
        source=d["source"], max_bytes=integer(d["max_bytes"], "data.max_bytes", 1),
        validation_fraction=number(d["validation_fraction"], "data.validation_fraction", 0,
                                   0.5),
        eval_windows=integer(d["eval_windows"], "data.eval_windows", 1))
    m = filled(MeasureConfig, section_of(raw, "measure", {}), "measure")
    save = optional_text(top["save"], "save")
    if save and not pretrained:
        raise ConfigError("save is for a pretrained model (model.path); a byte model is "
                          "written as a GPT-2 checkpoint by lottery.lm.export", key="save")
    checked = LMConfig(
        logger=logger_config(section_of(raw, "logger", {"name": "none"})), task="lm",
        name=str(top["name"]), seed=integer(top["seed"], "seed", 0), data=data, model=model,
        pretrain=pretrain,
        prune=PruneConfig(score=score, structures=structures,
                          fraction=number(p["fraction"], "prune.fraction", 0, 1),
                          score_batches=integer(p["score_batches"], "prune.score_batches", 1),
                          max_rounds=integer(p["max_rounds"], "prune.max_rounds", 1),
                          remove=remove),
        finetune=finetune,
        budget=BudgetConfig(**{k: _frozen(b[k]) for k in BUDGETS},
                            exact=boolean(b["exact"], "budget.exact")),
        variants=variants, baselines=baselines,
        quantize=boolean(top["quantize"], "quantize"), save=save,
        measure=MeasureConfig(batch=integer(m["batch"], "measure.batch", 1),
                              repeats=integer(m["repeats"], "measure.repeats", 1)),
        resolved=raw, dense_model=dense, budget_kind=kind, targets=targets)
    if pretrained and dense is not None:
        kind, targets = pretrained_checks(checked, dense)
        checked = replace(checked, budget_kind=kind, targets=targets)
    return checked
