"""The `lottery lm` config (conf/lm.yaml) checked into an `LMConfig`: one clear
`LMConfigError` line for each bad request, before anything is trained.

Checked here: sizes and step counts, fractions in (0, 1), the score method, structure,
variant and baseline names, the budget (exactly one kind; a parameter budget below the
dense model's size and above the smallest model the chosen structures can reach), and an
explicit `prune.remove` request (through `compact.check_masks`: no layer may lose all its
heads or FFN units). A latency budget is checked against the measured dense model when the
run starts (`budget.check_latency`).
"""

import re
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from lottery.lm import gpt, prune
from lottery.lm.compact import check_masks
from lottery.lm.scores import METHODS

VARIANTS = ("prune", "prune_kd")
BASELINES = ("scratch", "ticket")


class LMConfigError(ValueError):
    """A bad `lottery lm` request."""


@dataclass(frozen=True)
class Phase:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    eval_every: int


@dataclass(frozen=True)
class LMConfig:
    name: str
    seed: int
    source: str
    max_bytes: int
    validation_fraction: float
    eval_windows: int
    model: gpt.GPTConfig
    pretrain: Phase
    finetune: Phase
    kd_alpha: float
    kd_temperature: float
    score: str
    structures: tuple[str, ...]
    fraction: float
    score_batches: int
    max_rounds: int
    remove: dict | None
    budget_kind: str  # "params" or "tokens_per_second"
    targets: tuple[float, ...]  # absolute: parameter counts (descending) or tokens/s (ascending)
    exact_budget: bool  # parameter budgets: the round crossing a target lands on it
    variants: tuple[str, ...]
    baselines: tuple[str, ...]
    quantize: bool
    measure_batch: int
    measure_repeats: int
    logger: dict
    resolved: dict


def _positive_int(value, where: str, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise LMConfigError(f"{where}={value!r} must be a {'non-negative' if zero else 'positive'}"
                            " integer")
    return value


def _number(value, where: str, low: float, high: float, closed: str = "()") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value >= low if closed[0] == "[" else value > low) and \
            (value <= high if closed[1] == "]" else value < high)
    if not ok:
        raise LMConfigError(f"{where}={value!r} must be a number in {closed[0]}{low}, "
                            f"{high}{closed[1]}")
    return float(value)


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise LMConfigError(f"{where}={value!r} must be true or false")
    return value


