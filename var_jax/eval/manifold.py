"""Improved precision and recall (Kynkäänniemi et al., 2019) as the ADM evaluator computes them.

Each feature set spans a manifold: the union of balls around its vectors, each ball's squared
radius the squared distance to the vector's k-th nearest neighbour in its own set (k = 3; the
vector itself counts as its 0-th neighbour). Precision is the share of sample vectors inside the
reference manifold, recall the share of reference vectors inside the sample manifold; a point on
a ball's boundary is inside.

The ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`, `ManifoldEstimator` and
`DistanceBlock`) takes the squared distances in float16: both feature blocks are cast to float16,
||u||^2 - 2 u.v + ||v||^2 is evaluated in float16 and clipped at 0, and only a block with a
non-finite value is recomputed in float32. Blocks are 10,000 x 10,000 pairs. This module does the
same, blocks and fallback included, with float32 accumulation of the float16 products (what a GPU
does, where that code was run for the published numbers; TensorFlow's CPU kernels round the
norms' partial sums to float16 and can differ from it by a float16 ulp, which moves a count only
when a distance sits on a radius). Distances run jitted on the default device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import InputError

NEIGHBOURHOOD = 3        # ADM: nhood_sizes=(3,)
ADM_BLOCK = 10_000       # ADM: row_batch_size = col_batch_size = 10000

_HIGHEST = jax.lax.Precision.HIGHEST


def _f16(x: jax.Array) -> jax.Array:
  """Rounds float32 values to float16 and back (one float16 operation's result)."""
  return x.astype(jnp.float16).astype(jnp.float32)


def _distances(u_ND: jax.Array, v_MD: jax.Array) -> jax.Array:
  """The ADM evaluator's squared distances, (N, M) float32: float16 unless that overflows."""
  u16, v16 = _f16(u_ND), _f16(v_MD)
  norm_u = _f16(jnp.sum(u16 * u16, axis=1))
  norm_v = _f16(jnp.sum(v16 * v16, axis=1))
  dot = _f16(jnp.dot(u16, v16.T, precision=_HIGHEST))  # products of float16 values are exact in f32
  d16 = jnp.maximum(_f16(_f16(norm_u[:, None] - _f16(2.0 * dot)) + norm_v[None, :]), 0.0)
  finite = jnp.all(jnp.isfinite(d16))
  norm_u32 = jnp.sum(u_ND * u_ND, axis=1)
  norm_v32 = jnp.sum(v_MD * v_MD, axis=1)
  d32 = jnp.maximum(norm_u32[:, None] - 2.0 * jnp.dot(u_ND, v_MD.T, precision=_HIGHEST)
                    + norm_v32[None, :], 0.0)
  return jnp.where(finite, d16, d32)


@functools.partial(jax.jit, static_argnames=("k",))
def _block_smallest(u_ND: jax.Array, v_MD: jax.Array, v_valid_M: jax.Array, *, k: int) -> jax.Array:
  """The k + 1 smallest distances of each row of u to the valid rows of v, ascending (N, k + 1)."""
  d = jnp.where(v_valid_M[None, :], _distances(u_ND, v_MD), jnp.inf)
  return -jax.lax.top_k(-d, k + 1)[0]


@jax.jit
def _block_inside(u_ND, radii_u_N, v_MD, radii_v_M, u_valid_N, v_valid_M):
  """(u inside v's manifold (N,), v inside u's manifold (M,)) for one block of pairs."""
  d = _distances(u_ND, v_MD)
  valid = u_valid_N[:, None] & v_valid_M[None, :]
  u_in = jnp.any(valid & (d <= radii_v_M[None, :]), axis=1)
  v_in = jnp.any(valid & (d <= radii_u_N[:, None]), axis=0)
  return u_in, v_in


def _check_features(x: np.ndarray, what: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] < NEIGHBOURHOOD + 1 or not np.issubdtype(x.dtype, np.floating):
    raise InputError(f"{what}: precision/recall need float features (N, D) with N > "
                     f"{NEIGHBOURHOOD}, got {x.dtype} {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise InputError(f"{what}: features hold NaN or infinite values.")
  return x.astype(np.float32)


def _blocks(n: int, block: int):
  for start in range(0, n, block):
    yield start, min(start + block, n)


def _padded(x: np.ndarray, start: int, stop: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows [start, stop) zero-padded to `size` rows, and the mask of real rows (one compile)."""
  part = x[start:stop]
  valid = np.zeros((size,), bool)
  valid[:len(part)] = True
  if len(part) < size:
    part = np.concatenate([part, np.zeros((size - len(part), x.shape[1]), x.dtype)])
  return part, valid


def manifold_radii(features_ND: np.ndarray, *, k: int = NEIGHBOURHOOD,
                   block: int = ADM_BLOCK) -> np.ndarray:
  """Squared distance of each vector to its k-th nearest neighbour in the set, (N,) float32.

  Zero padding of a block never changes the float16/float32 choice: a zero row's distances are
  finite whenever the real ones are, and padded columns are masked out.
  """
  x = _check_features(features_ND, "manifold_radii")
  n = len(x)
  size = min(block, n)
  radii = np.zeros((n,), np.float32)
  for r0, r1 in _blocks(n, size):
    rows, _ = _padded(x, r0, r1, size)
    smallest = []
    for c0, c1 in _blocks(n, size):
      cols, cols_valid = _padded(x, c0, c1, size)
      smallest.append(_block_smallest(rows, cols, cols_valid, k=k))
    merged = np.sort(np.concatenate([np.asarray(s) for s in smallest], axis=1), axis=1)
    radii[r0:r1] = merged[:r1 - r0, k]
  return radii


def precision_recall(reference_ND: np.ndarray, samples_MD: np.ndarray, *,
                     reference_radii: np.ndarray | None = None, k: int = NEIGHBOURHOOD,
                     block: int = ADM_BLOCK) -> tuple[float, float]:
  """(precision, recall) of samples against a reference set, as the ADM evaluator reports them.

  Args:
    reference_ND: reference pool features (ADM: the 10,000 images of the reference batch).
    samples_MD: sample pool features.
    reference_radii: `manifold_radii(reference_ND)` if already computed (it depends on the
      reference alone).
  """
  ref = _check_features(reference_ND, "reference features")
  smp = _check_features(samples_MD, "sample features")
  if ref.shape[1] != smp.shape[1]:
    raise InputError(f"Reference and sample features differ in dimension: {ref.shape[1]} and "
                     f"{smp.shape[1]}.")
  r_ref = manifold_radii(ref, k=k, block=block) if reference_radii is None else np.asarray(
      reference_radii, np.float32)
  if r_ref.shape != (len(ref),):
    raise InputError(f"reference_radii must have shape ({len(ref)},), got {r_ref.shape}.")
  r_smp = manifold_radii(smp, k=k, block=block)
  ref_in = np.zeros((len(ref),), bool)
  smp_in = np.zeros((len(smp),), bool)
  rows_size, cols_size = min(block, len(ref)), min(block, len(smp))
  for r0, r1 in _blocks(len(ref), rows_size):
    rows, rows_valid = _padded(ref, r0, r1, rows_size)
    radii_rows, _ = _padded(r_ref[:, None], r0, r1, rows_size)
    for c0, c1 in _blocks(len(smp), cols_size):
      cols, cols_valid = _padded(smp, c0, c1, cols_size)
      radii_cols, _ = _padded(r_smp[:, None], c0, c1, cols_size)
      u_in, v_in = _block_inside(rows, radii_rows[:, 0], cols, radii_cols[:, 0], rows_valid,
                                 cols_valid)
      ref_in[r0:r1] |= np.asarray(u_in)[:r1 - r0]
      smp_in[c0:c1] |= np.asarray(v_in)[:c1 - c0]
  return float(smp_in.mean()), float(ref_in.mean())
