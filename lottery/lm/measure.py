"""Measured forward throughput of a transformer: the budget loop's latency mode and the
results table's speed column.

`tokens_per_second` jits the forward pass (`gpt.apply`, or `quantize.apply_quantized` for
`QuantizedParams`), runs it once to compile and warm up, then times `repeats` calls, each
waited for with `block_until_ready`, and reports batch * context / the median time. Times on
shared machines vary (+-25% on the 2-core development machine): compare models measured in
one process, one after the other.
"""

import statistics
import time

import jax

from lottery.lm import gpt
from lottery.lm.quantize import QuantizedParams, apply_quantized


def forward_seconds(config, params, batch: int = 32, context: int | None = None,
                    repeats: int = 5, masks=None, forward=None) -> float:
    """Median wall-clock seconds of one jitted forward pass over (batch, context) tokens.
    `forward(config, params, tokens, masks)`: another model's (a pretrained model's,
    `lottery.llm.budget.forward`, which takes `QuantizedParams` too)."""
    context = config.context if context is None else context
    if repeats < 1 or batch < 1 or not 1 <= context <= config.context:
        raise ValueError(f"batch={batch}, repeats={repeats} must be positive and context="
                         f"{context} in [1, {config.context}]")
    if forward is None:
        forward = apply_quantized if isinstance(params, QuantizedParams) else gpt.apply
        masks = gpt.full_masks(config) if masks is None else masks
    run = forward
    forward = jax.jit(lambda p, m, t: run(config, p, t, m))
    tokens = jax.random.randint(jax.random.key(0), (batch, context), 0, config.vocab)
    params = jax.device_put(params)
    forward(params, masks, tokens).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(params, masks, tokens).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tokens_per_second(config, params, batch: int = 32, context: int | None = None,
                      repeats: int = 5, masks=None, forward=None) -> float:
    """Forward throughput in tokens per second (median of `repeats` timed calls; context
    defaults to the model's)."""
    context = config.context if context is None else context
    return batch * context / forward_seconds(config, params, batch, context, repeats, masks,
                                             forward)
