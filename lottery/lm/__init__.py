"""Byte-level language models for the transformer prune-and-finetune workflow (issue 7).

  corpus.py    the byte corpus (the Python standard library's source, or a text file),
               on-device batch sampling, fixed evaluation windows, bits per byte
  gpt.py       the decoder-only transformer with per-layer sizes and multiplicative gates
               on heads, FFN units and layers; init / apply / loss / param_count
  compact.py   removal requests checked (`check_masks`) and compacted into a smaller model
  quantize.py  post-training int8 weights with per-output-channel scales
  measure.py   measured forward throughput (tokens per second)
  scores.py    head / FFN-unit / layer importance: weight norm, Taylor, Wanda
  prune.py     one pruning round: the lowest-scoring structures removed, checked
  train.py     the LM and knowledge-distillation objectives, compiled training chunks
               (lottery.optim's optimizer), evaluation (lottery.train.batched_metrics)
  budget.py    the prune / fine-tune / evaluate loop until the deployment budget is met
               (a pretrained model's: its subclass in lottery/llm/budget.py)
  baselines.py same-size dense model from scratch, and the rewound ticket
  config.py    the `lottery lm` config: its schema (Hydra structured configs, registered
               as lm_schema) and validate() -> LMConfig, on lottery.config's floor
  cli.py       `lottery lm ...` (Hydra app, conf/lm.yaml)
  table.py     the summary rows as the printed table and `lottery report`'s: test bits per
               byte first, and why a dense model that trained less scores worse
"""
