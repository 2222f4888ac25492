"""VAR attention on GPU: a Pallas (Triton) flash-attention kernel with VAR's masks, fwd and bwd.

JAX ships no GPU kernel that takes VAR's block-causal-over-scales mask (its Pallas GPU `mha`
knows only causal and segment-id masks), so this module has one: flash attention (FlashAttention-2
forward, and its dq / dkv backward) where query row r sees keys [0, row_end[r]) — the "row end"
form of both VAR masks (`splash_masks`). The mask costs one integer compare per logit, and every
q block stops its key loop at its last visible key block (the dkv kernel likewise starts its query
loop at the first query block that sees it): with 64 x 64 tiles the training kernels compute 70%
(256 px) and 66% (512 px) of the L² logits, against 62% and 65% visible.

Works on the arrays one device holds; the caller wraps it in shard_map.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from var_jax import scales
from var_jax.kernels import splash_masks

# Tile sizes (Triton needs powers of two, and >= 16 for tensor-core dots). 64 x 64 at 4 warps is
# the usual FlashAttention-2 tile for head_dim 64 when one size serves forward and backward (the
# backward holds ~twice the tiles per program); block granularity also bounds the masked logits
# computed (above). Not tuned on hardware: this project had no GPU to time it on.
BLOCK_Q = 64
BLOCK_K = 64
MIN_BLOCK_Q = 16
NUM_WARPS = 4
NUM_STAGES = 2
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call: the padded row ends, tiles, and how to run."""

  row_end: tuple[int, ...]  # per padded query row: it sees keys [0, row_end)
  block_q: int
  block_k: int
  interpret: bool

  @property
  def num_q_blocks(self) -> int:
    return len(self.row_end) // self.block_q

  def first_q_block_table(self, num_kv_blocks: int) -> np.ndarray:
    """int32 (power of two >= num_kv_blocks,): first query block that sees each key block."""
    row_end = np.asarray(self.row_end)
    block_max_end = row_end.reshape(self.num_q_blocks, self.block_q).max(axis=1)
    starts = np.arange(num_kv_blocks) * self.block_k
    first = np.searchsorted(block_max_end, starts, side="right").astype(np.int32)
    table = np.full(pl.next_power_of_2(num_kv_blocks), self.num_q_blocks, np.int32)
    table[:num_kv_blocks] = first
    return table


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _compiler_params():
  return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _num_visible_blocks(row_end_block, block_k):
  """Key blocks a query block must visit: up to the largest row end inside it."""
  return jax.lax.div(jnp.max(row_end_block) + block_k - 1, block_k)


def _visible(row_end_block, first_col, block_k):
  cols = first_col + jnp.arange(block_k)
  return cols[None, :] < row_end_block[:, None]


