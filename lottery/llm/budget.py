"""`lottery lm model.path=DIR` (or `model.name=ID`): a pretrained model pruned structurally
to a budget, the byte model's loop (`lottery.lm.budget`) on a checkpoint.

    dense:     the checkpoint as it is, evaluated (no training)              level 0, "dense"
    for each variant (prune: LM loss; prune_kd: distilled from the checkpoint):
      round r = 1, 2, ...:
        score every head group / FFN channel / layer of the current model  (llm/unit_scores.py)
        cut out the lowest `prune.fraction` of each chosen kind, as many in every layer
          (transformers' config.json holds one head count and one FFN width; which units go
          may differ per layer), so each round's model is smaller, not gated (llm/compact.py)
          (budget.exact, parameter budgets: the round that would cross the next target
          removes only what reaching it needs: within one FFN channel per layer)
        evaluate, fine-tune finetune.steps (fresh Adam, cosine), evaluate    level r
        parameters, bytes, measured tokens/s; at a budget target met for the first time:
        int8 (`lottery.lm.quantize`), and the model saved under `save` (Hugging Face layout)

The differences from the byte model's loop, and why:
  - no pretraining and no scratch or ticket controls: the checkpoint is the dense model,
    and its pretraining (or its initialisation, for a ticket) is not at hand;
  - each round compacts the model (the byte model is gated and compacted only to measure):
    a pretrained model is large, and the smaller model trains faster; one compilation per
    round instead of one per run;
  - text is tokenized with the model's tokenizer (`lottery.llm.text.tokenizer`): the corpus
    (`data.source`, `data.max_bytes`) is split as the byte model's (the held-out tail in
    contiguous val and test halves) and each part tokenized; windows of `model.context`
    tokens. The metric is per-token perplexity = exp(test loss), not bits per byte;
  - GPT-2 cannot lose heads (transformers derives its head size from n_embd / n_head): the
    config refuses `heads` in prune.structures for it.
"""

import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lottery.history import recorded_evaluation
from lottery.lm import budget, corpus, prune, quantize, train
from lottery.lm.config import ConfigError, LMConfig, pretrained_checks
from lottery.llm import compact, hf, model, text, unit_scores
from lottery.terminal import say

METRICS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy", "val_perplexity",
           "perplexity")


def log(message: str) -> None:
    say(f"lottery lm: {message}", file=sys.stderr)


def forward(spec, params, tokens, masks=None):
    """Logits of a pretrained model (float32 or `QuantizedParams`); no gates (`masks`
    unused: each round's model is compacted)."""
    if isinstance(params, quantize.QuantizedParams):
        params = quantize.dequantize(params)
    return model.apply(spec, params, tokens)


def load_tokens(cfg: LMConfig, folder: Path) -> budget.Data:
    """The corpus split as the byte model's, each part tokenized by the model's tokenizer;
    val and test: `data.eval_windows` windows of `model.context` tokens each."""
    context = cfg.model.context
    try:
        found = corpus.load_corpus(cfg.data.source, cfg.data.max_bytes,
                                   cfg.data.validation_fraction)
        encoder = text.tokenizer(folder)
        train_ids, held_out = (
            np.asarray(encoder.encode(part.tobytes().decode("utf-8", "replace")).ids, np.int32)
            for part in (found.train, found.validation))
        half = held_out.size // 2
        splits = [corpus.windows(part, context, cfg.data.eval_windows)
                  for part in (held_out[:half], held_out[half:])]
        if train_ids.size <= context:
            raise corpus.CorpusError(f"{train_ids.size} training tokens cannot fill a window "
                                     f"of model.context={context}")
    except (corpus.CorpusError, text.TextError) as error:
        raise ConfigError(str(error)) from None
    val, test = (jax.device_put(train.eval_split(*split)) for split in splits)
    return budget.Data(jnp.asarray(train_ids), val, test,
                       f"{found.description}, {train_ids.size:,} training tokens")


def removal(spec, structures, fraction: float, scale: float = 1.0) -> tuple[int, int, int]:
    """(head groups kept per layer, FFN channels kept per layer, layers dropped) by a round
    removing `scale` of its full removal: of each chosen kind, round(fraction * alive) (at
    least 1, and at least one unit of each kind stays), as the byte model's rounds count."""
    def removed(alive: int) -> int:
        return int(round(scale * min(max(1, round(fraction * alive)), alive - 1)))

    return (spec.kv_heads - (removed(spec.kv_heads) if "heads" in structures else 0),
            spec.ffn - (removed(spec.ffn) if "ffn" in structures else 0),
            removed(spec.layers) if "layers" in structures else 0)


