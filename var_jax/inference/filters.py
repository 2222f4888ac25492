"""Per-token logit filters and the guidance schedule of the official sampler (VAR_SPEC §6.2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import InputError


def _order_key(x: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 values (-inf < ... < 0 < ... < inf; -0 is +0)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
  sign = jnp.uint32(0x80000000)
  return jnp.where(bits >= sign, ~bits, bits | sign)


def _radix_select(predicate, shape) -> jax.Array:
  """The largest uint32 t (per row, keepdims) for which `predicate(t)` holds, where the predicate
  holds for every t up to some bound and fails above it; found bit by bit from the top, 32 passes
  over the rows. (0 when it holds nowhere: callers check.) Unrolled, not a `fori_loop`: the
  sampler then has no while loop but the layer scans, and XLA's cost analysis (which charges a
  loop body once) counts all 32 passes."""
  t = jnp.zeros(shape, jnp.uint32)
  for bit in range(31, -1, -1):
    cand = t | jnp.uint32(1 << bit)
    t = jnp.where(predicate(cand), cand, t)
  return t


def filter_top_k_top_p(logits_BlV: jax.Array, top_k, top_p) -> jax.Array:
  """The official `sample_with_top_k_top_p_` filter, as a function: removed logits become -inf.

  top-k (k > 0): drop logits strictly below the k-th largest (ties at the threshold survive).
  top-p (p > 0), on the top-k-filtered logits: drop a token iff the probability mass of it and of
  every token below it is <= 1 - p; the largest token always survives.

  No sort: each threshold is a radix select over the float's bit pattern (32 passes of a count or
  a masked sum over the vocabulary), so `top_k` and `top_p` may be traced values and the cost is
  linear in V. (A full sort of every row's 4096 logits was the sampler's costliest non-matmul op
  on CPU; `lax.top_k` needs a static k, and `approx_max_k` is not exact.)
  """
  neg_inf = jnp.asarray(-jnp.inf, logits_BlV.dtype)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  rows = logits_BlV.shape[:-1] + (1,)
  key = _order_key(logits_BlV)

  # top-k: the k-th largest key is the largest t with at least k keys >= t.
  kth = _radix_select(lambda t: jnp.sum(key >= t, axis=-1, keepdims=True, dtype=jnp.int32) >= top_k,
                      rows)
  logits_BlV = jnp.where((top_k > 0) & (key < kth), neg_inf, logits_BlV)

  # top-p: the removed tokens are those at or below the largest key t whose mass (its own and that
  # of every token below it) is <= 1 - p.
  # The keys of the unfiltered logits serve: a token top-k removed has zero probability, so it
  # moves no mass and its key decides nothing. No key t >= 1 is all-removing with mass 0 unless
  # the row is empty; t = 0 (the start) is a NaN pattern's key only, so `key <= cut` is the set.
  probs = jax.nn.softmax(logits_BlV.astype(jnp.float32), axis=-1)
  budget = 1.0 - top_p
  mass_at_or_below = lambda t: jnp.sum(jnp.where(key <= t, probs, 0.0), axis=-1, keepdims=True)
  cut = _radix_select(lambda t: mass_at_or_below(t) <= budget, rows)
  removed = key <= cut
  is_max = logits_BlV >= jnp.max(logits_BlV, axis=-1, keepdims=True)
  return jnp.where((top_p > 0) & removed & ~is_max, neg_inf, logits_BlV)


def guidance_scale(cfg, si: int, num_scales: int):
  """t = cfg * si / (K - 1): no guidance at the first scale, full cfg at the last."""
  return cfg * (si / (num_scales - 1) if num_scales > 1 else 0.0)


DEFAULT_TOP_K = 900  # The released models' setting (VAR_SPEC §6.2).


def effective_top_k(model, top_k):
  """One rule: any top_k >= the vocabulary size keeps every token (so the default 900 means "all"
  on a smaller vocabulary, e.g. shapes-tiny's 128 codes); 0 also keeps every token (off)."""
  if isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool):
    return min(int(top_k), model.config.vocab_size)
  return top_k


def check_sampling_options(model, cfg, top_k, top_p) -> None:
  """Raises InputError on guidance or filter values outside their ranges (before any compile)."""
  V = model.config.vocab_size
  top_k = effective_top_k(model, top_k)
  if not np.isscalar(cfg) or not np.isfinite(cfg) or cfg < 0:
    raise InputError(f"cfg (guidance scale) must be a finite number >= 0, got {cfg!r}.")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise InputError(f"top_k must be an int >= 0 (0 or >= {V}, the vocabulary size: keep all), "
                     f"got {top_k!r}.")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not 0.0 <= top_p <= 1.0:
    raise InputError(f"top_p must be a number in [0, 1] (0 = off), got {top_p!r}.")
