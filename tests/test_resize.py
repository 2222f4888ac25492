"""Resampling matrices against PyTorch's F.interpolate semantics (VAR_SPEC §3.3)."""
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.ops import resize as R


def test_area_bins_overlap_like_adaptive_pool():
  m = R.area_matrix(16, 3)
  assert [tuple(np.nonzero(r)[0][[0, -1]]) for r in m] == [(0, 5), (5, 10), (10, 15)]
  sizes = [(r > 0).sum() for r in R.area_matrix(16, 13)]
  assert sizes == [2, 2, 2, 2, 3, 2, 2, 2, 3, 2, 2, 2, 2]
  assert [(r > 0).sum() for r in R.area_matrix(16, 10)] == [2, 3, 2, 3, 2, 2, 3, 2, 3, 2]
  np.testing.assert_allclose(R.area_matrix(7, 4).sum(1), 1.0)


def test_bicubic_uses_a_minus_075_and_clamped_taps():
  m = R.bicubic_matrix(2, 16)
  np.testing.assert_allclose(m[1], [1.1108, -0.1108], atol=5e-5)  # edge overshoot (§3.3)
  np.testing.assert_allclose(R.bicubic_matrix(1, 16), np.ones((16, 1)))
  for n_in, n_out in [(3, 16), (13, 16), (24, 32)]:
    np.testing.assert_allclose(R.bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)
  # Identity at equal sizes: t = 0 gives weights (0, 1, 0, 0).
  np.testing.assert_allclose(R.bicubic_matrix(5, 5), np.eye(5), atol=1e-12)


def test_bilinear_clamps_source_at_zero():
  m = R.bilinear_matrix(32, 6)
  np.testing.assert_allclose(m.sum(1), 1.0)
  assert m[0, 2] > 0 and m[0, 0] == 0  # src = (0.5 * 32/6) - 0.5 = 2.1667


def test_resize_applies_separably_and_matches_explicit_product():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 12, 3)).astype(np.float32)
  y = np.asarray(R.resize(x, (5, 7), "area"))
  ref = np.einsum("oh,bhwc,pw->bopc", R.area_matrix(16, 5), x.astype(np.float64), R.area_matrix(12, 7))
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_resize_rejects_bad_input():
  with pytest.raises(ValueError, match="mode"):
    R.resize(np.zeros((1, 4, 4, 1), np.float32), 2, "nearest-exact")
  with pytest.raises(ValueError, match="NHWC"):
    R.resize(np.zeros((4, 4, 1), np.float32), 2, "area")


def test_against_torch_when_available():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(1)
  for mode, pairs in [("area", [(16, 3), (16, 13), (32, 24)]), ("bicubic", [(2, 16), (13, 16), (24, 32)]),
                      ("bilinear", [(32, 13), (16, 6)])]:
    for a, b in pairs:
      x = rng.standard_normal((1, 2, a, a))
      ref = F.interpolate(torch.from_numpy(x), size=(b, b), mode=mode).numpy()
      m = getattr(R, f"{mode}_matrix")(a, b)
      np.testing.assert_allclose(np.einsum("oh,bchw,pw->bcop", m, x, m), ref, atol=1e-12)


@pytest.mark.parametrize("shape", [(256, 256), (64, 48), (512, 512), (17, 300)])
def test_tf1_bilinear_matches_tensorflow(shape):
  # The resize inside the 2015 Inception graph: TF1 ResizeBilinear, half_pixel_centers=False.
  tf = pytest.importorskip("tensorflow")
  x = np.random.default_rng(0).uniform(0, 255, (2, *shape, 3)).astype(np.float32)
  want = tf.compat.v1.image.resize_bilinear(x, (299, 299)).numpy()
  got = np.asarray(R.resize(jnp.asarray(x), 299, "tf1_bilinear"))
  np.testing.assert_allclose(got, want, rtol=0, atol=255 * 2e-7)


def test_tf1_bilinear_samples_at_corners_not_centres():
  # 2 -> 4: TF1 samples positions 0, 0.5, 1, 1.5 (clamped); PyTorch samples centres.
  np.testing.assert_allclose(R.tf1_bilinear_matrix(2, 4),
                             [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
