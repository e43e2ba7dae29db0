"""Perplexity on evaluation windows, as the Wanda and SparseGPT evaluation code computes it.

Each window of T tokens (`lottery.llm.text.eval_windows`: consecutive, non-overlapping)
predicts its tokens 2..T from those before them, within the window only; a window's loss
is its mean next-token cross entropy over those T − 1 predictions, and the perplexity is
exp(mean over windows of the window losses) (their `eval_ppl`: exp(Σ loss·T / (N·T))).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottery.llm import model
from lottery.llm.spec import ModelSpec


@functools.partial(jax.jit, static_argnums=0)
def window_losses(spec: ModelSpec, params: dict, windows):
    """Each window's mean next-token cross entropy (nats), (B,)."""
    logits = model.apply(spec, params, windows)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], windows[:, 1:])
    return losses.mean(axis=-1)


def evaluate(spec: ModelSpec, params: dict, windows: np.ndarray, batch: int = 8) -> dict:
    """{"perplexity", "loss" (mean nats per token), "windows", "tokens"} over `windows`
    (N, T), `batch` windows per forward pass (the last batch padded, its padding dropped)."""
    losses, params = [], jax.device_put(params)  # on the device once, not once per batch
    for start in range(0, len(windows), batch):
        part = np.asarray(windows[start:start + batch])
        padded = np.concatenate([part, np.repeat(part[-1:], batch - len(part), 0)])
        losses.append(np.asarray(window_losses(spec, params, jnp.asarray(padded)))[:len(part)])
    loss = float(np.mean(np.concatenate(losses)))
    return {"perplexity": float(np.exp(loss)), "loss": loss, "windows": len(windows),
            "tokens": int(np.size(windows))}
