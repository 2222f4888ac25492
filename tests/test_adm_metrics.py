"""The ADM evaluator's statistics (FID, sFID, IS, precision, recall) equal OpenAI's own code.

Expectations come from guided-diffusion's `evaluations/evaluator.py` run on the same inputs: live
where ADM_EVALUATOR names a local copy of it, else from tests/fixtures/adm_evaluator_outputs.npz,
which `tests/adm_reference.py` wrote with it (TensorFlow 2.21 CPU). Closed forms check the rest.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import adm_reference
from var_jax.errors import InputError
from var_jax.eval import adm, fid, inception, inception_score, manifold


def _fixture() -> dict[str, np.ndarray]:
  with np.load(adm_reference.FIXTURE) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module", params=["fixture", "live"])
def reference(request):
  """(inputs, ADM outputs): from the stored fixture, and from the evaluator itself if present."""
  if request.param == "fixture":
    data = _fixture()
    x = {k: v for k, v in data.items() if not k.startswith("out_")}
    return x, {k[len("out_"):]: v for k, v in data.items() if k.startswith("out_")}
  path = os.environ.get("ADM_EVALUATOR")
  if not path or not os.path.isfile(path):
    pytest.skip("ADM_EVALUATOR does not name a local copy of guided-diffusion's "
                "evaluations/evaluator.py")
  x = adm_reference.inputs()
  return x, adm_reference.outputs(adm_reference.load_evaluator(path), x)


def test_fixture_inputs_are_the_generated_ones():
  stored = _fixture()
  for k, v in adm_reference.inputs().items():
    np.testing.assert_array_equal(stored[k], v, err_msg=k)


@pytest.mark.parametrize("case", ["int", "real", "big"])
def test_precision_recall_equal_the_adm_evaluator(reference, case):
  x, y = reference
  ref, smp = x[f"pr_{case}_ref"], x[f"pr_{case}_sample"]
  assert manifold.precision_recall(ref, smp) == tuple(y[f"pr_{case}_adm"])
  # The blocked path (several 64 x 64 blocks, padded last blocks) gives ADM's blocked result.
  assert manifold.precision_recall(ref, smp, block=adm_reference.SMALL_BLOCK) == tuple(
      y[f"pr_{case}_small"])


def test_manifold_radii_equal_the_adm_evaluator(reference):
  # Integer features: float16 is exact, so the radii agree bit for bit.
  x, y = reference
  np.testing.assert_array_equal(manifold.manifold_radii(x["pr_int_ref"]), y["pr_int_adm_radii_ref"])


def test_overflowing_blocks_fall_back_to_float32_like_the_adm_evaluator(reference):
  # Squared norms beyond float16's 65504: ADM recomputes the block in float32 (radii far above
  # float16's range, equal to float32 rounding of the summation order).
  x, y = reference
  got = manifold.manifold_radii(x["pr_big_ref"])
  assert got.min() > 65504
  np.testing.assert_allclose(got, y["pr_big_adm_radii_ref"], rtol=1e-6)


def test_manifold_radii_of_real_features_within_a_float16_step(reference):
  # TensorFlow's CPU kernels round partial sums of the norms to float16; the radii agree to a
  # float16 rounding step of their magnitude.
  x, y = reference
  got = manifold.manifold_radii(x["pr_real_ref"])
  want = y["pr_real_adm_radii_ref"]
  np.testing.assert_allclose(got, want, rtol=2 ** -9)
  assert np.mean(got == want) > 0.5


def test_manifold_radii_closed_form():
  # Points on a line at 0, 1, 3, 6, 10: squared distance to the 3rd nearest neighbour.
  x = np.zeros((5, 4), np.float32)
  x[:, 0] = [0, 1, 3, 6, 10]
  np.testing.assert_array_equal(manifold.manifold_radii(x), [36, 25, 9, 25, 81])


def test_precision_recall_of_a_set_against_itself_is_one():
  rng = np.random.default_rng(0)
  x = rng.gamma(0.6, 0.8, (120, 32)).astype(np.float32)
  assert manifold.precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(0, 1, (60, 16)).astype(np.float32)
  assert manifold.precision_recall(x, x + 100.0) == (0.0, 0.0)


@pytest.mark.parametrize("split", [5000, 500])
def test_inception_score_equals_the_adm_evaluator(reference, split):
  x, y = reference
  got = inception_score.inception_score(x["is_pool"], x["is_weights"], split_size=split)
  np.testing.assert_allclose(got, y[f"is_split{split}"], rtol=1e-6)


def test_inception_score_closed_form():
  # One-hot predictions spread evenly over K classes: IS = K. Identical predictions: IS = 1.
  k = 8
  logits = np.full((64, k), -30.0, np.float32)
  logits[np.arange(64), np.arange(64) % k] = 30.0
  eye = np.eye(k, dtype=np.float32)
  np.testing.assert_allclose(inception_score.inception_score(logits, eye), k, rtol=1e-5)
  same = np.tile(np.linspace(-1, 1, k, dtype=np.float32), (64, 1))
  np.testing.assert_allclose(inception_score.inception_score(same, eye), 1.0, rtol=1e-6)


@pytest.mark.parametrize("case", ["fid", "fid_few"])
def test_frechet_distance_equals_the_adm_evaluator(reference, case):
  x, y = reference
  a, b = x[f"{case}_a"], x[f"{case}_b"]
  got = fid.frechet_distance(*adm.statistics(a), *adm.statistics(b))
  np.testing.assert_allclose(got, y[case], rtol=1e-6, atol=1e-6)


def test_fid_of_a_set_against_itself_is_zero_and_of_a_shift_is_its_square():
  rng = np.random.default_rng(2)
  x = rng.normal(0, 1, (300, 24))
  stats = adm.statistics(x)
  assert abs(fid.frechet_distance(*stats, *stats)) < 1e-9
  shifted = adm.statistics(x + 0.5)
  np.testing.assert_allclose(fid.frechet_distance(*stats, *shifted), 24 * 0.25, rtol=1e-9)


def _features(rng, n):
  pool = rng.gamma(0.6, 0.8, (n, inception.FEATURE_DIM)).astype(np.float32)
  spatial = rng.gamma(0.6, 0.8, (n, inception.SPATIAL_DIM)).astype(np.float32)
  return pool, spatial


def test_reference_file_round_trip_and_metrics(tmp_path):
  rng = np.random.default_rng(3)
  pool, spatial = _features(rng, 40)
  path = adm.write_reference(tmp_path / "ref.npz", pool, spatial)
  ref = adm.read_reference(path)
  np.testing.assert_array_equal(ref.pool_features, pool)
  np.testing.assert_allclose(ref.mu, pool.mean(0), rtol=1e-6)
  np.testing.assert_allclose(ref.sigma_s, np.cov(spatial, rowvar=False), rtol=1e-6, atol=1e-9)
  classifier = rng.normal(0, 0.01, (inception.FEATURE_DIM, 16)).astype(np.float32)
  result = adm.metrics(pool, spatial, ref, classifier)
  # 40 vectors in 2048-d: singular covariances, whose square roots leave ~1e-4 of round-off.
  assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3
  assert result["precision"] == 1.0 and result["recall"] == 1.0
  assert result["num_samples"] == 40 and result["num_reference_images"] == 40
  # A features-only weights file: every metric but the Inception Score.
  no_is = adm.metrics(pool, spatial, ref, None)
  assert no_is["inception_score"] is None and no_is["fid"] == result["fid"]


def test_adm_reference_batch_with_images_only_uses_the_network(tmp_path):
  # An ADM batch: images in arr_0 and the four statistics; pool features come from the images.
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  pool, spatial = _features(rng, 6)
  np.savez(tmp_path / "adm.npz", arr_0=images, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
           mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
  seen = []

  def extract(batch):
    seen.append(batch.copy())
    idx = [int(np.flatnonzero((images == b).all(axis=(1, 2, 3)))[0]) for b in batch]
    return pool[idx], spatial[idx]

  ref = adm.read_reference(str(tmp_path / "adm.npz"), extract, batch_size=4)
  np.testing.assert_array_equal(np.concatenate(seen), images)
  np.testing.assert_array_equal(ref.pool_features, pool)
  with pytest.raises(InputError, match="pass the Inception network"):
    adm.read_reference(str(tmp_path / "adm.npz"))


def test_bad_reference_files_are_clear_errors(tmp_path):
  with pytest.raises(InputError, match="not found"):
    adm.read_reference(str(tmp_path / "missing.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(InputError, match="Cannot read"):
    adm.read_reference(str(tmp_path / "junk.npz"))
  np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(InputError, match="lacks"):
    adm.read_reference(str(tmp_path / "stats_only.npz"))
  np.savez(tmp_path / "nothing.npz", something=np.zeros(3))
  with pytest.raises(InputError, match="neither"):
    adm.read_reference(str(tmp_path / "nothing.npz"))
  np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(InputError, match="uint8"):
    adm.iter_image_batches(str(tmp_path / "floats.npz"), 2)


def test_streamed_sample_batch_equals_the_array(tmp_path):
  images = np.random.default_rng(5).integers(0, 256, (11, 5, 7, 3), dtype=np.uint8)
  np.savez(tmp_path / "s.npz", arr_0=images)
  count, batches = adm.iter_image_batches(str(tmp_path / "s.npz"), 4)
  got = list(batches)
  assert count == 11 and [len(b) for b in got] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(got), images)


def test_bad_feature_inputs_are_clear_errors():
  with pytest.raises(InputError, match="N > 3"):
    manifold.precision_recall(np.zeros((3, 4), np.float32), np.zeros((10, 4), np.float32))
  with pytest.raises(InputError, match="differ in dimension"):
    manifold.precision_recall(np.zeros((10, 4), np.float32), np.zeros((10, 5), np.float32))
  with pytest.raises(InputError, match="agree"):
    inception_score.inception_score(np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32))
