"""var_jax.edit against the official notebook's greedy zero-shot editing.

The expectations come from tests/fixtures/official_tiny_seed0_edit.npz (README "Zero-shot
editing"): the official effective tokens `idx_BL`, the official sampler's draws `sampled_idx_BL`,
the forced set `force_BL` and the decoded `img`. Which tokens our code forced is observed from its
output alone: in a greedy run every generated token is the argmax of the guided logits of the
tokens before it, so a token that differs from that argmax was forced. The argmax comes from the
teacher-forced logits of the returned tokens (`VARModel.logits`, official parity in test_var_model).

The fixture's box gives no bilinear value of exactly 0.5, so the strict `> 0.5` rule is checked on
hand-picked keep-masks, with the expected forced set from `_official_force` below: a transcription of
the official rule that the first test checks against the fixture's own `mask_interp_BL`/`force_BL`.
"""
import jax
import numpy as np
import pytest

import var_jax
from helpers import FIXTURES, PATCH_NUMS, concat_tokens, model, split_tokens

EDIT = dict(np.load(FIXTURES / "official_tiny_seed0_edit.npz"))
CASES = ("inpaint", "outpaint", "classedit")
NULL = 10  # the tiny model's null class
SIZE = 64


def _official_bilinear(keep_PP: np.ndarray, pn: int) -> np.ndarray:
  """F.interpolate(mode='bilinear', align_corners=False, no antialias) of a P x P map to pn x pn."""
  P = keep_PP.shape[-1]

  def taps(o):  # the two source rows/columns of output o and their weights
    src = max((o + 0.5) * P / pn - 0.5, 0.0)
    lo = int(np.floor(src))
    hi = min(lo + 1, P - 1)
    frac = src - lo
    return ((lo, 1.0 - frac), (hi, frac))

  out = np.zeros((pn, pn))
  for oy in range(pn):
    for ox in range(pn):
      out[oy, ox] = sum(wy * wx * keep_PP[iy, ix] for iy, wy in taps(oy) for ix, wx in taps(ox))
  return out


def _official_interp(keep_PP) -> np.ndarray:
  return np.concatenate([_official_bilinear(np.asarray(keep_PP, np.float64), pn).ravel() for pn in PATCH_NUMS])


def _official_force(keep_PP) -> np.ndarray:
  """(L,) bool: forced where the bilinear value is > 0.5 (strict); the 1x1 scale always."""
  force = _official_interp(keep_PP) > 0.5
  force[0] = True
  return force


def _box_pixels():
  y0, x0, y1, x1 = (int(round(v * SIZE)) for v in EDIT["box_y0x0y1x1"])
  return y0, x0, y1, x1


def _image_mask(case: str) -> np.ndarray:
  """The case's keep-mask at image size, from the box in pixels (1 = keep)."""
  y0, x0, y1, x1 = _box_pixels()
  inside = np.zeros((SIZE, SIZE), np.float32)
  inside[y0:y1, x0:x1] = 1.0
  return 1.0 - inside if bool(EDIT[f"{case}_inpainting"]) else inside


