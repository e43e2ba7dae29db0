"""Train the byte-level 3M-parameter model of `lottery lm` (experiment=transformer_budget's
dense model: 4 layers, d_model 256, 8 heads, FFN 1024, context 128, 3,000 steps of 8 x 128
bytes of the Python standard library's source) and write it as a GPT-2 checkpoint, with the
calibration text (the corpus's training bytes) and the evaluation text (its held-out test
half, the bytes `lottery lm` reports test bits per byte on).

    python experiments/llm_oneshot/train_byte_model.py OUT_DIR [key=value ...]

OUT_DIR/model (Hugging Face layout), OUT_DIR/calibration.txt, OUT_DIR/eval.txt, and the
training record OUT_DIR/train/record.jsonl. Extra key=value pairs override the preset (e.g.
pretrain.steps=100 for a smoke test).
"""

import sys
from pathlib import Path

import jax

from lottery.lm import corpus, gpt
from lottery.lm.budget import BudgetRun
from lottery.lm.cli import compose
from lottery.lm.config import validate
from lottery.lm.export import export


def main(out: Path, overrides: list[str]) -> None:
    cfg = validate(compose(["experiment=transformer_budget", *overrides]))
    text = corpus.load_corpus(cfg.data.source, cfg.data.max_bytes, cfg.data.validation_fraction)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.txt").write_bytes(text.train.tobytes())
    (out / "eval.txt").write_bytes(text.validation[text.validation.size // 2:].tobytes())
    run = BudgetRun(cfg, out / "train")
    (out / "train").mkdir(exist_ok=True)
    run.record = run.open_record()
    try:
        params, _ = run.pretrain(gpt.init(cfg.dense_model, run.key("dense", "init")))
    finally:
        run.record.close()
    export(cfg.dense_model, jax.device_get(params), out / "model")
    print(f"model: {out / 'model'}; test bits per byte {run.summaries[-1]['bits_per_byte']:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