def to_target(spec, structures, fraction: float, target: float) -> tuple[int, int, int]:
    """The round's removal (`removal`), unless its model meets `target` (parameters): then
    the smallest removal that does. The largest scale whose model is still over the target
    is found by bisection; from there FFN channels go (when `ffn` is a chosen kind), as
    many per layer as needed, so the model lands within one channel per layer of it."""
    def fits(counts) -> bool:
        return model.param_count(compact.resized(spec, *counts)) <= target

    full = removal(spec, structures, fraction)
    if not fits(full):
        return full
    below, result = prune.last_over(lambda x: removal(spec, structures, fraction, x), fits, 1.0,
                                    removal(spec, structures, fraction, 0.0), full, 30)
    groups, channels, dropped = below
    if "ffn" not in structures or not fits((groups, 1, dropped)):
        return result
    cut = prune.first_fitting(lambda n: fits((groups, channels - n, dropped)), 0, channels - 1)
    return groups, channels - cut, dropped


class PretrainedBudgetRun(budget.BudgetRun):
    """One `lottery lm` run on a pretrained model (see the module docstring)."""

    METRICS = METRICS
    HEADLINE = ("test_loss", "test_accuracy", "perplexity")
    forward = staticmethod(forward)  # the model's own logits; `speed`, `trainer` use them
    param_count = staticmethod(model.param_count)

    def __init__(self, cfg: LMConfig, out_dir: Path, data: budget.Data | None = None):
        try:
            self.folder = hf.locate(cfg.model.path, cfg.model.name, cfg.model.revision)
            spec = hf.read_spec(self.folder)
        except hf.CheckpointError as error:
            raise ConfigError(str(error)) from None
        if cfg.dense_model is None:  # a hub model: its budget is checked once it is here
            kind, targets = pretrained_checks(cfg, spec)
            cfg = replace(cfg, dense_model=spec, budget_kind=kind, targets=targets)
        self.cfg, self.out_dir, self.spec = cfg, Path(out_dir), cfg.dense_model
        self.data = data or load_tokens(cfg, self.folder)
        self.dense_params = self.param_count(self.spec)
        self.record, self.summaries = None, []

    # -- the pieces the byte model's loop calls, for a pretrained model --------------------
    def evaluate(self, config, params, masks=None) -> dict:
        values = {}
        for split, prefix in ((self.data.val, "val_"), (self.data.test, "test_")):
            loss, accuracy = (float(v) for v in train.evaluate(config, params, split,
                                                               forward=self.forward))
            values.update({f"{prefix}loss": loss, f"{prefix}accuracy": accuracy})
        values["val_perplexity"] = float(np.exp(values["val_loss"]))
        values["perplexity"] = float(np.exp(values["test_loss"]))
        return recorded_evaluation(values)  # all None once diverged

    # -- phases ---------------------------------------------------------------------------
    def dense(self, params) -> dict:
        """The checkpoint's row: evaluated and measured as it is."""
        cfg = self.cfg
        size = self.size(self.spec, params)
        row = {"level": 0, "branch": "dense", "replicate": 0, "step": 0, **size}
        history = [{"kind": "eval", **row, **self.evaluate(self.spec, params)}]
        self.record.write(history[0])
        summary = self.summarise(history, {**row, **self.shape(self.spec)})
        if cfg.quantize:
            summary.update(self.quantized(self.spec, params, summary))
        self.write_summary(summary)
        log(f"dense: {self.dense_params:,} parameters, test perplexity "
            f"{perplexity(summary['perplexity'])}, {size['tokens_per_second']:,.0f} tokens/s")
        return size

    @staticmethod
    def shape(spec) -> dict:
        return {"heads": [spec.heads] * spec.layers, "kv_heads": spec.kv_heads,
                "ffn": [spec.ffn] * spec.layers, "layers": spec.layers}

    def score_batches(self, key) -> list:
        cfg = self.cfg
        return [np.asarray(corpus.sample_batch(self.data.train, jax.random.fold_in(key, i),
                                               cfg.finetune.batch_size, cfg.model.context)[0])
                for i in range(cfg.prune.score_batches)]

    def prune_variant(self, variant: str, dense_params, dense_size: dict) -> dict:
        """The rounds of one variant; returns {target index: (round, spec)}."""
        cfg = self.cfg
        kd = variant == "prune_kd"
        spec, params, reached, pending = self.spec, dense_params, {}, list(range(len(cfg.targets)))
        for level in range(1, cfg.prune.max_rounds + 1):
            counts = removal(spec, cfg.prune.structures, cfg.prune.fraction)
            if cfg.budget.exact and cfg.budget_kind == "params" and pending:
                counts = to_target(spec, cfg.prune.structures, cfg.prune.fraction,
                                   cfg.targets[pending[0]])
            if counts == (spec.kv_heads, spec.ffn, 0):
                log(f"{variant}: nothing left to remove after round {level - 1}")
                break
            score = unit_scores.scores(cfg.prune.score, spec, params,
                                       self.score_batches(self.key(variant, "score", level)))
            spec, params = compact.compact(spec, params, compact.uniform_request(score, *counts))
            params = jax.tree.map(jnp.asarray, params)
            pruned = self.evaluate(spec, params)
            size = self.size(spec, params)
            row = {"level": level, "branch": variant, "replicate": 0,
                   "step": (level - 1) * cfg.finetune.steps, **size}
            trainer = self.trainer(spec, cfg.finetune,
                                   teacher=(self.spec, dense_params) if kd else None,
                                   alpha=cfg.finetune.kd_alpha if kd else 0.0)
            params, history = self.fit(trainer, params, None, self.key(variant, "data", level),
                                       cfg.finetune.steps, cfg.finetune.eval_every, row,
                                       f"{variant} r{level}")
            summary = self.summarise(history, {
                **row, **self.shape(spec), "pruned_val_loss": pruned["val_loss"],
                "pruned_perplexity": pruned["perplexity"]})
            self.finish_round(variant, level, (spec, params), size, summary, pruned, pending,
                              reached, spec)
            if not pending:
                break
        if pending:
            log(f"{variant}: budget {self.targets_text(pending)} not met after {level} "
                "round(s)")
        return reached

    def result_words(self, summary: dict, pruned: dict) -> str:
        return (f"test perplexity {perplexity(summary['perplexity'])} (after removal, before "
                f"fine-tuning: {perplexity(pruned['perplexity'])})")

    def on_target(self, variant: str, level: int, spec, params) -> dict:
        """The model saved under `save` (Hugging Face layout)."""
        if not self.cfg.save:
            return {}
        folder = Path(self.cfg.save) / variant / f"round-{level}"
        return {"saved": str(hf.save(folder, spec, params, self.folder))}

    def run(self) -> pd.DataFrame:
        cfg, spec = self.cfg, self.spec
        started = time.perf_counter()
        dense_params = jax.tree.map(jnp.asarray, hf.load(self.folder)[1])
        self.check_latency(dense_params)  # a refused request leaves no record behind
        self.record = self.open_record()
        self.record.write({"kind": "run", "name": cfg.name, "config": cfg.resolved,
                           "dense_params": self.dense_params, "corpus": self.data.description,
                           "model": str(self.folder), "model_type": spec.model_type,
                           "budget_kind": cfg.budget_kind, "budget_targets": list(cfg.targets)})
        try:
            log(f"{self.folder}: {spec.model_type}, {spec.layers} blocks, {spec.heads} heads "
                f"({spec.kv_heads} key/value), FFN {spec.ffn}, {self.dense_params:,} parameters")
            dense_size = self.dense(dense_params)
            for variant in cfg.variants:
                self.prune_variant(variant, dense_params, dense_size)
            if cfg.baselines:
                log(f"baselines {', '.join(cfg.baselines)} not run: a pretrained model's "
                    "pretraining and initialisation are not at hand")
        finally:
            self.record.close()
        log(f"done in {time.perf_counter() - started:.0f}s")
        return pd.DataFrame(self.summaries)


def perplexity(value) -> str:
    return "diverged" if value is None else f"{value:.3f}"


def run(cfg: LMConfig, out_dir: Path, data: budget.Data | None = None) -> pd.DataFrame:
    """Run everything `cfg` asks for; returns the summary rows (also in the record)."""
    return PretrainedBudgetRun(cfg, out_dir, data).run()
