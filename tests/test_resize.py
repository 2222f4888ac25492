"""Resampling matrices against PyTorch's F.interpolate semantics (VAR_SPEC §3.3)."""
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
