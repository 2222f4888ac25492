"""Sampling attention on TPU: one scale's queries against the KV-cache prefix, as a Pallas kernel.

Why not splash or the shipped flash kernel: both run one head per grid step, and a sampling step
is many tiny heads (2B x H of them, each pn² query rows against <= L keys), so their ~0.35 us fixed
cost per grid step would dominate the small and middle scales (the flash kernel would also need
the key length to be a multiple of its block, i.e. a sliced copy of the cache prefix). This
kernel takes a block of heads per grid step instead, reads the prefix straight out of the
preallocated cache (a block of round_up(kv_len, 8 or 16) rows, starting at 0), masks the few rows
past kv_len in-kernel, and does a single-pass softmax: the whole prefix of one head fits VMEM, so
no online-softmax rescaling is needed. It declares its flops, exps and HBM bytes to the TPU cost
model (pl.CostEstimate), which is how `attention.PREFIX_KERNEL_MIN_ROWS` was decided.

Works on the arrays one device holds; the caller wraps it in shard_map.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from var_jax.kernels.splash_masks import round_up

# VMEM budget of one grid step (the smallest scoped VMEM default, v4/v5e, is 16 MiB):
_LOGITS_VMEM_BYTES = 6 * 2**20  # ~3 live float32 (rows, kv) temporaries of one head
_BLOCKS_VMEM_BYTES = 4 * 2**20  # q, o, k, v blocks of all heads in the step, double-buffered
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT_DIMS = (((1,), (1,)), ((), ()))  # q (rows, D) · k (kv, D)ᵀ
_NN_DIMS = (((1,), (0,)), ((), ()))  # p (rows, kv) · v (kv, D)


def sublane_tile(dtype) -> int:
  """Rows of one TPU vreg tile: 8 for 32-bit, 16 for 16-bit dtypes (packed)."""
  return 32 // jnp.dtype(dtype).itemsize


def plan_blocks(num_heads: int, q_rows: int, kv_block: int, head_dim: int, dtype):
  """(heads_per_block, rows_per_block, padded_rows) for one kernel call.

  All query rows go in one block (a block spanning the whole axis needs no tile alignment, so q
  needs no padding) when their float32 logits fit `_LOGITS_VMEM_BYTES`. Otherwise rows are padded
  to the sublane tile and split into the largest tile-multiple divisor that fits. Then as many
  heads per step as fit `_BLOCKS_VMEM_BYTES` (and divide num_heads).
  """
  def fits(rows):
    return 3 * rows * kv_block * 4 <= _LOGITS_VMEM_BYTES

  tile = sublane_tile(dtype)
  if fits(q_rows):
    rows = padded_rows = q_rows
  else:
    padded_rows = round_up(q_rows, tile)
    rows = next((r for r in range(padded_rows - tile, 0, -tile)
                 if padded_rows % r == 0 and fits(r)), tile)
  itemsize = jnp.dtype(dtype).itemsize
  per_head = 2 * 2 * (rows + kv_block) * head_dim * itemsize
  heads = max(h for h in range(1, num_heads + 1)
              if num_heads % h == 0 and (h == 1 or h * per_head <= _BLOCKS_VMEM_BYTES))
  return heads, rows, padded_rows


def _prefix_kernel(layer_ref, q_ref, k_ref, v_ref, o_ref, *, kv_len: int, precision):
  """One grid step: refs are q/o (heads, rows, D) and k/v (heads, kv_block, D); `layer_ref` (the
  scalar-prefetched layer index) is used by the BlockSpecs only."""
  del layer_ref
  kv_block = k_ref.shape[1]
  for h in range(q_ref.shape[0]):
    logits = jax.lax.dot_general(
        q_ref[h], k_ref[h], _NT_DIMS, precision=precision, preferred_element_type=jnp.float32
    )
    if kv_block > kv_len:
      col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
      logits = jnp.where(col < kv_len, logits, _MASK_VALUE)
    probs = jnp.exp(logits - logits.max(axis=1, keepdims=True))
    denom = probs.sum(axis=1, keepdims=True)
    v = v_ref[h]
    out = jax.lax.dot_general(
        probs.astype(v.dtype), v, _NN_DIMS, precision=precision, preferred_element_type=jnp.float32
    )
    o_ref[h] = (out / denom).astype(o_ref.dtype)


def kv_block_rows(kv_len: int, cache_len: int, dtype) -> int:
  """Cache rows the kernel reads: kv_len rounded up to the sublane tile, at most the cache."""
  return min(round_up(kv_len, sublane_tile(dtype)), cache_len)


def prefix_attention(q_BHlD, k_cache, v_cache, layer=None, *, kv_len: int, interpret: bool = False):
  """softmax(q kᵀ) v over cache entries [0, kv_len) for one device's shard; q pre-scaled.

  The caches are one layer's (B, H, S, D), or with `layer` (an int32 scalar, may be traced) the
  stack of all layers' (N, B, H, S, D): the kernel's DMAs then read that layer's rows
  straight out of the stack (scalar-prefetched block index), so the decode loop makes no
  per-layer copy of the cache for the kernel's operands.
  """
  if layer is None:
    k_NBHSD, v_NBHSD, layer = k_cache[None], v_cache[None], 0
  else:
    k_NBHSD, v_NBHSD = k_cache, v_cache
  batch, num_heads, q_rows, head_dim = q_BHlD.shape
  cache_len = k_NBHSD.shape[3]
  kv_block = kv_block_rows(kv_len, cache_len, q_BHlD.dtype)
  heads, rows, padded_rows = plan_blocks(num_heads, q_rows, kv_block, head_dim, q_BHlD.dtype)
  q_BHPD = q_BHlD
  if padded_rows != q_rows:
    q_BHPD = jnp.pad(q_BHlD, ((0, 0), (0, 0), (0, padded_rows - q_rows), (0, 0)))
  precision = (jax.lax.Precision.HIGHEST if q_BHlD.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  itemsize = q_BHlD.dtype.itemsize
  cost = pl.CostEstimate(
      flops=4 * batch * num_heads * padded_rows * kv_block * head_dim,
      transcendentals=batch * num_heads * padded_rows * kv_block,
      bytes_accessed=batch * num_heads * head_dim * itemsize * (2 * padded_rows + 2 * kv_block),
  )
  q_spec = pl.BlockSpec((None, heads, rows, head_dim), lambda b, h, r, layer_ref: (b, h, r, 0))
  kv_spec = pl.BlockSpec((None, None, heads, kv_block, head_dim),
                         lambda b, h, r, layer_ref: (layer_ref[0], b, h, 0, 0))
  out_BHPD = pl.pallas_call(
      functools.partial(_prefix_kernel, kv_len=kv_len, precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_heads // heads, padded_rows // rows),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=q_spec),
      out_shape=jax.ShapeDtypeStruct(q_BHPD.shape, q_BHlD.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
      name="var_prefix_attention",
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), q_BHPD, k_NBHSD, v_NBHSD)
  return out_BHPD if padded_rows == q_rows else out_BHPD[:, :, :q_rows]
