"""`Conv` and `Linear`: `nnx.Conv` and `nnx.Linear`, with gradients laid out for the CPU on
the CPU path.

On the CPU path (`lottery.platform`: switched on by the entry points when JAX's backend is a
CPU, read here when a model is traced) the layers compute their gradients with the two CPU
kernels below; off it they are the plain `nnx` layers (`lax.dot_general`,
`lax.conv_general_dilated`) with all of JAX's autodiff, forward mode included.

`Linear`: JAX's transpose rule computes the kernel gradient of `x @ W` as `(g^T x)^T`, a
(out, in) product followed by a transpose that XLA's CPU backend does not fold away, so the
optimizer's elementwise updates read the gradient with a stride (LeNet-300-100's Adam step
spent as long in two of them as in its largest matmul). `matmul` is `x @ W` with a
`custom_vjp` that computes `x^T g` in the kernel's own (in, out) layout. Its cost: no
forward-mode autodiff through it (`jax.jvp`); second derivatives go reverse over reverse.

`Conv`: XLA's CPU backend computes the gradient of a 2-D convolution far slower than its
forward pass (Conv-2 at batch 60: forward 52 ms, gradient 1.9 s). Written as shifted slices
of the padded input, concatenated along channels, times the reshaped kernel, the same
convolution is a plain matmul, and so is its gradient (one 3x3 64->64 layer at batch 60:
gradient 0.33 s instead of 1.53 s); but that form's forward pass is slower than XLA's (it
materialises the columns). So the forward pass stays `lax.conv_general_dilated` and only
the backward pass goes through the im2col form (a `custom_vjp`; forward mode is lost the
same way). Convolutions this does not cover (dilation, groups, other layouts) use
`lax.conv_general_dilated` unchanged on either path.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from lottery import platform

CHANNELS_LAST = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # NHWC, HWIO, NHWC
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _covered(lhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count) -> bool:
    """Whether the im2col gradient applies: a 2-D, channels-last, undilated conv on the CPU
    path."""
    if not platform.on_cpu_path() or lhs.ndim != 4 or feature_group_count != 1:
        return False
    if not hasattr(dimension_numbers, "lhs_spec") or len(window_strides) != 2:
        return False
    specs = (dimension_numbers.lhs_spec, dimension_numbers.rhs_spec, dimension_numbers.out_spec)
    undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    return tuple(map(tuple, specs)) == CHANNELS_LAST and undilated


def im2col_conv(x, kernel, strides, padding):
    """The NHWC convolution as (shifted slices of the padded input) @ (reshaped kernel)."""
    kh, kw, cin, cout = kernel.shape
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    sh, sw = strides
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    columns = jnp.concatenate(
        [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    return matmul(columns, kernel.reshape(kh * kw * cin, cout))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=DIMENSIONS)


def _conv_forward(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_backward(strides, padding, residuals, cotangent):
    _, pullback = jax.vjp(partial(im2col_conv, strides=strides, padding=padding), *residuals)
    return pullback(cotangent)


_conv.defvjp(_conv_forward, _conv_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         **kwargs):
    """Drop-in for `lax.conv_general_dilated` (as `nnx.Conv` calls it)."""
    if not _covered(lhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count):
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, **kwargs)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _conv(lhs, rhs, tuple(window_strides), padding)


def Conv(*args, **kwargs) -> nnx.Conv:
    """`nnx.Conv`, with the CPU-friendly convolution gradient above on the CPU path."""
    return nnx.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


@jax.custom_vjp
def matmul(x, kernel):
    """`x @ kernel` (kernel 2-D, contracted with x's last axis); gradients in their layouts."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_forward(x, kernel):
    return matmul(x, kernel), (x, kernel)


def _matmul_backward(residuals, cotangent):
    x, kernel = residuals
    rows = cotangent.reshape(-1, cotangent.shape[-1])
    d_kernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), rows, (((0,), (0,)), ((), ())))
    d_x = jax.lax.dot_general(cotangent, kernel, (((cotangent.ndim - 1,), (1,)), ((), ())))
    return d_x, d_kernel


matmul.defvjp(_matmul_forward, _matmul_backward)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
    """Drop-in for `lax.dot_general` as `nnx.Linear` calls it: on the CPU path, `matmul` for
    its plain (..., in) x (in, out) product; `lax.dot_general` for anything else."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
             and rhs.ndim == 2 and not lhs_batch and not rhs_batch)
    default = precision is None and preferred_element_type is None \
        and kwargs.get("out_sharding") is None
    if plain and default and platform.on_cpu_path():
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def Linear(*args, **kwargs) -> nnx.Linear:
    """`nnx.Linear`, with the kernel gradient in the kernel's layout (`matmul` above) on the
    CPU path."""
    return nnx.Linear(*args, dot_general=dot_general, **kwargs)
