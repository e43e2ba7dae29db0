"""One-shot pruning of a pretrained model, one block at a time, on calibration text.

As the Wanda and SparseGPT code does (`prune_wanda`, `llama_sequential`): the calibration
windows are embedded once; then for each block in order
  1. its weights are read from the checkpoint (only this block's: `hf.load_block`),
  2. the calibration activations run through it, and each linear layer's input statistics
     are gathered (`rules.Calibration`: Σ xᵀx for SparseGPT, Σ x² for Wanda),
  3. every linear layer of the block is pruned by the method's rule (`lottery.llm.rules`),
  4. the activations run through the *pruned* block: they are the next block's input, so
     each block is fitted to what the pruned blocks before it produce.
The embeddings and the output head are not pruned (the papers prune the blocks' linear
layers only). Each linear layer gives a row: its sparsity, its layer-wise reconstruction
error on the calibration data relative to its output energy, trace(ΔWᵀHΔW) / trace(WᵀHW),
and the seconds its rule took.
"""

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lottery.llm import hf, model, rules

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Method:
    """What to prune and how: `name` in METHODS, `sparsity` (fraction or N:M), SparseGPT's
    `block` (columns per lazy update) and `damp` (fraction of the mean Hessian diagonal)."""

    name: str
    sparsity: rules.Sparsity
    block: int = 128
    damp: float = 0.01


def _set_kernel(tree: dict, path: str, kernel) -> dict:
    """A copy of `tree` with the kernel at `path` (a linear layer) replaced."""
    head, _, rest = path.partition(".")
    if not rest:
        return {**tree, head: {**tree[head], "kernel": kernel}}
    return {**tree, head: _set_kernel(tree[head], rest, kernel)}


def _batches(x: np.ndarray, batch: int):
    for start in range(0, len(x), batch):
        yield start, x[start:start + batch]


def prune_linear(method: Method, kernel, stats: rules.Calibration, key):
    """(new kernel, mask) of one linear layer by `method`'s rule."""
    if method.name == "magnitude":
        mask = rules.magnitude(kernel, method.sparsity, key)
    elif method.name == "wanda":
        mask = rules.wanda(kernel, stats.squares, method.sparsity, key)
    else:
        return rules.sparsegpt(kernel, stats.gram, method.sparsity, method.block,
                               method.damp, key)
    return jnp.where(mask > 0, kernel, 0), mask


def gather(spec, params: dict, x: np.ndarray | None, batch: int) -> dict | None:
    """Each linear input's statistics over the activations `x` entering the block (None
    without calibration data: magnitude pruning needs none)."""
    if x is None:
        return None
    stats = None
    for _, part in _batches(x, batch):
        _, captured = model.block(spec, params, jnp.asarray(part), True)
        if stats is None:
            stats = {name: rules.calibration(captured[name].shape[-1]) for name in captured}
        stats = {name: rules.accumulate(stats[name], captured[name]) for name in captured}
    return jax.block_until_ready(stats)  # done here, not inside the first rule's seconds


def prune_block(spec, params: dict, x: np.ndarray | None, method: Method, key, batch: int,
                layer: int):
    """(pruned block params, rows): step 2 and 3 of the module docstring for one block."""
    stats = gather(spec, params, x, batch)
    rows = []
    for name, linears in model.linear_inputs(spec).items():
        for path in linears:
            kernel = jnp.asarray(model.at(params, path)["kernel"])
            started = time.perf_counter()
            new, _ = prune_linear(method, kernel, None if stats is None else stats[name],
                                  jax.random.fold_in(key, len(rows)))
            new = np.asarray(new)
            row = {"layer": layer, "linear": path, "inputs": kernel.shape[0],
                   "outputs": kernel.shape[1], "seconds": time.perf_counter() - started,
                   "sparsity": float(1 - np.count_nonzero(new) / new.size)}
            params = _set_kernel(params, path, new)
            if stats is not None:
                row.update(errors(kernel, new, stats[name].gram))
            rows.append(row)
    return params, rows


def errors(kernel, new, gram) -> dict:
    """The layer-wise reconstruction error on the calibration data, absolute and relative
    to the layer's output energy trace(WᵀHW)."""
    error = float(rules.reconstruction_error(kernel, new, gram))
    energy = float(rules.reconstruction_error(kernel, jnp.zeros_like(kernel), gram))
    return {"error": error, "relative_error": error / energy if energy else 0.0}


def prune(checkpoint: hf.Checkpoint, windows: np.ndarray | None, method: Method, key=None,
          batch: int = 8, progress=None) -> tuple[dict, list[dict]]:
    """(pruned params of the whole model as NumPy arrays, one row per linear layer);
    `windows` (N, T) calibration tokens (None: magnitude pruning without data, so without
    error columns); `progress(layer)` is called after each block."""
    spec = checkpoint.spec
    key = jax.random.key(0) if key is None else key
    outer = jax.device_put(hf.load_outer(checkpoint))
    if windows is None and method.name != "magnitude":
        raise ValueError(f"{method.name} needs calibration windows")
    x = None if windows is None else np.concatenate(
        [np.asarray(model.embed(spec, outer, jnp.asarray(part)))
         for _, part in _batches(windows, batch)])
    blocks, rows = {}, []
    for layer in range(spec.layers):  # each block's weights go to the device once, twice
        params = jax.device_put(hf.load_block(checkpoint, layer))  # if pruned
        params, layer_rows = prune_block(spec, params, x, method,
                                         jax.random.fold_in(key, layer), batch, layer)
        rows += layer_rows
        params = jax.device_put(params)
        if x is not None:  # the next block's input: through this block, pruned
            for start, part in _batches(x, batch):
                x[start:start + len(part)] = np.asarray(
                    model.block(spec, params, jnp.asarray(part)))
        blocks[layer] = jax.device_get(params)  # the pruned model is kept on the host
        if progress is not None:
            progress(layer)
    a, b = model.block_path(spec)
    outer = jax.device_get(outer)
    return {**outer, a: {**outer[a], b: blocks}}, rows
