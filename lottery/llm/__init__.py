"""Pretrained language models (GPT-2, the Llama family) pruned one-shot (`lottery llm`) or
structurally to a budget (`lottery lm model.path=`).

  spec.py        config.json <-> ModelSpec (the architecture; options not implemented are
                 refused), RoPE's frequencies with its scaling types
  gpt2.py        GPT-2's decoder in flax.nnx (transformers' module names)
  llama.py       the Llama family's decoder (Llama 2/3, Qwen2, SmolLM, TinyLlama): RoPE,
                 RMSNorm, SwiGLU, grouped-query attention, tied or untied head
  model.py       one interface over both: the whole model, or embed / block / head apart
  hf.py          the Hugging Face model folder (config.json, sharded safetensors,
                 tokenizer files): located (path or hub name), read lazily, written back
  text.py        the model's tokenizer; calibration and evaluation windows
  perplexity.py  perplexity as the Wanda / SparseGPT evaluation code computes it
  rules.py       the per-layer pruning rules: magnitude, Wanda, SparseGPT; N:M
  oneshot.py     layer-by-layer pruning on calibration text (activations through the
                 already-pruned blocks)
  compact.py     structured removal: whole layers, attention head groups, FFN channels cut
                 out, giving a smaller model that transformers' config.json can describe
  unit_scores.py importance of those units (weight norm, Taylor, Wanda), for compact
  budget.py      `lottery lm`'s budget loop on a pretrained model: rounds of scoring and
                 compaction, fine-tuning or distillation, int8, the models saved
  config.py      the `lottery llm` config: schema and validate() -> LLMConfig
  run.py         one run: dense and pruned perplexity, record rows, the saved model
  cli.py         `lottery llm ...` (Hydra app, conf/llm.yaml)
  table.py       its summary rows as a table, for the command's end and `lottery report`
"""
