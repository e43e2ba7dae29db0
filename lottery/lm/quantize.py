"""Post-training int8 weight quantization of the transformer (`lottery.lm.gpt` params).

Every weight array of 2 or more dimensions becomes int8 values with a float32 scale per
output channel, symmetric: `scale = max|w| / 127` over the channel's inputs (1 where the
channel is all zeros), `values = round(w / scale)`, in [-127, 127]. Output channels:
embedding rows (`tokens`, `positions`; a `tokens` row is also an output channel of the tied
head), the (head, dim) columns of `wq, wk, wv`, the model-width columns of `wo` and `w2`,
the units of `w1`; a pretrained model's (`lottery.llm`) embedding rows (`embedding`) and
the columns of its `kernel`s (stored (in, out)); any other >= 2-D leaf: its last axis.
Biases and norm parameters stay float32. Round-trip error: |w - dequantize(quantize(w))|
<= scale / 2 per element (up to float32 rounding), as rounding to the nearest integer step
is the only loss.

The quantized model is evaluated by dequantizing (under jit, fused with the forward pass):
`apply_quantized`. A true int8 matmul path (`lax.dot_general` with
`preferred_element_type=int32` and per-token activation quantization) was measured on the
2-core CPU (jax 0.10.2) and is not faster: over one block's and the head's matmul shapes at
d_model 128 and 4096 tokens, float32 31 ms, int8 x int8 alone 28-29 ms, with the activation
quantization and rescaling 35-39 ms. So it is not provided: on CPU, int8 here saves memory
(about 3.8x), not time.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lottery.lm import gpt

# the input (reduced) axes of each named weight; the other axes index output channels
INPUT_AXES = {"tokens": (1,), "positions": (1,), "wq": (0,), "wk": (0,), "wv": (0,),
              "wo": (0, 1), "w1": (0,), "w2": (0,),
              "embedding": (1,)}  # a pretrained model's (`lottery.llm`) embedding rows


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QTensor:
    values: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, the weight's shape with its input axes of size 1


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedParams:
    params: dict  # the params' layout, each weight of 2+ dimensions a `QTensor`


def _input_axes(name, ndim: int) -> tuple[int, ...]:
    return INPUT_AXES.get(name, tuple(range(ndim - 1)))


def quantize_array(w, input_axes) -> QTensor:
    """Symmetric int8 with one scale per output channel (reducing over `input_axes`)."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=input_axes, keepdims=True) / 127
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return QTensor(jnp.asarray(values), jnp.asarray(scale))


def quantize(params) -> QuantizedParams:
    """int8 weights, float32 scales, biases and LayerNorm parameters (on the host, once)."""
    def one(path, w):
        if np.ndim(w) < 2:
            return jnp.asarray(w, jnp.float32)
        name = getattr(path[-1], "key", None)
        return quantize_array(w, _input_axes(name, np.ndim(w)))
    return QuantizedParams(jax.tree_util.tree_map_with_path(one, params))


@jax.jit
def dequantize(q: QuantizedParams) -> dict:
    """float32 params: values * scale (traceable; jitted once per model layout)."""
    def one(t):
        return t.values.astype(jnp.float32) * t.scale if isinstance(t, QTensor) else t
    return jax.tree.map(one, q.params, is_leaf=lambda t: isinstance(t, QTensor))


def quantized_bytes(q: QuantizedParams) -> int:
    """Bytes of the int8 values, float32 scales and float32 kept parameters."""
    return gpt.param_bytes(q)


def apply_quantized(config: gpt.GPTConfig, q: QuantizedParams, tokens, masks=None,
                    capture: bool = False):
    """`gpt.apply` with the dequantized weights."""
    return gpt.apply(config, dequantize(q), tokens, masks, capture)


def error_bound(q: QuantizedParams) -> dict:
    """Per leaf, the largest possible round-trip error (its largest scale / 2; 0 if kept)."""
    return jax.tree.map(lambda t: float(t.scale.max()) / 2 if isinstance(t, QTensor) else 0.0,
                        q.params,
                        is_leaf=lambda t: isinstance(t, QTensor))