def _greedy_draws(m, tokens_BL, labels, cfg) -> np.ndarray:
  """(B, L): the greedy token at every position given the returned tokens of coarser scales."""
  maps = split_tokens(tokens_BL)
  labels = np.asarray(labels)
  cond = np.asarray(m.logits(labels, maps), np.float64)
  uncond = np.asarray(m.logits(np.full_like(labels, NULL), maps), np.float64)
  t = np.concatenate([np.full(pn * pn, cfg * si / (len(PATCH_NUMS) - 1)) for si, pn in enumerate(PATCH_NUMS)])
  mixed = (1 + t[None, :, None]) * cond - t[None, :, None] * uncond
  top2 = np.sort(mixed, axis=-1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # no near-tie: the argmax is well defined
  return mixed.argmax(-1)


def _edit(images, mask, labels, cfg):
  out, tokens = var_jax.edit(model("tiny"), images, mask, labels, rng=jax.random.key(0), cfg=cfg, top_k=1,
                             top_p=0.0, return_tokens=True)
  return np.asarray(out), concat_tokens(tokens)


def test_fixture_follows_the_documented_mask_rule():
  """Anchors `_official_force` to the official numbers, and records what the fixture covers."""
  src = EDIT["inp_idx_BL"]
  for case in CASES:
    keep = EDIT[f"{case}_edit_mask"]
    y0, x0, y1, x1 = (int(round(v * keep.shape[0])) for v in EDIT["box_y0x0y1x1"])
    assert np.array_equal(keep[y0:y1, x0:x1] == 0, np.full((y1 - y0, x1 - x0), EDIT[f"{case}_inpainting"]))
    for b in range(src.shape[0]):
      np.testing.assert_allclose(_official_interp(keep), EDIT[f"{case}_mask_interp_BL"][b], atol=1e-6)
      np.testing.assert_array_equal(_official_force(keep), EDIT[f"{case}_force_BL"][b].astype(bool))
    assert not np.any(EDIT[f"{case}_mask_interp_BL"] == 0.5)  # ties: see the strict-rule test
    # The official draws differ from the source everywhere, so forcing is visible in every position.
    assert np.all(EDIT[f"{case}_sampled_idx_BL"] != src)
  assert EDIT["inpaint_mask_interp_BL"][0, 0] < 0.5  # the 1x1 scale is forced despite its value


@pytest.mark.parametrize("mask_form", ["latent", "image"])
@pytest.mark.parametrize("case", CASES)
def test_greedy_edit_matches_official(case, mask_form):
  images = EDIT["inp_img"].transpose(0, 2, 3, 1)
  mask = EDIT[f"{case}_edit_mask"] if mask_form == "latent" else _image_mask(case)
  labels, cfg = EDIT[f"{case}_label"], float(EDIT[f"{case}_cfg"])
  out, tokens = _edit(images, mask, labels, cfg)

  np.testing.assert_array_equal(tokens, EDIT[f"{case}_idx_BL"])
  draws = _greedy_draws(model("tiny"), tokens, labels, cfg)
  np.testing.assert_array_equal(draws, EDIT[f"{case}_sampled_idx_BL"])  # what the official sampler drew
  forced = tokens != draws
  np.testing.assert_array_equal(forced, EDIT[f"{case}_force_BL"].astype(bool))
  np.testing.assert_array_equal(tokens[forced], EDIT["inp_idx_BL"][forced])

  ref = np.round(EDIT[f"{case}_img"].transpose(0, 2, 3, 1) * 255)  # official output in [0, 1]
  assert out.dtype == np.uint8 and out.shape == ref.shape
  assert np.abs(out.astype(np.int32) - ref).max() <= 1


# Keep-masks whose bilinear values hit exactly 0.5 (with power-of-two weights, so exactly in any
# float arithmetic) at some positions of the 2x2 and 3x3 scales; the strict rule generates those.
# Each also tells the official bilinear apart from an antialiased one and from area resizing.
TIE_MASKS = np.array([
    [[1, 1, 1, 1],
     [0, 0, 1, 1],
     [0, 1, 1, 0],
     [0, 1, 1, 1]],
    [[1, 0, 0, 1],
     [1, 1, 0, 0],
     [0, 1, 0, 1],
     [0, 0, 0, 1]],
], np.float32)


@pytest.mark.parametrize("mask_form", ["latent", "image"])
def test_edit_forces_only_strictly_above_half(mask_form):
  images = EDIT["inp_img"].transpose(0, 2, 3, 1)
  keep = TIE_MASKS  # one mask per image
  if mask_form == "image":
    keep = np.kron(keep, np.ones((1, SIZE // 4, SIZE // 4), np.float32))
  src = EDIT["inp_idx_BL"]
  labels = np.full(len(images), NULL)
  _, tokens = _edit(images, keep, labels, 1.5)

  expected = np.stack([_official_force(k) for k in TIE_MASKS])
  ties = np.stack([_official_interp(k) == 0.5 for k in TIE_MASKS])
  ties[:, 0] = False
  assert ties.any(axis=1).all()
  draws = _greedy_draws(model("tiny"), tokens, labels, 1.5)
  assert np.all(draws[ties] != src[ties])  # a wrongly forced tie would be visible
  np.testing.assert_array_equal(tokens != draws, expected)
  np.testing.assert_array_equal(tokens[expected], src[expected])


def test_image_mask_keeps_latent_cells_at_least_half_kept():
  """Documented rule for an image-size mask: the mean over each 16x16 latent cell, kept where >= 0.5."""
  images = EDIT["inp_img"].transpose(0, 2, 3, 1)
  keep = np.ones((SIZE, SIZE), np.float32)
  keep[16:32, 16:24] = 0.0   # cell (1, 1): exactly half kept -> kept
  keep[32:48, 32:48] = 0.0   # cell (2, 2): generated
  keep[32:48, 16:24] = 0.0
  keep[32:33, 24:25] = 0.0   # cell (2, 1): one pixel short of half -> generated
  keep[16:48, 48:64] = 0.25  # cells (1, 3), (2, 3): 0.25 -> generated
  cell_means = keep.reshape(4, 16, 4, 16).mean(axis=(1, 3))
  latent = (cell_means >= 0.5).astype(np.float32)
  assert latent.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
  labels = [NULL, NULL]
  _, from_image = _edit(images, keep, labels, 1.5)
  _, from_latent = _edit(images, latent, labels, 1.5)
  np.testing.assert_array_equal(from_image, from_latent)
  flipped = latent.copy()
  flipped[1, 1] = 0.0  # the half-kept cell generated instead: the result must differ
  assert not np.array_equal(_edit(images, flipped, labels, 1.5)[1], from_latent)


def test_two_keys_differ_only_where_the_official_code_generates():
  """Random sampling: the kept set (the fixture's forced set for this box) is the source's tokens."""
  images = EDIT["inp_img"].transpose(0, 2, 3, 1)
  keep = _image_mask("inpaint")
  kept = EDIT["inpaint_force_BL"][0].astype(bool)
  src = EDIT["inp_idx_BL"]
  m = model("tiny")
  out_a, tok_a = var_jax.edit(m, images, keep, [3, 5], rng=jax.random.key(0), return_tokens=True)
  out_b, tok_b = var_jax.edit(m, images, keep, [3, 5], rng=jax.random.key(1), return_tokens=True)
  assert out_a.shape == (2, 64, 64, 3) and out_a.dtype == np.uint8
  a, b = concat_tokens(tok_a), concat_tokens(tok_b)
  np.testing.assert_array_equal(a[:, kept], src[:, kept])
  np.testing.assert_array_equal(b[:, kept], src[:, kept])
  assert not np.array_equal(a[:, ~kept], b[:, ~kept])  # the hole is generated
