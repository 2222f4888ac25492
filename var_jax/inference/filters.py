"""Per-token logit filters and the guidance schedule of the official sampler (VAR_SPEC §6.2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import InputError

def filter_top_k_top_p(logits_BlV: jax.Array, top_k, top_p) -> jax.Array:
  """The official `sample_with_top_k_top_p_` filter, as a function: removed logits become -inf.

  top-k (k > 0): drop logits strictly below the k-th largest (ties at the threshold survive).
  top-p (p > 0), on the top-k-filtered logits: keep a token iff the probability mass of the tokens
  ranked above it is < p; the largest token always survives. Both thresholds are found on one
  ascending sort, so `top_k` and `top_p` may be traced values.
  """
  V = logits_BlV.shape[-1]
  neg_inf = jnp.asarray(-jnp.inf, logits_BlV.dtype)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  asc = jnp.sort(logits_BlV, axis=-1)
  kth = jax.lax.dynamic_index_in_dim(asc, jnp.clip(V - top_k, 0, V - 1), axis=-1, keepdims=True)
  k_on = top_k > 0
  logits_BlV = jnp.where(k_on & (logits_BlV < kth), neg_inf, logits_BlV)
  asc = jnp.where(k_on & (asc < kth), neg_inf, asc)  # the same filter on the sorted copy
  cum = jnp.cumsum(jax.nn.softmax(asc.astype(jnp.float32), axis=-1), axis=-1)
  removed = (cum <= 1.0 - top_p).at[..., -1].set(False)
  n_removed = jnp.sum(removed, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(asc, n_removed, axis=-1)
  p_on = top_p > 0
  return jnp.where(p_on & (logits_BlV < threshold), neg_inf, logits_BlV)


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
