"""Prune-and-finetune to a deployment budget (issue 7), with its controls and its record.

    dense:     train the dense model (pretrain.steps)                       level 0, "dense"
    for each variant (prune: LM loss; prune_kd: distilled from the dense model):
      round r = 1, 2, ...:
        score every head / FFN unit / layer of the current (masked) model  (lm/scores.py)
        gate off the lowest `prune.fraction` of each chosen kind           (lm/prune.py)
          (budget.exact, parameter budgets: a round that would cross the next target
          removes only what reaching it needs, so the model lands on the target)
        fine-tune finetune.steps (fresh Adam, cosine), evaluate            level r
        compact, count parameters and bytes, measure tokens/s
        a budget target met for the first time: quantize to int8, record, and stop at the
        first round under the last (tightest) target
    for each target the first variant met: scratch and ticket controls     (lm/baselines.py)

Fine-tuning runs the dense-shaped model under its gates (one compiled program for every
round, the gates traced); every number about size and speed is of the compacted model.
Evaluation: the corpus's held-out tail is cut in two contiguous halves, the first is "val"
(early stop), the second "test"; `data.eval_windows` fixed windows of each. Record rows
(`lottery.record`): eval rows (step = total training steps of the model since its
initialisation) and one summary row per round and branch; density = parameters / the dense
model's parameters; accuracy = next-byte accuracy; losses in nats; bits_per_byte = test.
A pretrained model (model.path) runs this loop's subclass in `lottery.llm.budget`.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lottery.history import early_stop_summary, recorded, recorded_evaluation
from lottery.lm import baselines, corpus, gpt, measure, prune, quantize, train
from lottery.lm.compact import check_masks, compact, compacted_config
from lottery.lm.config import ConfigError, LMConfig
from lottery.lm.scores import scores
from lottery.record import RECORD_NAME, JsonlSink, Record, WandbSink
from lottery.seeds import member_keys
from lottery.terminal import progress, say

METRICS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy", "val_bits_per_byte",
           "bits_per_byte", "perplexity")


def log(message: str) -> None:
    """One line on stderr, above the progress bar (`lottery.terminal.say`)."""
    say(f"lottery lm: {message}", file=sys.stderr)


def bits(value) -> str:
    """Bits per byte for a log line (None: diverged)."""
    return "diverged" if value is None else f"{value:.3f}"


@dataclass(frozen=True)
class Data:
    train: jax.Array  # the training bytes, on the device
    val: tuple  # fixed windows as padded batches (`train.eval_split`), on the device
    test: tuple
    description: str


def load_data(cfg: LMConfig) -> Data:
    """The corpus; its held-out tail split into val (first half) and test (second half)."""
    try:
        text = corpus.load_corpus(cfg.data.source, cfg.data.max_bytes, cfg.data.validation_fraction)
        half = text.validation.size // 2
        val, test = (corpus.windows(part, cfg.model.context, cfg.data.eval_windows)
                     for part in (text.validation[:half], text.validation[half:]))
        if text.train.size <= cfg.model.context:
            raise corpus.CorpusError(f"{text.train.size} training bytes cannot fill a window "
                                     f"of context {cfg.model.context}")
    except corpus.CorpusError as error:
        raise ConfigError(str(error)) from None
    val, test = (jax.device_put(train.eval_split(*split)) for split in (val, test))
    return Data(jnp.asarray(text.train), val, test, text.description)


def _device_masks(masks):
    return jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), masks)


class BudgetRun:
    """One `lottery lm` run: everything it trains, measures and records."""

    METRICS = METRICS  # what each evaluation records (`summarise` keeps each at its ends)
    HEADLINE = ("test_loss", "bits_per_byte", "test_accuracy", "perplexity")  # the summary's
    #                                                     plain columns: the final values
    forward = None  # the logits, forward(config, params, tokens, masks); None: lm/gpt.py's
    param_count = staticmethod(gpt.param_count)  # parameters of a model of `config`

    def __init__(self, cfg: LMConfig, out_dir: Path, data: Data | None = None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.data = data or load_data(cfg)
        self.dense_params = self.param_count(cfg.dense_model)
        self.record = None  # opened by `run` once the request is known to be feasible
        self.summaries: list[dict] = []

    def open_record(self) -> Record:
        """The run's record (JSONL, and W&B where configured)."""
        cfg = self.cfg
        sinks = [JsonlSink(self.out_dir / RECORD_NAME)]
        if cfg.logger.name == "wandb":
            sinks.append(WandbSink(cfg.logger.project, cfg.name, cfg.resolved, self.out_dir,
                                   cfg.logger.init_timeout))
        return Record(sinks)

    # -- pieces ------------------------------------------------------------------------
    def key(self, branch: str, purpose: str, level: int = 0):
        """The key of one (level, branch, purpose): the engine's derived keys
        (`lottery.seeds`), the run being replicate 0."""
        return member_keys(self.cfg.seed, 1, level, branch, purpose)[0]

    def speed(self, config, params) -> float:
        """Measured forward tokens/s of a model (`measure.tokens_per_second`)."""
        return measure.tokens_per_second(config, params, self.cfg.measure.batch,
                                         self.cfg.model.context, self.cfg.measure.repeats,
                                         forward=self.forward)

    def evaluate(self, config, params, masks=None) -> dict:
        masks = None if masks is None else _device_masks(masks)
        val_loss, val_acc = (float(v) for v in train.evaluate(config, params, self.data.val,
                                                              masks))
        test_loss, test_acc = (float(v) for v in train.evaluate(config, params,
                                                                self.data.test, masks))
        values = {"val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss,
                  "test_accuracy": test_acc, "val_bits_per_byte": corpus.bits_per_byte(val_loss),
                  "bits_per_byte": corpus.bits_per_byte(test_loss),
                  "perplexity": float(np.exp(test_loss))}
        return recorded_evaluation(values)  # all None once diverged, as in the IMP levels

    def size(self, config, params) -> dict:
        """Parameters, bytes and measured tokens/s of a compacted (or quantized) model."""
        tps = self.speed(config, params)
        count = self.param_count(config)
        nbytes = (quantize.quantized_bytes(params) if isinstance(params, quantize.QuantizedParams)
                  else gpt.param_bytes(params))
        return {"params": count, "density": count / self.dense_params, "bytes": nbytes,
                "tokens_per_second": tps}

    def quantized(self, config, params, metrics: dict) -> dict:
        """The int8 model's metrics as `quantized_*` columns, and its perplexity change."""
        q = quantize.quantize(params)
        values = {**self.evaluate(config, quantize.dequantize(q)), **self.size(config, q)}
        out = {f"quantized_{k}": v for k, v in values.items() if k not in ("params", "density")}
        if None not in (out["quantized_perplexity"], metrics["perplexity"]):  # both finite
            out["quantized_perplexity_change"] = (out["quantized_perplexity"]
                                                  - metrics["perplexity"])
        return out

    def fit(self, trainer, params, masks, key, steps: int, every: int, row: dict,
            desc: str):
        """Train `steps` steps, evaluating every `every` and at the end; eval rows carry
        `row` and step = row["step"] + steps done. Returns (params, eval rows)."""
        opt_state, done, history = trainer.init(params), 0, []
        masks = None if masks is None else _device_masks(masks)  # None: all units
        with progress(steps, desc) as bar:
            while done < steps:
                count = min(every, steps - done)
                params, opt_state, loss = trainer.run(params, opt_state, masks, key, done,
                                                      count)
                done += count
                bar.update(count)
                metrics = self.evaluate(trainer.config, params, masks)
                eval_row = {"kind": "eval", **row, "step": row["step"] + done,
                            "train_loss": recorded(loss), **metrics}
                self.record.write(eval_row)
                history.append(eval_row)
        return params, history

    def summarise(self, history: list[dict], row: dict) -> dict:
        """A summary row: final values and those at the first minimum of the validation
        loss (`lottery.history.early_stop_summary`, the IMP levels' rule; a diverged
        evaluation, recorded as None, is never the minimum)."""
        values = {metric: np.array([[np.nan if h[metric] is None else h[metric]]
                                    for h in history], np.float64) for metric in self.METRICS}
        ends = early_stop_summary([h["step"] for h in history], values)
        summary = {"kind": "summary", **row}
        for name, value in ends.items():
            summary[name] = int(value[0]) if name.endswith("_step") else recorded(value[0])
        for metric in self.HEADLINE:
            summary[metric] = summary[f"final_{metric}"]
        return summary

    def write_summary(self, summary: dict) -> None:
        self.record.write(summary)
        self.summaries.append(summary)

    def trainer(self, config, phase, teacher=None, alpha: float = 0.0):
        tx = train.optimizer(phase.lr, phase.steps, phase.warmup)
        return train.Trainer(config, tx, self.data.train, phase.batch_size, teacher, alpha,
                             self.cfg.finetune.kd_temperature, self.forward,
                             self.cfg.model.context)

    def met(self, size: dict, target: float) -> bool:
        if self.cfg.budget_kind == "params":
            return size["params"] <= target
        return size["tokens_per_second"] >= target

    # -- phases ------------------------------------------------------------------------
    def check_latency(self, init_params) -> None:
        if self.cfg.budget_kind != "tokens_per_second":
            return
        dense = self.speed(self.cfg.dense_model, init_params)
        if dense >= self.cfg.targets[0]:
            raise ConfigError(f"budget.min_tokens_per_second={self.cfg.targets[0]:,.0f} is "
                              f"already met by the dense model (measured {dense:,.0f} "
                              "tokens/s here): nothing to prune; ask for more")

    def pretrain(self, init_params):
        cfg = self.cfg
        log(f"dense model: {self.dense_params:,} parameters, {cfg.dense_model}")
        trainer = self.trainer(cfg.dense_model, cfg.pretrain)
        row = {"level": 0, "branch": "dense", "replicate": 0, "step": 0, "density": 1.0}
        params, history = self.fit(trainer, init_params, None, self.key("dense", "data"),
                                   cfg.pretrain.steps, cfg.pretrain.eval_every, row, "dense")
        size = self.size(cfg.dense_model, params)
        summary = self.summarise(history, {**row, **size})
        if cfg.quantize:
            summary.update(self.quantized(cfg.dense_model, params, summary))
        self.write_summary(summary)
        log(f"dense: test {bits(summary['bits_per_byte'])} bits/byte, "
            f"{size['tokens_per_second']:,.0f} tokens/s")
        return params, size

    def prune_variant(self, variant: str, dense_params, dense_size: dict) -> dict:
        """The rounds of one variant; returns {target index: (round, masks)}."""
        cfg, config = self.cfg, self.cfg.dense_model
        kd = variant == "prune_kd"
        trainer = self.trainer(config, cfg.finetune,
                               teacher=(config, dense_params) if kd else None,
                               alpha=cfg.finetune.kd_alpha if kd else 0.0)
        masks = (prune.request_masks(config, cfg.prune.remove) if cfg.prune.remove
                 else jax.tree.map(np.asarray, gpt.full_masks(config)))
        params, reached, pending = dense_params, {}, list(range(len(cfg.targets)))
        for level in range(1, cfg.prune.max_rounds + 1):
            key = self.key(variant, "score", level)
            batches = [corpus.sample_batch(self.data.train, jax.random.fold_in(key, i),
                                           cfg.finetune.batch_size, config.context)
                       for i in range(cfg.prune.score_batches)]
            score = scores(cfg.prune.score, config, params, _device_masks(masks), batches)
            new = prune.remove_lowest(score, masks, cfg.prune.structures, cfg.prune.fraction)
            if cfg.budget.exact and cfg.budget_kind == "params" and pending:
                target = cfg.targets[pending[0]]  # the largest parameter count not yet met
                new = prune.remove_to_target(
                    score, masks, cfg.prune.structures, cfg.prune.fraction,
                    lambda m: gpt.param_count(compacted_config(config, m)) <= target)
            if level > 1 or not cfg.prune.remove:
                if all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new),
                                                            jax.tree.leaves(masks))):
                    log(f"{variant}: nothing left to remove after round {level - 1}")
                    break
            masks = new
            check_masks(config, masks)  # the loop never makes a request the model refuses
            pruned = self.evaluate(config, params, masks)
            small = compact(config, params, masks)
            size = self.size(*small)
            step = cfg.pretrain.steps + (level - 1) * cfg.finetune.steps
            row = {"level": level, "branch": variant, "replicate": 0, "step": step,
                   "density": size["density"], "params": size["params"],
                   "bytes": size["bytes"], "tokens_per_second": size["tokens_per_second"]}
            params, history = self.fit(trainer, params, masks, self.key(variant, "data", level),
                                       cfg.finetune.steps,
                                       cfg.finetune.eval_every, row, f"{variant} r{level}")
            small = compact(config, params, masks)
            summary = self.summarise(history, {
                **row, "heads": list(small[0].heads), "ffn": list(small[0].ffn),
                "layers": small[0].layers, "pruned_val_loss": pruned["val_loss"],
                "pruned_bits_per_byte": pruned["bits_per_byte"]})
            self.finish_round(variant, level, small, size, summary, pruned, pending, reached,
                              jax.tree.map(np.copy, masks))
            if not pending:
                break
        if pending:
            log(f"{variant}: budget {self.targets_text(pending)} not met after {level} "
                "round(s)")
        return reached

    def finish_round(self, variant: str, level: int, model: tuple, size: dict, summary: dict,
                     pruned: dict, pending: list, reached: dict, kept) -> None:
        """A round's end: the targets its model (`model`: (config, params)) meets first get
        `budget_targets`, int8 (`quantize`) and `on_target`'s columns; the summary row and
        the round's log line are written; `reached[i] = (level, kept)` for each, taken off
        `pending`."""
        newly = [i for i in pending if self.met(size, self.cfg.targets[i])]
        if newly:
            summary["budget_targets"] = [self.cfg.targets[i] for i in newly]
            if self.cfg.quantize:
                summary.update(self.quantized(*model, summary))
            summary.update(self.on_target(variant, level, *model))
        self.write_summary(summary)
        log(f"{variant} round {level}: {size['params']:,} parameters "
            f"({100 * size['density']:.1f}%), {size['tokens_per_second']:,.0f} tokens/s, "
            f"{self.result_words(summary, pruned)}"
            + (f"; budget {self.targets_text(newly)} met" if newly else "")
            + (f"; saved to {summary['saved']}" if "saved" in summary else ""))
        for i in newly:
            reached[i] = (level, kept)
            pending.remove(i)

    def targets_text(self, indices) -> str:
        return ", ".join(f"{self.cfg.targets[i]:,.0f}" for i in indices)

    def result_words(self, summary: dict, pruned: dict) -> str:
        """A round's test result in its log line, after fine-tuning and right after removal."""
        return (f"test {bits(summary['bits_per_byte'])} bits/byte (after removal, before "
                f"fine-tuning: {bits(pruned['bits_per_byte'])})")

    def on_target(self, variant: str, level: int, config, params) -> dict:
        """More for a model that meets a target (a pretrained model's: saved); columns."""
        return {}

    def control(self, branch: str, level: int, config, params):
        """Train a scratch or ticket control for the steps its pruned model had."""
        cfg = self.cfg
        steps = cfg.pretrain.steps + level * cfg.finetune.steps
        phase = cfg.pretrain.__class__(steps, cfg.pretrain.batch_size, cfg.pretrain.lr,
                                       cfg.pretrain.warmup, cfg.pretrain.eval_every)
        trainer = self.trainer(config, phase)
        size = self.size(config, params)
        row = {"level": level, "branch": branch, "replicate": 0, "step": 0,
               "density": size["density"], "params": size["params"], "bytes": size["bytes"],
               "tokens_per_second": size["tokens_per_second"]}
        params, history = self.fit(trainer, params, None, self.key(branch, "data", level), steps,
                                   cfg.pretrain.eval_every, row, f"{branch} r{level}")
        summary = self.summarise(history, {**row, "heads": list(config.heads),
                                           "ffn": list(config.ffn), "layers": config.layers})
        if cfg.quantize:
            summary.update(self.quantized(config, params, summary))
        self.write_summary(summary)
        log(f"{branch} at round {level}: {size['params']:,} parameters, test "
            f"{bits(summary['bits_per_byte'])} bits/byte")

    def run(self) -> pd.DataFrame:
        cfg = self.cfg
        started = time.perf_counter()
        init_params = gpt.init(cfg.dense_model, self.key("dense", "init"))
        self.check_latency(init_params)  # a refused request leaves no record behind
        self.record = self.open_record()
        self.record.write({"kind": "run", "name": cfg.name, "config": cfg.resolved,
                           "dense_params": self.dense_params, "corpus": self.data.description,
                           "budget_kind": cfg.budget_kind, "budget_targets": list(cfg.targets)})
        try:
            dense_params, dense_size = self.pretrain(init_params)
            reached = {v: self.prune_variant(v, dense_params, dense_size) for v in cfg.variants}
            first = dict(reached[cfg.variants[0]].values())  # round -> masks (a round may
            for level, masks in sorted(first.items()):     # meet several targets)
                if "scratch" in cfg.baselines:
                    pruned = compact(cfg.dense_model, init_params, masks)[0]
                    config = baselines.matching_config(pruned, gpt.param_count(pruned))
                    self.control("scratch", level, config,
                                 gpt.init(config, self.key("scratch", "init", level)))
                if "ticket" in cfg.baselines:
                    self.control("ticket", level, *baselines.ticket(cfg.dense_model, init_params,
                                                                    masks))
        finally:
            self.record.close()
        log(f"done in {time.perf_counter() - started:.0f}s")  # where: the run's last line
        return pd.DataFrame(self.summaries)


def run(cfg: LMConfig, out_dir: Path, data: Data | None = None) -> pd.DataFrame:
    """Run everything `cfg` asks for; returns the summary rows (also in the record)."""
    return BudgetRun(cfg, out_dir, data).run()