def _names(value, where: str, allowed, empty: bool = False) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else list(value or [])
    bad = [v for v in values if v not in allowed]
    if bad:
        raise LMConfigError(f"{where}: unknown name(s) {', '.join(map(repr, bad))}; choose "
                            f"from {', '.join(allowed)}")
    if not values and not empty:
        raise LMConfigError(f"{where} is empty; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def _phase(section: dict, where: str) -> Phase:
    return Phase(_positive_int(section["steps"], f"{where}.steps"),
                 _positive_int(section["batch_size"], f"{where}.batch_size"),
                 _number(section["lr"], f"{where}.lr", 0, 1, "(]"),
                 _positive_int(section["warmup"], f"{where}.warmup", zero=True),
                 _positive_int(section["eval_every"], f"{where}.eval_every"))


def _model(m: dict) -> gpt.GPTConfig:
    layers = _positive_int(m["layers"], "model.layers")
    heads = _positive_int(m["heads"], "model.heads")
    d = _positive_int(m["d_model"], "model.d_model")
    head_dim = m.get("head_dim") or (d // heads if d % heads == 0 else None)
    if head_dim is None:
        raise LMConfigError(f"model.d_model={d} is not a multiple of model.heads={heads}; "
                            "set model.head_dim")
    return gpt.GPTConfig(256, _positive_int(m["context"], "model.context"), d,
                         _positive_int(head_dim, "model.head_dim"), (heads,) * layers,
                         (_positive_int(m["ffn"], "model.ffn"),) * layers)


def smallest_params(model: gpt.GPTConfig, structures) -> int:
    """Parameters of the smallest model that pruning `structures` can reach."""
    layers = 1 if "layers" in structures else model.layers
    heads = 1 if "heads" in structures else model.heads[0]
    ffn = 1 if "ffn" in structures else model.ffn[0]
    return gpt.param_count(gpt.GPTConfig(model.vocab, model.context, model.d_model,
                                         model.head_dim, (heads,) * layers, (ffn,) * layers))


def _targets(b: dict, model: gpt.GPTConfig, structures) -> tuple[str, tuple[float, ...]]:
    given = {k: b.get(k) for k in ("params_fraction", "max_params", "min_tokens_per_second")
             if b.get(k) is not None}
    if len(given) != 1:
        raise LMConfigError("set exactly one of budget.params_fraction, budget.max_params, "
                            f"budget.min_tokens_per_second (got {', '.join(given) or 'none'})")
    key, value = next(iter(given.items()))
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise LMConfigError(f"budget.{key} is empty; give a number or a list of numbers")
    dense = gpt.param_count(model)
    if key == "min_tokens_per_second":
        return "tokens_per_second", tuple(sorted(
            _number(v, f"budget.{key}", 0, float("inf")) for v in values))
    if key == "params_fraction":
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1:
                raise LMConfigError(f"budget.params_fraction={v} is not below 1: the dense model "
                                    f"({dense:,} parameters) already meets it; use a fraction "
                                    "in (0, 1)")
        counts = [_number(v, f"budget.{key}", 0, 1) * dense for v in values]
    else:
        counts = []
        for v in values:
            count = _positive_int(v, f"budget.{key}")
            if count >= dense:
                raise LMConfigError(f"budget.max_params={count:,} is larger than the model "
                                    f"({dense:,} parameters): nothing to prune; give fewer")
            counts.append(count)
    smallest = smallest_params(model, structures)
    if min(counts) < smallest:
        raise LMConfigError(f"budget of {min(counts):,.0f} parameters cannot be reached by "
                            f"pruning {'+'.join(structures)}: the smallest such model has "
                            f"{smallest:,} (the embeddings are never pruned)")
    return "params", tuple(sorted(counts, reverse=True))


def validate(cfg: DictConfig) -> LMConfig:
    """The checked config, or `LMConfigError` with one line saying what to fix."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    if resolved.get("task") != "lm":
        raise LMConfigError(f"this is not a `lottery lm` config (task={resolved.get('task')!r}); "
                            "use an LM preset such as experiment=transformer_budget")
    try:
        model = _model(resolved["model"])
    except ValueError as error:
        raise LMConfigError(str(error)) from None
    d, p, f = resolved["data"], resolved["prune"], resolved["finetune"]
    structures = _names(p["structures"], "prune.structures", prune.STRUCTURES)
    score = p["score"]
    if score not in METHODS:
        raise LMConfigError(f"prune.score: unknown method {score!r}; choose from "
                            f"{', '.join(METHODS)}")
    remove = p.get("remove")
    if remove:
        try:
            check_masks(model, prune.request_masks(model, remove))
        except (gpt.PruneRequestError, TypeError, ValueError, AttributeError) as error:
            message = re.sub(r"remove the layer with masks\['layers'\]\[(\d+)\] = 0 \(or pass "
                             r"allow_empty_layers=True[^)]*\)",
                             r"remove the whole layer with prune.remove.layers=[\1]", str(error))
            raise LMConfigError(f"prune.remove: {message}") from None
    kind, targets = _targets(resolved["budget"], model, structures)
    pretrain = _phase(resolved["pretrain"], "pretrain")
    finetune = _phase(f, "finetune")
    if not 0 <= f["kd_alpha"] <= 1:
        raise LMConfigError(f"finetune.kd_alpha={f['kd_alpha']!r} must be in [0, 1]")
    variants = _names(resolved["variants"], "variants", VARIANTS)
    baselines = _names(resolved["baselines"], "baselines", BASELINES, empty=True)
    if not isinstance(d["source"], str) or not d["source"]:
        raise LMConfigError(f"data.source={d['source']!r} must be 'stdlib' or a file path")
    return LMConfig(
        name=str(resolved["name"]), seed=_positive_int(resolved["seed"], "seed", zero=True),
        source=d["source"], max_bytes=_positive_int(d["max_bytes"], "data.max_bytes"),
        validation_fraction=_number(d["validation_fraction"], "data.validation_fraction", 0,
                                    0.5),
        eval_windows=_positive_int(d["eval_windows"], "data.eval_windows"),
        model=model, pretrain=pretrain, finetune=finetune,
        kd_alpha=float(f["kd_alpha"]),
        kd_temperature=_number(f["kd_temperature"], "finetune.kd_temperature", 0, 100, "(]"),
        score=score, structures=structures,
        fraction=_number(p["fraction"], "prune.fraction", 0, 1),
        score_batches=_positive_int(p["score_batches"], "prune.score_batches"),
        max_rounds=_positive_int(p["max_rounds"], "prune.max_rounds"),
        remove=remove or None, budget_kind=kind, targets=targets,
        exact_budget=_flag(resolved["budget"].get("exact", True), "budget.exact"),
        variants=variants,
        baselines=baselines, quantize=bool(resolved["quantize"]),
        measure_batch=_positive_int(resolved["measure"]["batch"], "measure.batch"),
        measure_repeats=_positive_int(resolved["measure"]["repeats"], "measure.repeats"),
        logger=dict(resolved.get("logger") or {"name": "none"}), resolved=resolved)
