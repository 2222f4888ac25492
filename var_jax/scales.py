"""Token layout of next-scale prediction, derived from `patch_nums` alone.

Tokens run scale by scale, coarse to fine; inside a scale row by row over the pn x pn grid.
Scale `si` occupies tokens [begin_si, end_si) with end_si - begin_si = pn_si**2.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def validate_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """Returns `patch_nums` as a tuple of ints, or raises if it is not strictly increasing and >= 1."""
  pns = tuple(int(p) for p in patch_nums)
  if not pns:
    raise ValueError("patch_nums is empty: give at least one scale, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).")
  if pns[0] < 1 or any(b <= a for a, b in zip(pns, pns[1:])):
    raise ValueError(f"patch_nums must be strictly increasing positive ints, got {pns}.")
  return pns


def seq_len(patch_nums: Sequence[int]) -> int:
  """L: the total number of tokens over all scales."""
  return int(sum(p * p for p in patch_nums))


def begin_ends(patch_nums: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """[(begin, end)] token range of every scale."""
  out, cur = [], 0
  for p in patch_nums:
    out.append((cur, cur + p * p))
    cur += p * p
  return tuple(out)


def scale_ids(patch_nums: Sequence[int]) -> np.ndarray:
  """int32 (L,): the scale index of every token (the official `lvl_1L[0]`)."""
  return np.concatenate([np.full(p * p, si, np.int32) for si, p in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """bool (L, L): entry [q, k] is True when token k's scale <= token q's scale."""
  ids = scale_ids(patch_nums)
  return ids[None, :] <= ids[:, None]


def phi_index_table(num_scales: int, num_phi: int) -> tuple[int, ...]:
  """Which of `num_phi` shared Phi convolutions scale si uses (official `PhiPartiallyShared`).

  The official rule picks argmin_j |tick_j - si/(K-1)| in numpy float64. For K=10 and 4 Phis two
  scales (si=2, 7) are exact ties in real arithmetic and float64 rounding decides them, so this
  must stay float64 numpy: float32 (or exact rationals) give a table the checkpoints disagree with.
  """
  if num_phi <= 0:
    raise ValueError(f"num_phi must be >= 1, got {num_phi}.")
  if num_phi == 4:
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi, dtype=np.float64)
  else:
    ticks = np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi, dtype=np.float64)
  if num_scales == 1:
    return (int(np.argmin(np.abs(ticks - 0.0))),)
  return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))