def _fwd_kernel(q_ref, k_ref, v_ref, row_end_ref, o_ref, lse_ref, *, block_k, precision):
  """Grid (q block, batch, head). q/o (bq, D), k/v (S, D), row_end/lse (bq,)."""
  q = q_ref[...]
  row_end = row_end_ref[...]
  block_q, head_dim = q.shape

  def body(j, carry):
    acc, m_prev, l_prev = carry
    k = k_ref[pl.ds(j * block_k, block_k), :]
    v = v_ref[pl.ds(j * block_k, block_k), :]
    logits = plgpu.dot(q, k, trans_b=True, precision=precision)
    logits = jnp.where(_visible(row_end, j * block_k, block_k), logits, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    rescale = jnp.exp(m_prev - m_next)
    probs = jnp.exp(logits - m_next[:, None])
    l_next = rescale * l_prev + jnp.sum(probs, axis=1)
    acc = rescale[:, None] * acc + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
    return acc, m_next, l_next

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), _MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, _num_visible_blocks(row_end, block_k), body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, row_end_ref, dq_ref, *,
               block_k, precision):
  """Grid (q block, batch, head). q/do/dq (bq, D), k/v (S, D), lse/delta/row_end (bq,)."""
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  row_end = row_end_ref[...]

  def body(j, dq):
    k = k_ref[pl.ds(j * block_k, block_k), :]
    v = v_ref[pl.ds(j * block_k, block_k), :]
    logits = plgpu.dot(q, k, trans_b=True, precision=precision)
    probs = jnp.where(_visible(row_end, j * block_k, block_k),
                      jnp.exp(logits - lse[:, None]), 0.0)
    dprobs = plgpu.dot(do, v, trans_b=True, precision=precision)
    dlogits = probs * (dprobs - delta[:, None])
    return dq + plgpu.dot(dlogits.astype(k.dtype), k, precision=precision)

  dq = jax.lax.fori_loop(0, _num_visible_blocks(row_end, block_k), body,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, row_end_ref, first_q_ref,
                dk_ref, dv_ref, *, block_q, num_q_blocks, precision):
  """Grid (k block, batch, head). k/v/dk/dv (bk, D), q/do (Lq, D), lse/delta/row_end (Lq,)."""
  kv_block = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]
  block_k = k.shape[0]
  table = first_q_ref[...]
  first_q_block = jnp.sum(jnp.where(jnp.arange(table.shape[0]) == kv_block, table, 0))

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    lse = lse_ref[rows]
    delta = delta_ref[rows]
    row_end = row_end_ref[rows]
    logits = plgpu.dot(q, k, trans_b=True, precision=precision)
    probs = jnp.where(_visible(row_end, kv_block * block_k, block_k),
                      jnp.exp(logits - lse[:, None]), 0.0)
    dv = dv + plgpu.dot(probs.astype(do.dtype), do, trans_a=True, precision=precision)
    dprobs = plgpu.dot(do, v, trans_b=True, precision=precision)
    dlogits = probs * (dprobs - delta[:, None])
    dk = dk + plgpu.dot(dlogits.astype(q.dtype), q, trans_a=True, precision=precision)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(first_q_block, num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q_BHQD, k_BHKD, v_BHKD, plan: _Plan):
  batch, heads, q_rows, head_dim = q_BHQD.shape
  kv_rows = k_BHKD.shape[2]
  bq = plan.block_q
  row_end = jnp.asarray(plan.row_end, jnp.int32)
  block_spec = pl.BlockSpec((None, None, bq, head_dim), lambda i, b, h: (b, h, i, 0))
  whole_kv = pl.BlockSpec((None, None, kv_rows, head_dim), lambda i, b, h: (b, h, 0, 0))
  row_spec = pl.BlockSpec((bq,), lambda i, b, h: (i,))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, block_k=plan.block_k, precision=_precision(q_BHQD.dtype)),
      grid=(q_rows // bq, batch, heads),
      in_specs=[block_spec, whole_kv, whole_kv, row_spec],
      out_specs=[block_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BHQD.shape, q_BHQD.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_rows), jnp.float32)],
      compiler_params=_compiler_params(),
      interpret=plan.interpret,
      name="var_attention_fwd",
  )(q_BHQD, k_BHKD, v_BHKD, row_end)


def _backward(plan: _Plan, residuals, do_BHQD):
  q_BHQD, k_BHKD, v_BHKD, o_BHQD, lse_BHQ = residuals
  batch, heads, q_rows, head_dim = q_BHQD.shape
  kv_rows = k_BHKD.shape[2]
  bq, bk = plan.block_q, plan.block_k
  precision = _precision(q_BHQD.dtype)
  row_end = jnp.asarray(plan.row_end, jnp.int32)
  delta_BHQ = jnp.sum(o_BHQD.astype(jnp.float32) * do_BHQD.astype(jnp.float32), axis=-1)

  q_block = pl.BlockSpec((None, None, bq, head_dim), lambda i, b, h: (b, h, i, 0))
  q_rows_block = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  whole_kv = pl.BlockSpec((None, None, kv_rows, head_dim), lambda i, b, h: (b, h, 0, 0))
  dq_BHQD = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=bk, precision=precision),
      grid=(q_rows // bq, batch, heads),
      in_specs=[q_block, whole_kv, whole_kv, q_block, q_rows_block, q_rows_block,
                pl.BlockSpec((bq,), lambda i, b, h: (i,))],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q_BHQD.shape, q_BHQD.dtype),
      compiler_params=_compiler_params(),
      interpret=plan.interpret,
      name="var_attention_dq",
  )(q_BHQD, k_BHKD, v_BHKD, do_BHQD, lse_BHQ, delta_BHQ, row_end)

  num_kv_blocks = kv_rows // bk
  table = plan.first_q_block_table(num_kv_blocks)
  kv_block = pl.BlockSpec((None, None, bk, head_dim), lambda j, b, h: (b, h, j, 0))
  whole_q = pl.BlockSpec((None, None, q_rows, head_dim), lambda j, b, h: (b, h, 0, 0))
  whole_q_rows = pl.BlockSpec((None, None, q_rows), lambda j, b, h: (b, h, 0))
  dk_BHKD, dv_BHKD = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq, num_q_blocks=plan.num_q_blocks,
                        precision=precision),
      grid=(num_kv_blocks, batch, heads),
      in_specs=[whole_q, kv_block, kv_block, whole_q, whole_q_rows, whole_q_rows,
                pl.BlockSpec((q_rows,), lambda j, b, h: (0,)),
                pl.BlockSpec((table.shape[0],), lambda j, b, h: (0,))],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k_BHKD.shape, k_BHKD.dtype),
                 jax.ShapeDtypeStruct(v_BHKD.shape, v_BHKD.dtype)],
      compiler_params=_compiler_params(),
      interpret=plan.interpret,
      name="var_attention_dkv",
  )(q_BHQD, k_BHKD, v_BHKD, do_BHQD, lse_BHQ, delta_BHQ, row_end, jnp.asarray(table))
  return dq_BHQD, dk_BHKD, dv_BHKD


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _row_end_attention(q_BHQD, k_BHKD, v_BHKD, plan: _Plan):
  return _forward(q_BHQD, k_BHKD, v_BHKD, plan)[0]


