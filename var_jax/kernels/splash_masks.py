"""Attention masks of VAR as "row end" vectors, and the splash-attention mask object built on them.

Both masks VAR needs have the same shape: query row r sees exactly the keys [0, row_end[r]).
* Training (teacher forcing): token q sees token k iff scale(k) <= scale(q), i.e. iff k < end of
  q's scale (tokens run scale by scale), so row_end[q] = end of scale(q).
* Sampling: every query of the current scale sees the whole KV-cache prefix, row_end[q] = kv_len.

`RowEndMask` hands this vector to splash attention as its in-kernel `q_sequence`, so the mask
inside the kernel is one integer compare per logit (as cheap as splash's own causal mask), and
splash still skips the fully masked blocks it finds when it summarises the mask at trace time.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from var_jax import scales
from var_jax.errors import ConfigError


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `value`."""
  return -(-value // multiple) * multiple


def block_causal_row_ends(patch_nums: Sequence[int], padded_len: int) -> np.ndarray:
  """int32 (padded_len,): row r of the VAR training mask sees keys [0, row_end[r]).

  Real tokens see up to the end of their own scale. Padding rows (r >= L) see every real token,
  so their softmax stays finite; their outputs are sliced off and get no gradient. Padding keys
  (k >= L) are visible to no row, so they never change a real output.
  """
  pns = scales.validate_patch_nums(patch_nums)
  seq_len = scales.seq_len(pns)
  if padded_len < seq_len:
    raise ConfigError(f"padded_len={padded_len} is shorter than the sequence L={seq_len}.")
  scale_ends = np.array([end for _, end in scales.begin_ends(pns)], np.int32)
  row_end = np.full(padded_len, seq_len, np.int32)
  row_end[:seq_len] = scale_ends[scales.scale_ids(pns)]
  return row_end


def prefix_row_ends(num_rows: int, kv_len: int) -> np.ndarray:
  """int32 (num_rows,): every query row sees the first `kv_len` keys (sampling with a KV cache)."""
  if kv_len < 1:
    raise ConfigError(f"kv_len must be >= 1, got {kv_len}.")
  return np.full(num_rows, kv_len, np.int32)


def dense_from_row_ends(row_end: np.ndarray, num_cols: int) -> np.ndarray:
  """bool (rows, num_cols): the dense mask a row-end vector stands for (True = visible)."""
  return np.arange(num_cols)[None, :] < np.asarray(row_end)[:, None]


def _row_end_mask_function(row_end, col):
  """The mask as splash evaluates it, on numpy at trace time and on jnp inside the kernel."""
  return col < row_end


class RowEndMask(mask_lib._ComputableMask):  # pylint: disable=protected-access
  """Lazy (rows, cols) splash mask: row r sees columns [0, row_end[r]).

  Splash's computable masks (its CausalMask, LocalMask, ChunkedCausalMask) pass a per-row int32
  vector `q_sequence` into the kernel and call `mask_function(q_sequence, column_index)` there.
  They store row indices in it; this mask stores each row's end instead, which is what turns the
  block-causal-over-scales mask into a single compare.
  """

  def __init__(self, row_end: np.ndarray, num_cols: int):
    row_end = np.asarray(row_end, np.int32)
    if row_end.ndim != 1:
      raise ConfigError(f"row_end must be 1-D, got shape {row_end.shape}.")
    if num_cols < 1 or row_end.min(initial=num_cols) < 1 or row_end.max(initial=0) > num_cols:
      raise ConfigError(
          f"Every row must see between 1 and num_cols={num_cols} keys; row_end spans "
          f"[{row_end.min(initial=0)}, {row_end.max(initial=0)}]."
      )
    super().__init__(shape=(row_end.shape[0], num_cols), mask_function=_row_end_mask_function)
    self.q_sequence = row_end

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, RowEndMask):
      return NotImplemented
    return self.shape == other.shape and np.array_equal(self.q_sequence, other.q_sequence)

  def __hash__(self) -> int:
    return hash((type(self), self.shape, self.q_sequence.tobytes()))


def block_causal_splash_mask(
    patch_nums: Sequence[int], padded_len: int, num_heads: int
) -> mask_lib.MultiHeadMask:
  """The (num_heads, padded_len, padded_len) splash mask of VAR training, shared by all heads."""
  head_mask = RowEndMask(block_causal_row_ends(patch_nums, padded_len), padded_len)
  return mask_lib.MultiHeadMask([head_mask] * num_heads)
