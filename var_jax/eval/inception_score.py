"""Inception Score (Salimans et al., 2016) as the ADM evaluator computes it.

The class probabilities are softmax(pool3 @ W) with W the 2015 graph's `softmax/logits/MatMul`
weights (no bias), in float32. The images are cut into consecutive splits of 5,000 (the last may
be shorter); each split scores exp(mean over its images of KL(p(y|x) || p(y))) with p(y) the
split's mean prediction, and the score is the mean over splits. The KL terms are evaluated in
float32 numpy with the ADM evaluator's own expression, so a probability that underflows to 0
gives NaN there and here alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import InputError

SPLIT_SIZE = 5_000        # ADM: compute_inception_score(split_size=5000)
_SOFTMAX_BATCH = 512      # rows per jitted softmax call (one shape: one compile)


@jax.jit
def _softmax(pool_ND: jax.Array, classifier_DK: jax.Array) -> jax.Array:
  logits = jnp.dot(pool_ND, classifier_DK, precision=jax.lax.Precision.HIGHEST)
  return jax.nn.softmax(logits, axis=-1)


def class_probabilities(pool_ND: np.ndarray, classifier_DK: np.ndarray) -> np.ndarray:
  """softmax(pool @ W), (N, K) float32 numpy."""
  pool = np.asarray(pool_ND, np.float32)
  w = np.asarray(classifier_DK, np.float32)
  if pool.ndim != 2 or w.ndim != 2 or pool.shape[1] != w.shape[0]:
    raise InputError(f"Inception Score: pool features (N, D) and classifier weights (D, K) must "
                     f"agree, got {pool.shape} and {w.shape}.")
  out = []
  for start in range(0, len(pool), _SOFTMAX_BATCH):
    chunk = pool[start:start + _SOFTMAX_BATCH]
    n = len(chunk)
    if n < _SOFTMAX_BATCH:
      chunk = np.concatenate([chunk, np.zeros((_SOFTMAX_BATCH - n, pool.shape[1]), np.float32)])
    out.append(np.asarray(_softmax(chunk, w))[:n])
  return np.concatenate(out) if out else np.zeros((0, w.shape[1]), np.float32)


def score_from_probabilities(probs_NK: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
  """The mean over splits of exp(E_x KL(p(y|x) || p(y)))."""
  probs = np.asarray(probs_NK)
  if probs.ndim != 2 or len(probs) == 0:
    raise InputError(f"Inception Score needs class probabilities (N, K) with N >= 1, got "
                     f"{probs.shape}.")
  if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
    raise InputError(f"split_size must be a positive int, got {split_size!r}.")
  scores = []
  for start in range(0, len(probs), split_size):
    part = probs[start:start + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores))


def inception_score(pool_ND: np.ndarray, classifier_DK: np.ndarray,
                    split_size: int = SPLIT_SIZE) -> float:
  """The ADM evaluator's Inception Score of pool3 features."""
  return score_from_probabilities(class_probabilities(pool_ND, classifier_DK), split_size)
