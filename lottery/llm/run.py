"""One `lottery llm` run: a pretrained model pruned one-shot, evaluated, recorded, saved.

    locate the model (folder or hub name) and read its config
    dense:  perplexity of the unpruned model on eval.path       (eval.dense)   summary row
    prune:  calibration windows, then block by block (lottery/llm/oneshot.py)  layer rows
    pruned: perplexity                                                         summary row
    save:   the pruned model in the Hugging Face layout, the tokenizer copied  (save=DIR)

Record rows (record.jsonl, and W&B where configured): `kind: "layer"` per linear layer (its
sparsity, reconstruction error, seconds) and `kind: "summary"` per model: `branch` the
method ("dense" for the unpruned model), `sparsity` as asked ("0.5", "2:4"), `density` the
kept fraction of the blocks' linear weights, `perplexity`, `loss` (nats per token),
`prune_seconds` (calibration forward passes included), `rule_seconds` (the pruning rules
alone, summed over the linear layers: first calls include their compilation).
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from lottery.llm import hf, model, oneshot, perplexity, text
from lottery.llm.config import ConfigError, LLMConfig
from lottery.record import RECORD_NAME, JsonlSink, Record, WandbSink
from lottery.terminal import progress, say
from lottery.seeds import member_keys


def log(message: str) -> None:
    say(f"lottery llm: {message}", file=sys.stderr)


class LLMRun:
    def __init__(self, cfg: LLMConfig, out_dir: Path):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        try:
            self.folder = hf.locate(cfg.model.path, cfg.model.name, cfg.model.revision)
            self.checkpoint = hf.Checkpoint(self.folder)
        except hf.CheckpointError as error:
            raise ConfigError(str(error)) from None
        self.spec = self.checkpoint.spec
        self.summaries: list[dict] = []
        self.record = None

    def open_record(self) -> Record:
        sinks = [JsonlSink(self.out_dir / RECORD_NAME)]
        if self.cfg.logger.name == "wandb":
            sinks.append(WandbSink(self.cfg.logger.project, self.cfg.name, self.cfg.resolved,
                                   self.out_dir, self.cfg.logger.init_timeout))
        return Record(sinks)

    def _windows(self, source: str, length: int | None, cut, max_chars=None) -> np.ndarray:
        """`cut(ids, length)` of `source`'s tokens; a bad text or length is one line."""
        try:
            length = length or self.spec.context
            if length > self.spec.context:
                raise text.TextError(f"windows of {length} tokens exceed the model's context "
                                     f"of {self.spec.context}")
            return cut(text.encode(self.folder, source, max_chars), length)
        except text.TextError as error:
            raise ConfigError(str(error)) from None

    def calibration_windows(self) -> np.ndarray | None:
        c = self.cfg.calibration
        if not c.path:
            return None
        return self._windows(c.path, c.length, lambda ids, length: text.calibration(
            ids, c.samples, length, self.cfg.seed), text.CALIBRATION_CHARS)

    def eval_windows(self) -> np.ndarray | None:
        e = self.cfg.eval
        if not e.path:
            return None
        return self._windows(e.path, e.length, lambda ids, length: text.eval_windows(
            ids, length, e.max_windows))

    def evaluate(self, params, windows) -> dict:
        if windows is None:
            return {}
        return perplexity.evaluate(self.spec, params, windows, self.cfg.eval.batch)

    def summary(self, branch: str, values: dict) -> dict:
        row = {"kind": "summary", "level": 0, "branch": branch, "replicate": 0,
               "model": str(self.cfg.model.path or self.cfg.model.name),
               "sparsity": "0" if branch == "dense" else str(self.cfg.prune.sparsity),
               **values}
        self.record.write(row)
        self.summaries.append(row)
        return row

    def run(self) -> pd.DataFrame:
        cfg, spec = self.cfg, self.spec
        log(f"{self.folder}: {spec.model_type}, {spec.layers} blocks, d={spec.d_model}, "
            f"{model.linear_weights(spec):,} weights in the blocks' linear layers")
        evaluation, calibration = self.eval_windows(), self.calibration_windows()
        self.record = self.open_record()
        self.record.write({"kind": "run", "name": cfg.name, "config": cfg.resolved,
                           "model": str(self.folder), "model_type": spec.model_type,
                           "linear_weights": model.linear_weights(spec)})
        try:
            if evaluation is not None and cfg.eval.dense:
                dense = hf.load(self.folder)[1]
                values = self.evaluate(dense, evaluation)
                del dense
                self.summary("dense", {"density": 1.0, **values})
                log(f"dense: perplexity {values['perplexity']:.3f}")
            method = oneshot.Method(cfg.prune.method, cfg.sparsity, cfg.prune.block,
                                    cfg.prune.damp)
            key = member_keys(cfg.seed, 1, 1, cfg.prune.method, "prune")[0]
            started = time.perf_counter()
            with progress(spec.layers, f"{cfg.prune.method} {cfg.prune.sparsity}") as bar:
                pruned, rows = oneshot.prune(self.checkpoint, calibration, method, key,
                                             cfg.calibration.batch, lambda _: bar.update(1))
            seconds = time.perf_counter() - started
            for row in rows:
                self.record.write({"kind": "layer", "branch": cfg.prune.method, **row})
            kept = sum((1 - r["sparsity"]) * r["inputs"] * r["outputs"] for r in rows)
            values = {"density": kept / model.linear_weights(spec), "prune_seconds": seconds,
                      "rule_seconds": sum(r["seconds"] for r in rows),
                      **self.evaluate(pruned, evaluation)}
            self.summary(cfg.prune.method, values)
            log(f"{cfg.prune.method} {cfg.prune.sparsity}: {seconds:.1f} s"
                + (f", perplexity {values['perplexity']:.3f}" if evaluation is not None else ""))
            if cfg.save:
                hf.save(Path(cfg.save), spec, pruned, self.folder, cfg.save_dtype)
                log(f"pruned model saved to {cfg.save}")
        finally:
            self.record.close()
        return pd.DataFrame(self.summaries)


def run(cfg: LLMConfig, out_dir: Path) -> pd.DataFrame:
    with jax.default_matmul_precision("highest"):  # fp32 on GPUs too (not TF32), for this
        return LLMRun(cfg, out_dir).run()          # run only, not the whole process
