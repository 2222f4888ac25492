"""Floats as the unsigned integers of their bit patterns, to move 16-bit floats through XLA:CPU.

XLA:CPU's float normalization runs bfloat16 data movement (pads, slices, concatenates, dynamic
updates, loop carries) through float32: converts of whole arrays, and float32 copies where the
values only travel. Moved as uint16 bit patterns the same values stay 16-bit, and the bitcasts to
and from them are exact and fuse into their neighbours. Used by the decode loop's stacks
(`models.var`), the CPU row-block convolution (`ops.conv_rows`) and the CPU attention's block
loop (`ops.attention`), each with its own measurement.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_UINT_OF_WIDTH = {2: jnp.uint16, 4: jnp.uint32}


def to_bits(x):
  """x's bit patterns as unsigned integers of its width (uint16 for bfloat16, uint32 for float32)."""
  return jax.lax.bitcast_convert_type(x, _UINT_OF_WIDTH[jnp.dtype(x.dtype).itemsize])


def from_bits(bits, dtype):
  """The `dtype` values whose bit patterns `bits` holds (the inverse of `to_bits`)."""
  return jax.lax.bitcast_convert_type(bits, dtype)
