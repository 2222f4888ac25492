"""Per-token logit filters and the guidance schedule of the official sampler (VAR_SPEC §6.2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import InputError
from var_jax.ops.attention import computation_platform


def _order_key(x: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 values (-inf < ... < 0 < ... < inf; -0 is +0)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
  sign = jnp.uint32(0x80000000)
  return jnp.where(bits >= sign, ~bits, bits | sign)


def radix_bits_per_pass() -> int:
  """Bits of the threshold decided per pass over the vocabulary in `filter_top_k_top_p`.

  A pass of w bits reads the row once and tests 2**w - 1 candidate thresholds. TPU (4): the
  passes are HBM reads of the logits, and fewer of them win; XLA's TPU cost analysis of the
  filter on 2 x 256 rows of 4096 logits (VAR-d16's last scale at batch 2) charges 873 MB with
  1-bit passes, 496 MB with 2 and 296 MB with 4 (8: 208 MB but 13 GFLOP). CPU (1): the rows stay
  in cache and the candidates' compares are what costs: 40 ms for those rows with 1 bit, 72 ms
  with 2, 236 ms with 4 (2-core AVX-512 host). GPU: 1 until a GPU run decides.
  """
  return 4 if computation_platform() == "tpu" else 1


def radix_passes_looped() -> bool:
  """Whether `filter_top_k_top_p` runs its radix passes in a loop (CPU) or unrolled (TPU, GPU).

  Unrolled, each pass is its own fusions: with 1-bit passes, 64 per scale (two thresholds), 640
  in a VAR-d16 call, which XLA:CPU compiles slowly while a loop trip costs the CPU next to
  nothing. On 2 cores, the 4-scale test model's sampler compiles in 5.6 s looped against 12.7 s;
  VAR-d16's first call at batch 1 takes 21-22 s against 37-41 s, its steady calls the same
  (6.1-6.7 s looped, 6.2-6.3 s unrolled, within the runs' spread), the tokens equal. TPU keeps
  them unrolled: its AOT report takes the sampler's costs from XLA's cost analysis, which charges
  a loop body once. GPU too: a while loop there synchronises with the host on every trip.
  """
  return computation_platform() == "cpu"


def _radix_select(count_holding, shape, bits_per_pass: int, looped: bool) -> jax.Array:
  """The largest uint32 t (per row, keepdims) for which a predicate holds, where the predicate
  holds for every t up to some bound and fails above it (0 when it holds nowhere: callers check).

  Found from the top bit down, `bits_per_pass` bits per pass: each pass forms the 2**w - 1
  candidates t | j << low (j = 1 .. 2**w - 1) and `count_holding(candidates)` says for how many
  the predicate holds, which by monotonicity is the best j. A first, narrower pass takes the
  remainder when bits_per_pass does not divide 32; the passes of full width run in a `fori_loop`
  when `looped`, else unrolled.

  Args:
    count_holding: (..., n) uint32 candidates (a row's n candidates along the last axis) ->
      (..., 1) int32, the number of candidates of each row for which the predicate holds.
    shape: the rows' shape, (..., 1).
    bits_per_pass: 1 to 16.
    looped: see `radix_passes_looped`.
  """
  def one_pass(t, width, low):  # low: a Python int (unrolled) or a traced one (in the loop)
    low = jnp.asarray(low).astype(jnp.uint32)
    candidates = t | (jnp.arange(1, 2**width, dtype=jnp.uint32) << low)
    return t | (count_holding(candidates).astype(jnp.uint32) << low)

  t = jnp.zeros(shape, jnp.uint32)
  w = bits_per_pass
  high = 32 - 32 % w
  if high < 32:  # the narrower pass first: the others then share one width
    t = one_pass(t, 32 - high, high)
  trip = lambda i, t: one_pass(t, w, high - w * (i + 1))  # pass i decides bits [low, low + w)
  if looped:
    return jax.lax.fori_loop(0, high // w, trip, t)
  for i in range(high // w):
    t = trip(i, t)
  return t


def filter_top_k_top_p(logits_BlV: jax.Array, top_k, top_p, *,
                       bits_per_pass: int | None = None, looped: bool | None = None) -> jax.Array:
  """The official `sample_with_top_k_top_p_` filter, as a function: removed logits become -inf.

  top-k (k > 0): drop logits strictly below the k-th largest (ties at the threshold survive).
  top-p (p > 0), on the top-k-filtered logits: drop a token iff the probability mass of it and of
  every token below it is <= 1 - p; the largest token always survives.

  No sort: each threshold is a radix select over the float's bit pattern (32 bits, decided
  `bits_per_pass` at a time by counts or masked sums over the vocabulary; default
  `radix_bits_per_pass()`, the backend's choice; the passes in a loop or unrolled as `looped`,
  default `radix_passes_looped()`), so `top_k` and `top_p` may be traced values and the cost is
  linear in V. (A full sort of every row's 4096 logits was the sampler's costliest
  non-matmul op on CPU; `lax.top_k` needs a static k, and `approx_max_k` is not exact.)
  """
  if bits_per_pass is None:
    bits_per_pass = radix_bits_per_pass()
  if (isinstance(bits_per_pass, bool) or not isinstance(bits_per_pass, int)
      or not 1 <= bits_per_pass <= 16):
    raise InputError(f"bits_per_pass must be an int in [1, 16], got {bits_per_pass!r}.")
  if looped is None:
    looped = radix_passes_looped()
  neg_inf = jnp.asarray(-jnp.inf, logits_BlV.dtype)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  rows = logits_BlV.shape[:-1] + (1,)
  key = _order_key(logits_BlV)

  key_V1 = key[..., None, :]  # (..., 1, V): a row's candidate thresholds go along axis -2

  # top-k: the k-th largest key is the largest t with at least k keys >= t.
  def count_top_k(t_n):
    at_or_above_n = jnp.sum(key_V1 >= t_n[..., None], axis=-1, dtype=jnp.int32)
    return jnp.sum(at_or_above_n >= top_k, axis=-1, keepdims=True, dtype=jnp.int32)

  kth = _radix_select(count_top_k, rows, bits_per_pass, looped)
  logits_BlV = jnp.where((top_k > 0) & (key < kth), neg_inf, logits_BlV)

  # top-p: the removed tokens are those at or below the largest key t whose mass (its own and that
  # of every token below it) is <= 1 - p.
  # The keys of the unfiltered logits serve: a token top-k removed has zero probability, so it
  # moves no mass and its key decides nothing. No key t >= 1 is all-removing with mass 0 unless
  # the row is empty; t = 0 (the start) is a NaN pattern's key only, so `key <= cut` is the set.
  probs = jax.nn.softmax(logits_BlV.astype(jnp.float32), axis=-1)
  budget = 1.0 - top_p
  probs_V1 = probs[..., None, :]

  def count_top_p(t_n):
    mass_n = jnp.sum(jnp.where(key_V1 <= t_n[..., None], probs_V1, 0.0), axis=-1)
    return jnp.sum(mass_n <= budget, axis=-1, keepdims=True, dtype=jnp.int32)

  cut = _radix_select(count_top_p, rows, bits_per_pass, looped)
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
