"""Plain-XLA attention: the reference every kernel is tested against, and the path on CPU.

Softmax scale is 1 (VAR folds its attn_l2_norm scale into q before attention). Logits and softmax
are float32. float32 inputs use precision=HIGHEST on both contractions. The softmax is normalised
after P·V: out = (exp(logits - max) · v) / sum(exp(logits - max)), the order of the flash kernels
(ours, and torch's `scaled_dot_product_attention`, which the official model calls) instead of
normalising the (Q, K) probabilities first; for bfloat16 inputs the exponentials are rounded to
bfloat16 before P·V (float32 accumulation), as those kernels do under autocast.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from var_jax import scales


def _precision(dtype) -> jax.lax.Precision:
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def masked_attention(q_BHQD, k_BHKD, v_BHKD, visible_QK=None, *, q_layout: str = "bhqd"):
  """softmax(q kᵀ) v over the keys where `visible_QK` (bool, broadcastable to (Q, K)) is True.

  q_layout "bqhd": q comes as (B, Q, H, D), queries before heads, the layout the q projection
  produces; the output is (B, H, Q, D) either way. The CPU sampler passes q so: when the QK
  matmul's q is a transpose, XLA:CPU runs that bf16 matmul in float32 (both operands widened, in
  every layer), where from the projection's layout it stays bf16.
  """
  if q_layout not in ("bhqd", "bqhd"):
    raise ValueError(f"q_layout must be 'bhqd' or 'bqhd', got {q_layout!r}")
  precision = _precision(q_BHQD.dtype)
  logits_BHQK = jnp.einsum(
      f"{q_layout},bhkd->bhqk", q_BHQD, k_BHKD, precision=precision,
      preferred_element_type=jnp.float32
  )
  if visible_QK is not None:
    logits_BHQK = jnp.where(visible_QK, logits_BHQK, -jnp.inf)
  # Normalised after P·V (module docstring): the division runs over (Q, D) outputs instead of the
  # (Q, K) probabilities, one pass over the logits fewer. On a 2-core AMD EPYC, alternated:
  # VAR-d16's float32 CPU attention over all ten scales at batch 8, 4 of its 16 layers, 1006 ->
  # 909 ms; the public float32 sampling call at batch 8 37.41 -> 36.04 s (medians of 5), its
  # tokens and images identical.
  max_BHQ1 = jax.lax.stop_gradient(jnp.max(logits_BHQK, axis=-1, keepdims=True))
  exp_BHQK = jnp.exp(logits_BHQK - max_BHQ1)
  sum_BHQ1 = jnp.sum(exp_BHQK, axis=-1, keepdims=True)
  out_BHQD = jnp.einsum(
      "bhqk,bhkd->bhqd",
      exp_BHQK.astype(v_BHKD.dtype),
      v_BHKD,
      precision=precision,
      preferred_element_type=jnp.float32,
  ) / sum_BHQ1
  return out_BHQD.astype(q_BHQD.dtype)


def block_causal_attention(q_BHLD, k_BHLD, v_BHLD, *, patch_nums: Sequence[int]):
  """Teacher-forcing attention over all L tokens: token q sees token k iff scale(k) <= scale(q)."""
  visible_LL = jnp.asarray(scales.block_causal_mask(patch_nums), dtype=bool)
  return masked_attention(q_BHLD, k_BHLD, v_BHLD, visible_LL)


def prefix_attention(q_BHlD, k_BHSD, v_BHSD, *, kv_len: int, q_layout: str = "bhqd"):
  """Queries of one scale against the first `kv_len` entries of the KV cache, unmasked (q as
  `masked_attention`'s q_layout says)."""
  return masked_attention(q_BHlD, k_BHSD[:, :, :kv_len], v_BHSD[:, :, :kv_len], q_layout=q_layout)