def _row_end_attention_fwd(q_BHQD, k_BHKD, v_BHKD, plan: _Plan):
  o_BHQD, lse_BHQ = _forward(q_BHQD, k_BHKD, v_BHKD, plan)
  return o_BHQD, (q_BHQD, k_BHKD, v_BHKD, o_BHQD, lse_BHQ)


_row_end_attention.defvjp(_row_end_attention_fwd, _backward)


def _pad_rows(x_BHND, rows: int):
  return jnp.pad(x_BHND, ((0, 0), (0, 0), (0, rows - x_BHND.shape[2]), (0, 0)))


def block_causal_attention(q_BHLD, k_BHLD, v_BHLD, *, patch_nums: Sequence[int], interpret: bool):
  """VAR training attention on one device's shard; inputs (B, H, L, D), q pre-scaled."""
  seq_len = q_BHLD.shape[2]
  padded_len = splash_masks.round_up(seq_len, max(BLOCK_Q, BLOCK_K))
  plan = _Plan(
      row_end=tuple(splash_masks.block_causal_row_ends(scales.validate_patch_nums(patch_nums),
                                                       padded_len).tolist()),
      block_q=BLOCK_Q, block_k=BLOCK_K, interpret=interpret)
  out = _row_end_attention(_pad_rows(q_BHLD, padded_len), _pad_rows(k_BHLD, padded_len),
                           _pad_rows(v_BHLD, padded_len), plan)
  return out[:, :, :seq_len]


def prefix_attention(q_BHlD, k_BHSD, v_BHSD, *, kv_len: int, interpret: bool):
  """Queries of one scale against cache entries [0, kv_len) on one device's shard; q pre-scaled.

  The kernel reads the cache in place when its length is a multiple of BLOCK_K (allocate it with
  `attention.kv_cache_len`); otherwise the cache is padded first, which copies it.
  """
  q_rows = q_BHlD.shape[2]
  block_q = min(BLOCK_Q, max(MIN_BLOCK_Q, pl.next_power_of_2(q_rows)))
  padded_rows = splash_masks.round_up(q_rows, block_q)
  cache_len = k_BHSD.shape[2]
  padded_cache = splash_masks.round_up(cache_len, BLOCK_K)
  if padded_cache != cache_len:
    k_BHSD, v_BHSD = _pad_rows(k_BHSD, padded_cache), _pad_rows(v_BHSD, padded_cache)
  plan = _Plan(row_end=tuple(splash_masks.prefix_row_ends(padded_rows, kv_len).tolist()),
               block_q=block_q, block_k=BLOCK_K, interpret=interpret)
  out = _row_end_attention(_pad_rows(q_BHlD, padded_rows), k_BHSD, v_BHSD, plan)
  return out[:, :, :q_rows]
