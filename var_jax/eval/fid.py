"""Fréchet distance between feature distributions (FID, rFID), and the statistics it needs.

FID models the features of each image set as a Gaussian and reports

  d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),

computed in float64. pytorch-fid and the TensorFlow original take the trace term from
`scipy.linalg.sqrtm`; the same trace is computed here from a symmetric eigenproblem, which is
faster and well behaved for singular covariances (see `FrechetReference`, which also keeps the
reference side's matrix square root for repeated evaluations against fixed statistics).
`FeatureStats` accumulates the mean and the covariance (normalised by N - 1, like `np.cov`) over
batches, so features never have to be held all at once. Statistics are stored as .npz files with
arrays `mu` (D,) and `sigma` (D, D), the layout of pytorch-fid's `--save-stats`, so precomputed
reference statistics (e.g. of ImageNet validation) can be used directly.

The features come from `var_jax.eval.inception` (2048-d pool3 of the FID Inception network).
With fewer images than feature dimensions the covariance is singular and FID is biased upward:
compare numbers only at the same image count.
"""
from __future__ import annotations

import os

import numpy as np

from var_jax.errors import InputError


class FeatureStats:
  """Running mean and covariance of feature vectors, accumulated in float64 over batches.

  Sums are taken around the first batch's mean (a fixed shift), which keeps the covariance
  accurate when the features have a large mean.
  """

  def __init__(self, dim: int):
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
      raise InputError(f"FeatureStats needs a positive feature dimension, got {dim!r}.")
    self.dim = int(dim)
    self.count = 0
    self._shift: np.ndarray | None = None
    self._sum_D = np.zeros((self.dim,), np.float64)
    self._outer_DD = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features_ND: np.ndarray) -> None:
    """Adds a batch of N feature vectors (N, D); N may be 0."""
    x = np.asarray(features_ND, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise InputError(f"FeatureStats({self.dim}) takes features of shape (N, {self.dim}), got "
                       f"{np.shape(features_ND)}.")
    if not np.all(np.isfinite(x)):
      raise InputError("Features contain NaN or infinite values; the network's inputs or weights "
                       "are broken.")
    if x.shape[0] == 0:
      return
    if self._shift is None:
      self._shift = x.mean(axis=0)
    d = x - self._shift
    self._sum_D += d.sum(axis=0)
    self._outer_DD += d.T @ d
    self.count += x.shape[0]

  def mean(self) -> np.ndarray:
    """(D,) float64 mean of every vector added so far."""
    if self.count < 1:
      raise InputError("FeatureStats has no features yet.")
    return self._shift + self._sum_D / self.count

  def covariance(self) -> np.ndarray:
    """(D, D) float64 unbiased covariance (divided by N - 1), as `np.cov(x, rowvar=False)`."""
    if self.count < 2:
      raise InputError(f"A covariance needs at least 2 feature vectors, got {self.count}.")
    centred_sum = self._sum_D / self.count
    cov = (self._outer_DD - self.count * np.outer(centred_sum, centred_sum)) / (self.count - 1)
    return (cov + cov.T) / 2

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma)."""
    return self.mean(), self.covariance()


def _check_stats(mu: np.ndarray, sigma: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise InputError(f"{what}: expected mu of shape (D,) and sigma of shape (D, D), got "
                     f"{mu.shape} and {sigma.shape}.")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise InputError(f"{what}: mu or sigma holds NaN or infinite values.")
  return mu, sigma


def _psd_sqrt(sigma_DD: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix.

  Round-off below zero in the eigenvalues is clipped to 0.
  """
  w, v = np.linalg.eigh(sigma_DD)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


class FrechetReference:
  """Reference statistics (mu, sigma) prepared for any number of Fréchet distances to them.

  The trace term uses that S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2):
  Tr((S1 S2)^(1/2)) is the sum of the square roots of that matrix's eigenvalues. This is the
  quantity pytorch-fid takes from `scipy.linalg.sqrtm(S1 @ S2)`, without a Schur decomposition of
  a non-symmetric matrix (several times faster at 2048-d) and without its spurious imaginary
  parts or eps retries for singular covariances. S1^(1/2) is computed once, here.
  """

  def __init__(self, mu: np.ndarray, sigma: np.ndarray):
    self.mu, self.sigma = _check_stats(mu, sigma, "reference statistics")
    self._sigma_sqrt = _psd_sqrt(self.sigma)

  def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
    """||mu_ref - mu||^2 + Tr(S_ref + S - 2 (S_ref S)^(1/2)), in float64.

    Raises:
      InputError: shapes do not match the reference's, or a value is not finite.
    """
    mu, sigma = _check_stats(mu, sigma, "statistics")
    if mu.shape != self.mu.shape:
      raise InputError(f"The two statistics have different feature dimensions: "
                       f"{self.mu.shape[0]} and {mu.shape[0]}.")
    inner = self._sigma_sqrt @ sigma @ self._sigma_sqrt
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    diff = self.mu - mu
    return float(diff @ diff + np.trace(self.sigma) + np.trace(sigma) - 2.0 * trace_sqrt)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians, in float64.

  Raises:
    InputError: shapes do not match, or a value is not finite.
  """
  return FrechetReference(mu1, sigma1).distance(mu2, sigma2)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes (mu, sigma) to an .npz file readable by `load_stats` and pytorch-fid."""
  mu, sigma = _check_stats(mu, sigma, "save_stats")
  path = os.path.expanduser(os.fspath(path))
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
    np.savez(f, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads (mu, sigma) float64 from an .npz with arrays `mu` (D,) and `sigma` (D, D).

  Raises:
    InputError: the file is missing, not an .npz, lacks `mu`/`sigma`, or has bad shapes/values.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise InputError(f"FID reference statistics not found at {path!r}: pass an .npz with arrays "
                     "'mu' and 'sigma' (pytorch-fid's --save-stats writes one).")
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError("it holds a single array (.npy), not named arrays")
    with data:
      arrays = {name: data[name] for name in data.files}
  except (OSError, ValueError) as e:  # not numpy data, a single array, or object arrays
    raise InputError(f"Cannot read FID reference statistics {path!r} as .npz: {e}") from e
  missing = [k for k in ("mu", "sigma") if k not in arrays]
  if missing:
    raise InputError(f"FID reference statistics {path!r} lack {missing}; found arrays "
                     f"{sorted(arrays)}.")
  mu, sigma = arrays["mu"], arrays["sigma"]
  return _check_stats(mu, sigma, f"FID reference statistics {path!r}")
