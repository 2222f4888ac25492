"""Runs OpenAI's ADM evaluator (guided-diffusion `evaluations/evaluator.py`) on shared inputs.

The evaluator is not part of var-jax: point the environment variable ADM_EVALUATOR at a local copy
of that file (e.g. `git show HEAD:evaluations/evaluator.py` of a guided-diffusion clone). Its
functions are called as they are: FIDStatistics.frechet_distance, Evaluator.compute_inception_score
(with the softmax graph it builds from the Inception graph's MatMul weights, here a tf.matmul with
the test's weights) and ManifoldEstimator (TensorFlow's float16 distances).

`python tests/adm_reference.py` rewrites tests/fixtures/adm_evaluator_outputs.npz, which the
suite checks against where the evaluator is absent.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import types

import numpy as np

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "adm_evaluator_outputs.npz"
SMALL_BLOCK = 64  # rows/cols per distance block in the blocked precision/recall cases


def inputs() -> dict[str, np.ndarray]:
  """The shared inputs, built from fixed seeds and stored in the fixture beside the outputs."""
  rng = np.random.default_rng(20261203)
  out = {}
  # Precision/recall on small integers: every float16 step is exact, so TensorFlow's kernels and
  # any other correct float16 evaluation give identical distances; ties on radii are frequent.
  out["pr_int_ref"] = rng.integers(0, 3, (150, 64)).astype(np.float32)
  out["pr_int_sample"] = rng.integers(0, 3, (130, 64)).astype(np.float32)
  out["pr_int_sample"][:40] += rng.integers(0, 2, (40, 64))  # a shifted part: precision < 1
  # Continuous, pool3-like (non-negative, heavy-tailed) features with norms in the hundreds.
  out["pr_real_ref"] = rng.gamma(0.6, 0.8, (200, 256)).astype(np.float32)
  out["pr_real_sample"] = (rng.gamma(0.6, 0.8, (170, 256)) * 1.1).astype(np.float32)
  # Features large enough for float16 to overflow: ADM recomputes those blocks in float32.
  out["pr_big_ref"] = rng.normal(0, 60.0, (60, 64)).astype(np.float32)
  out["pr_big_sample"] = rng.normal(5, 60.0, (50, 64)).astype(np.float32)
  # Inception Score: features, classifier weights, several splits (the last one short).
  out["is_pool"] = rng.gamma(0.6, 0.8, (1300, 64)).astype(np.float16).astype(np.float32)
  out["is_weights"] = rng.normal(0, 0.3, (64, 20)).astype(np.float32)
  # FID: two feature sets, and a singular pair (fewer vectors than dimensions).
  out["fid_a"] = rng.normal(0.5, 1.0, (400, 32)).astype(np.float32)
  out["fid_b"] = (rng.normal(0.7, 1.2, (300, 32)) @ rng.normal(0, 0.3, (32, 32))).astype(np.float32)
  out["fid_few_a"] = rng.normal(0, 1, (20, 32)).astype(np.float32)
  out["fid_few_b"] = rng.normal(0.2, 1, (24, 32)).astype(np.float32)
  return out


def load_evaluator(path: str | os.PathLike) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location("adm_evaluator", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def outputs(evaluator: types.ModuleType, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The ADM evaluator's results on `inputs()`."""
  tf = evaluator.tf
  tf.disable_eager_execution()
  np_bool = getattr(np, "bool", None)
  np.bool = bool  # the evaluator uses np.bool, removed in numpy 1.24
  try:
    graph = tf.Graph()
    with graph.as_default(), tf.Session(graph=graph) as sess:
      out = {}
      for name in ("int", "real", "big"):
        for block in (evaluator.ManifoldEstimator(sess).row_batch_size, SMALL_BLOCK):
          est = evaluator.ManifoldEstimator(sess, row_batch_size=block, col_batch_size=block)
          ref, smp = x[f"pr_{name}_ref"], x[f"pr_{name}_sample"]
          r_ref, r_smp = est.manifold_radii(ref), est.manifold_radii(smp)
          p, r = est.evaluate_pr(ref, r_ref, smp, r_smp)
          tag = "adm" if block != SMALL_BLOCK else "small"
          out[f"pr_{name}_{tag}_radii_ref"] = r_ref[:, 0]
          out[f"pr_{name}_{tag}"] = np.array([p[0], r[0]])
      softmax_input = tf.placeholder(tf.float32, shape=[None, x["is_weights"].shape[0]])
      softmax = tf.nn.softmax(tf.matmul(softmax_input, tf.constant(x["is_weights"])))
      fake = types.SimpleNamespace(sess=sess, softmax=softmax, softmax_input=softmax_input,
                                   softmax_batch_size=512)
      for split in (5000, 500):
        out[f"is_split{split}"] = np.array(
            evaluator.Evaluator.compute_inception_score(fake, x["is_pool"], split_size=split))
  finally:
    if np_bool is None:
      del np.bool
    else:
      np.bool = np_bool
  for name in ("fid", "fid_few"):
    a, b = x[f"{name}_a"], x[f"{name}_b"]
    sa = evaluator.FIDStatistics(np.mean(a, axis=0), np.cov(a, rowvar=False))
    sb = evaluator.FIDStatistics(np.mean(b, axis=0), np.cov(b, rowvar=False))
    out[name] = np.array(sa.frechet_distance(sb))
  return out


def main() -> int:
  path = os.environ.get("ADM_EVALUATOR")
  if not path or not os.path.isfile(path):
    print("Set ADM_EVALUATOR to a local copy of guided-diffusion's evaluations/evaluator.py.")
    return 2
  x = inputs()
  y = outputs(load_evaluator(path), x)
  np.savez_compressed(FIXTURE, **x, **{f"out_{k}": v for k, v in y.items()})
  print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB):")
  for k, v in y.items():
    if v.size <= 2:
      print(f"  {k}: {v}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
