#!/usr/bin/env bash
# Structured pruning of a pretrained checkpoint to a budget on this CPU
# (experiments/llm_budget/README.md): the byte-level 3.26M model of `lottery lm`
# (experiments/llm_oneshot/train_byte_model.py: transformer_budget's dense model written as a
# GPT-2 checkpoint) pruned by `lottery lm model.path=...` with the transformer_budget preset's
# schedule, FFN channels and whole layers (GPT-2 cannot lose heads), to 50% and 25% of its
# parameters, with and without distillation; int8; the models that meet a target saved.
#   experiments/llm_budget/run.sh [OUT]     (OUT defaults to experiments/llm_budget/work)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/work}
mkdir -p "$OUT"
[ -d "$OUT/byte/model" ] || python "$HERE/../llm_oneshot/train_byte_model.py" "$OUT/byte"

lottery lm experiment=transformer_budget name=llm_budget model.path="$OUT/byte/model" \
    prune.structures=[ffn,layers] baselines=[] save="$OUT/saved" \
    hydra.run.dir="$OUT/run"
lottery report "$OUT/run"
