"""Matmuls of the models: operands in the compute dtype, float32 accumulation, compute dtype out.

With bfloat16 compute this is what a TPU's MXU does anyway; XLA's CPU backend does it only when
asked for a float32 result (a bf16 x bf16 -> bf16 dot or convolution there accumulates in bf16
steps on a slow path: 2-4x slower than with a float32 result, measured on a 2-core AVX-512 host
for the VAR-d16 shapes). So every linear, einsum and convolution of the models asks for a float32
result and casts it back. In float32 these are the plain ops (the same result bit for bit).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` accumulated in float32, returned in the operands' dtype (`nn.Dense`'s
  `dot_general`)."""
  del preferred_element_type  # always float32 accumulation
  out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                            preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(lhs, rhs))


def einsum(subscripts: str, *operands):
  """`jnp.einsum` accumulated in float32, returned in the operands' dtype."""
  out = jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(*operands))


def conv_general_dilated(lhs, rhs, *args, preferred_element_type=None, **kwargs):
  """`lax.conv_general_dilated` accumulated in float32, returned in the operands' dtype
  (`nn.Conv`'s `conv_general_dilated`)."""
  del preferred_element_type
  out = jax.lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=jnp.float32, **kwargs)
  return out.astype(jnp.result_type(lhs, rhs))
