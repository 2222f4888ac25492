"""Resampling that matches PyTorch's `F.interpolate` (and TensorFlow 1's `ResizeBilinear`) exactly,
as separable matrices.

`jax.image.resize` does not match the official tokenizer: its bicubic uses Keys' A=-0.5 and
renormalises at borders, and its antialiased linear mode is not adaptive average pooling
(VAR_SPEC §3.3). Every resize here is a precomputed (out, in) float64 matrix per axis, cast to
the input dtype and applied as Y = M_h X M_w^T over NHWC maps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic kernel constant.


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64: `mode='area'` = adaptive average pooling with overlapping bins."""
  m = np.zeros((n_out, n_in), np.float64)
  for o in range(n_out):
    lo = (o * n_in) // n_out
    hi = -((-(o + 1) * n_in) // n_out)  # ceil((o + 1) * n_in / n_out)
    m[o, lo:hi] = 1.0 / (hi - lo)
  return m


def _cubic_weight(x: float) -> float:
  x = abs(x)
  a = _CUBIC_A
  if x <= 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  if x < 2.0:
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return 0.0


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64: `mode='bicubic'`, align_corners=False, no antialias, clamped taps."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    src = (o + 0.5) * scale - 0.5  # not clamped at 0 in cubic mode
    i0 = int(np.floor(src))
    t = src - i0
    weights = (_cubic_weight(t + 1.0), _cubic_weight(t), _cubic_weight(1.0 - t), _cubic_weight(2.0 - t))
    for tap, w in zip(range(i0 - 1, i0 + 3), weights):
      m[o, min(max(tap, 0), n_in - 1)] += w
  return m


@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64: `mode='bilinear'`, align_corners=False, no antialias (point sampling)."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    src = max((o + 0.5) * scale - 0.5, 0.0)
    i0 = int(np.floor(src))
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[o, i0] += 1.0 - lam
    m[o, i1] += lam
  return m


@functools.lru_cache(maxsize=None)
def tf1_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64: TensorFlow 1's `ResizeBilinear` with its defaults (align_corners=False,
  half_pixel_centers=False), the resize inside the 2015 Inception graph of FID and the ADM evaluator.

  Output pixel o samples the input at o * (n_in / n_out), not at its centre: the image shifts by
  half a pixel against PyTorch's bilinear. The position and the weights are computed in float32,
  as TensorFlow does, so the taps and weights are TensorFlow's own.
  """
  m = np.zeros((n_out, n_in), np.float64)
  scale = np.float32(n_in) / np.float32(n_out)
  for o in range(n_out):
    src = np.float32(o) * scale
    i0 = int(np.floor(src))
    i1 = min(i0 + 1, n_in - 1)
    lam = np.float32(src - np.float32(i0))
    m[o, i0] += 1.0 - float(lam)
    m[o, i1] += float(lam)
  return m


_MATRICES = {"area": area_matrix, "bicubic": bicubic_matrix, "bilinear": bilinear_matrix,
             "tf1_bilinear": tf1_bilinear_matrix}


def resize(x_BHWC: jax.Array, size: int | tuple[int, int], mode: str) -> jax.Array:
  """Resizes the two spatial axes of an NHWC array like `F.interpolate(x, size, mode=mode)`, or
  for mode 'tf1_bilinear' like `tf.compat.v1.image.resize_bilinear(x, size)`.

  Args:
    x_BHWC: (B, H, W, C) array.
    size: output side, or (out_h, out_w).
    mode: 'area', 'bicubic', 'bilinear' or 'tf1_bilinear'.
  """
  if mode not in _MATRICES:
    raise ValueError(f"resize mode must be one of {sorted(_MATRICES)}, got {mode!r}.")
  if x_BHWC.ndim != 4:
    raise ValueError(f"resize expects an NHWC array, got shape {x_BHWC.shape}.")
  out_h, out_w = (size, size) if isinstance(size, int) else size
  _, in_h, in_w, _ = x_BHWC.shape
  if (in_h, in_w) == (out_h, out_w):
    return x_BHWC
  dtype = x_BHWC.dtype
  m_h = jnp.asarray(_MATRICES[mode](in_h, out_h), dtype)
  m_w = jnp.asarray(_MATRICES[mode](in_w, out_w), dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", m_h, x_BHWC, m_w, precision=jax.lax.Precision.HIGHEST)
