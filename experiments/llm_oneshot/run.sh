#!/usr/bin/env bash
# One-shot pruning on this CPU (experiments/llm_oneshot/README.md): the byte-level 3M model
# of `lottery lm` (trained here, ~25 min) and a GPT-2-small-shaped random model (timing only),
# each pruned by magnitude, Wanda and SparseGPT at 50% and 2:4, then `lottery report`.
#   experiments/llm_oneshot/run.sh [OUT]     (OUT defaults to experiments/llm_oneshot/work)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/work}
mkdir -p "$OUT"
[ -d "$OUT/byte/model" ] || python "$HERE/train_byte_model.py" "$OUT/byte"
[ -d "$OUT/gpt2-small" ] || python "$HERE/random_model.py" gpt2-small "$OUT/gpt2-small"

# the trained byte model: calibration 128 windows of its context (128 bytes) from its
# training text; perplexity on every window of the held-out test text
lottery llm -m name=llm_oneshot_byte model.path="$OUT/byte/model" \
    prune.method=magnitude,wanda,sparsegpt prune.sparsity=0.5,2:4 \
    calibration.path="$OUT/byte/calibration.txt" calibration.samples=128 \
    eval.path="$OUT/byte/eval.txt" hydra.sweep.dir="$OUT/multirun/byte"
lottery report "$OUT/multirun/byte"

# GPT-2 small's shape (124M parameters, random weights): seconds per method, 32 calibration
# windows of 512 tokens, no evaluation
lottery llm -m name=llm_oneshot_gpt2 model.path="$OUT/gpt2-small" \
    prune.method=magnitude,wanda,sparsegpt prune.sparsity=0.5,2:4 \
    calibration.path="$OUT/byte/calibration.txt" calibration.samples=32 \
    calibration.length=512 hydra.sweep.dir="$OUT/multirun/gpt2"
lottery report "$OUT/multirun/gpt2"
