"""Matmuls of the models: operands in the compute dtype, float32 accumulation, compute dtype out.

With bfloat16 compute this is what a TPU's MXU does anyway; XLA's CPU backend does it only when
asked for a float32 result (a bf16 x bf16 -> bf16 dot or convolution there accumulates in bf16
steps on a slow path: 2-4x slower than with a float32 result, measured on a 2-core AVX-512 host
for the VAR-d16 shapes). So every linear, einsum and convolution of the models asks for a float32
result and casts it back. In float32 these are the plain ops (the same result bit for bit).

Biases join the float32 sums before that one rounding (`Dense`, `Conv`, `einsum(bias=)`), as a
TPU's MXU epilogue and oneDNN's bf16 linear (torch under autocast on CPU) add them. Besides the
rounding it saves, this keeps training's bias gradients in float32: autodiff sums a bias's output
gradient over the batch and tokens in the dtype of the add, and XLA:CPU reduces a bfloat16 array
with a bfloat16 accumulator (VAR's head bias gradient came out 14.6% off at 8 x 680 tokens on CPU).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.ops import cpu_gemm


def _rounded_once(sums, bias, dtype):
  """float32 `sums` plus `bias` (None: none; broadcasting against them, rounded to `dtype` first,
  as torch's autocast casts a linear's bias), rounded once to `dtype`."""
  if bias is not None:
    sums = sums + bias.astype(dtype).astype(jnp.float32)
  return sums.astype(dtype)


def einsum(subscripts: str, *operands, bias=None):
  """`jnp.einsum` accumulated in float32, returned in the operands' dtype; `bias` is added to the
  float32 sums before the one rounding (`_rounded_once`). A float32 einsum that is one matmul
  runs through OpenBLAS where `cpu_gemm.enabled` (one CPU device)."""
  dtype = jnp.result_type(*operands)
  sums = None
  if len(operands) == 2 and cpu_gemm.enabled(*operands):
    sums = cpu_gemm.einsum_as_matmul(subscripts, *operands)
  if sums is None:
    sums = jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32)
  return _rounded_once(sums, bias, dtype)


class Dense(nn.Module):
  """`nn.Dense`'s layer (params "kernel" (in, features) and "bias" (features,), float32, the same
  initialisers), computed as `einsum` computes: operands in `dtype` (None: the inputs' and
  params' common dtype), float32 sums, the bias added to them before one rounding to `dtype`.
  Own module rather than `nn.Dense(dot_general=...)`: nn.Dense adds its bias after the matmul has
  returned in `dtype`, in `dtype`, which rounds twice and, in bfloat16, makes the bias gradient a
  bfloat16 sum (module docstring)."""
  features: int
  dtype: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    dtype = jnp.result_type(x, kernel) if self.dtype is None else jnp.dtype(self.dtype)
    return einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype), bias=bias)


class Conv(nn.Module):
  """`nn.Conv`'s 2-D layer on NHWC inputs (params "kernel" (kh, kw, in, features), HWIO, and with
  `use_bias` "bias" (features,), float32, nn.Conv's default initialisers), computed as `Dense`:
  operands in `dtype`, float32 sums, the bias added before one rounding to `dtype` (own module
  for the reason `Dense` gives). `padding`: ((top, bottom), (left, right))."""
  features: int
  kernel_size: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  strides: tuple[int, int] = (1, 1)
  use_bias: bool = True
  dtype: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x_BHWC):
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x_BHWC.shape[-1], self.features), jnp.float32)
    dtype = jnp.result_type(x_BHWC, kernel) if self.dtype is None else jnp.dtype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x_BHWC.astype(dtype), kernel.astype(dtype), self.strides, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else None)
    return _rounded_once(y, bias, dtype)
