"""Tests of the VQGAN training losses: LPIPS, the PatchGAN discriminator and the loss helpers."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.errors import CheckpointError, ConfigError, InputError
from var_jax.train.losses import discriminator as disc_lib
from var_jax.train.losses import lpips as lpips_lib
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.train.losses import vqgan as vl

SMALL_CHANNELS = (4, 8, 8, 16, 16)
# torchvision's `vgg16().features` layout: conv widths and "M" max-pools; every conv is followed
# by a ReLU. Written out independently of var_jax.train.losses.lpips so that it checks the key indices.
TORCHVISION_CFG = ("a", "a", "M", "b", "b", "M", "c", "c", "c", "M", "d", "d", "d", "M",
                   "e", "e", "e")


def _torchvision_conv_keys(channels):
  """[(state-dict index, out width, in width)] for each conv, plus the feature tap indices."""
  widths = dict(zip("abcde", channels))
  convs, taps, index, in_ch = [], [], 0, 3
  for i, item in enumerate(TORCHVISION_CFG):
    if item == "M":
      taps.append(index - 1)  # the ReLU just before the pool
      index += 1
      continue
    convs.append((index, widths[item], in_ch))
    in_ch = widths[item]
    index += 2  # conv, relu
  taps.append(index - 1)
  return convs, taps


def _random_state_dicts(channels, seed=0, extra_vgg_keys=True):
  rng = np.random.default_rng(seed)
  convs, _ = _torchvision_conv_keys(channels)
  vgg = {}
  for index, out_ch, in_ch in convs:
    std = np.sqrt(2.0 / (9 * in_ch))
    vgg[f"features.{index}.weight"] = rng.normal(0, std, (out_ch, in_ch, 3, 3)).astype(np.float32)
    vgg[f"features.{index}.bias"] = rng.normal(0, 0.1, (out_ch,)).astype(np.float32)
  if extra_vgg_keys:
    vgg["classifier.0.weight"] = rng.normal(size=(5, 7)).astype(np.float32)
  lin = {f"lin{k}.model.1.weight": np.abs(rng.normal(size=(1, c, 1, 1))).astype(np.float32)
         for k, c in enumerate(channels)}
  return vgg, lin


@pytest.fixture(scope="module")
def small_lpips():
  vgg, lin = _random_state_dicts(SMALL_CHANNELS)
  params = lpips_lib.lpips_params_from_torch(vgg, lin, channels=SMALL_CHANNELS)
  module = lpips_lib.LPIPS(channels=SMALL_CHANNELS)
  fn = jax.jit(lambda x, y: module.apply({"params": params}, x, y))
  return module, params, fn, vgg, lin


def _images(seed, shape=(2, 32, 32, 3)):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def _numpy_params(module, x, seed=0):
  """Random parameters of the module's shapes, drawn in numpy (jax's RNG is slow to compile)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
    std = 0.02 if name == "kernel" else 0.1
    return jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


# -- LPIPS -----------------------------------------------------------------------------------------

def test_lpips_shape_identity_symmetry_nonnegative(small_lpips):
  _, _, fn, _, _ = small_lpips
  x, y = _images(1), _images(2)
  d_xy = fn(x, y)
  assert d_xy.shape == (2,) and d_xy.dtype == jnp.float32
  assert np.all(np.asarray(d_xy) > 0)
  np.testing.assert_allclose(fn(x, x), 0.0, atol=1e-7)
  np.testing.assert_allclose(fn(y, x), d_xy, rtol=1e-5)
  for seed in range(3):
    assert np.all(np.asarray(fn(_images(10 + seed), _images(20 + seed))) >= 0)


def test_lpips_param_tree_matches_module(small_lpips):
  module, params, _, _, _ = small_lpips
  abstract = jax.eval_shape(module.init, jax.random.key(0), _images(0), _images(0))["params"]
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(np.shape, params)


def test_lpips_matches_torch_reference(small_lpips):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  _, _, fn, vgg, lin = small_lpips
  convs, taps = _torchvision_conv_keys(SMALL_CHANNELS)
  conv_at = {index: index for index, _, _ in convs}

  def features(x_BCHW):
    out, h = [], x_BCHW
    index = 0
    for item in TORCHVISION_CFG:
      if item == "M":
        h = F.max_pool2d(h, kernel_size=2, stride=2)
        index += 1
        continue
      assert index in conv_at
      h = F.conv2d(h, torch.from_numpy(vgg[f"features.{index}.weight"]),
                   torch.from_numpy(vgg[f"features.{index}.bias"]), padding=1)
      h = F.relu(h)
      if index + 1 in taps:
        out.append(h)
      index += 2
    return out

  def reference(x_BHWC, y_BHWC):
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    to_t = lambda a: (torch.from_numpy(np.array(a)).permute(0, 3, 1, 2) - shift) / scale
    total = 0.0
    for k, (fx, fy) in enumerate(zip(features(to_t(x_BHWC)), features(to_t(y_BHWC)))):
      fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
      fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
      w = torch.from_numpy(lin[f"lin{k}.model.1.weight"])
      total = total + F.conv2d((fx - fy) ** 2, w).mean(dim=(2, 3), keepdim=True)
    return total.reshape(-1).numpy()

  # 36x40: odd pooled sizes (floor) and a non-square image exercise the layout.
  x, y = _images(3, (2, 36, 40, 3)), _images(4, (2, 36, 40, 3))
  with torch.no_grad():
    expected = reference(x, y)
  np.testing.assert_allclose(np.asarray(fn(x, y)), expected, rtol=2e-4, atol=1e-6)


def test_lpips_gradient_reaches_images_not_weights(small_lpips):
  module, params, _, _, _ = small_lpips
  loss = lpips_lib.make_perceptual_loss(module, params)
  x, y = _images(5), _images(6)
  grad = jax.jit(jax.grad(loss))
  g_x = grad(x, y)
  assert np.all(np.isfinite(np.asarray(g_x))) and float(jnp.abs(g_x).sum()) > 0
  # Gradient at x == y (the minimum, zero feature vectors after ReLU included) is finite.
  assert np.all(np.isfinite(np.asarray(grad(y, y))))
  g_params = jax.jit(jax.grad(lambda p: lpips_lib.make_perceptual_loss(module, p)(x, y)))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_params))


def test_lpips_accepts_full_size_torchvision_layout():
  convs, _ = _torchvision_conv_keys(lpips_lib.VGG16_CHANNELS)
  zeros = lambda shape: np.broadcast_to(np.float32(0), shape)
  vgg = {}
  for index, out_ch, in_ch in convs:
    vgg[f"features.{index}.weight"] = zeros((out_ch, in_ch, 3, 3))
    vgg[f"features.{index}.bias"] = zeros((out_ch,))
  vgg["classifier.6.weight"] = zeros((1000, 4096))
  lin = {f"lin{k}.model.1.weight": zeros((1, c, 1, 1))
         for k, c in enumerate(lpips_lib.VGG16_CHANNELS)}
  params = lpips_lib.lpips_params_from_torch(vgg, lin)
  abstract = jax.eval_shape(lpips_lib.LPIPS().init, jax.random.key(0),
                            jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))["params"]
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(np.shape, params)
  assert params["vgg"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
  assert params["lin_4"]["kernel"].shape == (1, 1, 512, 1)


def test_lpips_weight_errors_list_every_problem():
  vgg, lin = _random_state_dicts(SMALL_CHANNELS)
  del vgg["features.7.weight"]
  vgg["features.28.bias"] = np.zeros((3,), np.float32)
  del lin["lin2.model.1.weight"]
  with pytest.raises(CheckpointError) as info:
    lpips_lib.lpips_params_from_torch(vgg, lin, channels=SMALL_CHANNELS)
  msg = str(info.value)
  assert "features.7.weight" in msg and "features.28.bias" in msg and "(3,)" in msg
  assert "lin2.model.1.weight" in msg and "vgg16" in msg
  _, lin = _random_state_dicts(SMALL_CHANNELS)
  vgg, _ = _random_state_dicts(SMALL_CHANNELS)
  lin["lin0.model.1.weight"] = -lin["lin0.model.1.weight"]
  with pytest.raises(CheckpointError, match="non-negative"):
    lpips_lib.lpips_params_from_torch(vgg, lin, channels=SMALL_CHANNELS)
  with pytest.raises(ConfigError):
    lpips_lib.lpips_params_from_torch(vgg, lin, channels=(4, 8))


def test_lpips_bad_inputs(small_lpips):
  module, params, _, _, _ = small_lpips
  with pytest.raises(InputError, match="one shape"):
    module.apply({"params": params}, _images(0), _images(0, (2, 32, 16, 3)))
  with pytest.raises(InputError, match="at least 16"):
    module.apply({"params": params}, _images(0, (1, 8, 8, 3)), _images(0, (1, 8, 8, 3)))


def test_load_lpips_missing_files_names_them(tmp_path):
  vgg_path, lin_path = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
  with pytest.raises(CheckpointError) as info:
    lpips_lib.load_lpips(vgg_path, lin_path)
  msg = str(info.value)
  assert str(vgg_path) in msg and str(lin_path) in msg
  assert "torchvision" in msg and "v0.1" in msg


def test_load_lpips_reads_torch_files(tmp_path, small_lpips):
  torch = pytest.importorskip("torch")
  _, _, _, vgg, lin = small_lpips
  vgg_path, lin_path = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()}, vgg_path)
  torch.save({k: torch.from_numpy(v) for k, v in lin.items()}, lin_path)
  with pytest.raises(CheckpointError, match="do not fit"):  # default widths need the real VGG16
    lpips_lib.load_lpips(vgg_path, lin_path)
  # Full-size (zero) weights in the torchvision / LPIPS layouts load.
  convs, _ = _torchvision_conv_keys(lpips_lib.VGG16_CHANNELS)
  full_vgg = {}
  for index, out_ch, in_ch in convs:
    full_vgg[f"features.{index}.weight"] = torch.zeros(out_ch, in_ch, 3, 3)
    full_vgg[f"features.{index}.bias"] = torch.zeros(out_ch)
  torch.save(full_vgg, vgg_path)
  torch.save({f"lin{k}.model.1.weight": torch.ones(1, c, 1, 1)
              for k, c in enumerate(lpips_lib.VGG16_CHANNELS)}, lin_path)
  module, params = lpips_lib.load_lpips(vgg_path, lin_path)
  assert isinstance(module, lpips_lib.LPIPS) and module.channels == lpips_lib.VGG16_CHANNELS
  assert params["vgg"]["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
  assert params["lin_3"]["kernel"].shape == (1, 1, 512, 1)
  lin_path.write_bytes(b"not a checkpoint")
  with pytest.raises(CheckpointError, match="re-save"):
    lpips_lib.load_lpips(vgg_path, lin_path)


# -- discriminator -------------------------------------------------------------------------------

def test_discriminator_shapes_and_params():
  d = disc_lib.NLayerDiscriminator(ndf=8, n_layers=3, num_groups=4)
  x = _images(7, (2, 32, 32, 3))
  params = _numpy_params(d, x)
  logits = jax.jit(d.apply)({"params": params}, x)
  side = disc_lib.output_side(32, 3)
  assert side == 2 and logits.shape == (2, side, side, 1) and logits.dtype == jnp.float32
  assert disc_lib.output_side(256, 3) == 30  # the classic 30x30 PatchGAN map
  assert [params[f"conv_{n}"]["kernel"].shape[-1] for n in range(4)] == [8, 16, 32, 64]
  assert "bias" in params["conv_0"] and "bias" in params["conv_out"]
  assert all("bias" not in params[f"conv_{n}"] for n in (1, 2, 3))  # the norm's offset replaces it
  assert set(params) >= {"norm_1", "norm_2", "norm_3"}


def test_discriminator_init():
  d = disc_lib.NLayerDiscriminator(ndf=32, n_layers=1, norm="none")
  params = jax.jit(d.init)(jax.random.key(0), _images(0, (1, 16, 16, 3)))["params"]
  assert set(params) == {"conv_0", "conv_1", "conv_out"} and "bias" in params["conv_1"]
  assert 0.018 < float(np.std(np.asarray(params["conv_1"]["kernel"]))) < 0.022  # N(0, 0.02)
  assert float(jnp.abs(params["conv_1"]["bias"]).max()) == 0.0


def test_discriminator_is_per_example():
  d = disc_lib.NLayerDiscriminator(ndf=8, n_layers=2, num_groups=4)
  x = _images(8, (2, 32, 32, 3))
  params = _numpy_params(d, x)
  apply = jax.jit(d.apply)
  a = apply({"params": params}, x)
  b = apply({"params": params}, x.at[1].set(_images(9, (1, 32, 32, 3))[0]))
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-7)  # no batch statistics
  assert not np.allclose(a[1], b[1])


def test_discriminator_bad_configs():
  x = _images(0, (1, 32, 32, 3))
  with pytest.raises(ConfigError, match="norm"):
    jax.eval_shape(disc_lib.NLayerDiscriminator(norm="batch").init, jax.random.key(0), x)
  with pytest.raises(ConfigError, match="divisible"):
    jax.eval_shape(disc_lib.NLayerDiscriminator(ndf=6, n_layers=2, num_groups=8).init,
                   jax.random.key(0), x)
  with pytest.raises(InputError, match="too small"):
    jax.eval_shape(disc_lib.NLayerDiscriminator(ndf=8, num_groups=4).init, jax.random.key(0),
                   _images(0, (1, 8, 8, 3)))


# -- adversarial pieces --------------------------------------------------------------------------

def test_hinge_and_generator_losses():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1.
  np.testing.assert_allclose(vl.hinge_d_loss(real, fake), 0.5 * (5 / 6 + 1.0), rtol=1e-6)
  np.testing.assert_allclose(vl.hinge_d_loss(jnp.ones(4) * 3, -jnp.ones(4) * 3), 0.0)
  np.testing.assert_allclose(vl.generator_adversarial_loss(fake), 1 / 3, rtol=1e-6)


def test_adaptive_generator_weight():
  g_rec, g_gan = jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0])
  np.testing.assert_allclose(vl.adaptive_generator_weight(g_rec, g_gan), 5.0 / (2.0 + 1e-4),
                             rtol=1e-6)
  # Pytrees: global norm over all leaves.
  tree_rec = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}
  np.testing.assert_allclose(vl.adaptive_generator_weight(tree_rec, {"a": jnp.array([2.0])}),
                             5.0 / (2.0 + 1e-4), rtol=1e-6)
  assert float(vl.adaptive_generator_weight(g_rec, jnp.zeros(2))) == pytest.approx(1e4)
  assert float(vl.adaptive_generator_weight(g_rec * 100, g_gan, max_weight=7.0)) == 7.0
  both_zero = vl.adaptive_generator_weight(jnp.zeros(2), jnp.zeros(2))
  assert float(both_zero) == 0.0
  g = jax.grad(lambda r: vl.adaptive_generator_weight(r, g_gan))(g_rec)
  assert float(jnp.abs(g).sum()) == 0.0  # stop-gradient


def test_adopt_weight_before_after_and_traced():
  assert float(vl.adopt_weight(0.8, 9, 10)) == 0.0
  assert float(vl.adopt_weight(0.8, 10, 10)) == pytest.approx(0.8)
  assert float(vl.adopt_weight(0.8, 11, 10)) == pytest.approx(0.8)
  traced = jax.jit(lambda s: vl.adopt_weight(0.5, s, 100))
  assert float(traced(jnp.int32(99))) == 0.0 and float(traced(jnp.int32(100))) == 0.5


# -- pixel losses and metrics --------------------------------------------------------------------

def test_pixel_losses_and_psnr():
  x = jnp.zeros((2, 4, 4, 3))
  y = jnp.full((2, 4, 4, 3), 0.5)
  assert float(vl.l1(x, y)) == pytest.approx(0.5)
  assert float(vl.l2(x, y)) == pytest.approx(0.25)
  assert float(vl.pixel_loss(x, y, "l2")) == pytest.approx(0.25)
  with pytest.raises(ConfigError):
    vl.pixel_loss(x, y, "huber")
  with pytest.raises(InputError):
    vl.l1(x, y[:1])
  # 0.5 apart in [-1, 1] is 0.25 apart in [0, 1]: mse 1/16 -> 10 log10(16) dB.
  p = vl.psnr(x, y)
  assert p.shape == (2,)
  np.testing.assert_allclose(p, 10 * np.log10(16.0), rtol=1e-5)
  np.testing.assert_allclose(vl.psnr(x, x), vl.PSNR_MAX_DB)  # capped, not inf
  np.testing.assert_allclose(vl.psnr(jnp.ones((1, 2, 2, 3)), jnp.full((1, 2, 2, 3), 1.7)),
                             vl.PSNR_MAX_DB)  # unclamped values are clipped first
  # Full-range error: -1 vs 1 is mse 1 on [0, 1] -> 0 dB.
  np.testing.assert_allclose(vl.psnr(-jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3))), 0.0,
                             atol=1e-6)


# -- codebook upkeep -----------------------------------------------------------------------------

def test_codebook_usage_and_ema():
  hits = jnp.array([[1, 0, 0, 2], [0, 0, 3, 1]], jnp.int32)
  out = vl.codebook_usage(hits)
  np.testing.assert_allclose(out["usage_per_scale"], [0.5, 0.5])
  assert float(out["usage"]) == pytest.approx(0.75)
  assert "dead_codes" not in out
  ema = jnp.array([0.5, 0.001, 0.2, 0.0])
  out = vl.codebook_usage(hits, ema, threshold=0.01)
  assert int(out["dead_codes"]) == 2 and float(out["dead_fraction"]) == pytest.approx(0.5)
  new_ema = vl.update_ema_hits(jnp.zeros(4), hits, decay=0.9)
  np.testing.assert_allclose(new_ema, [0.1, 0.0, 0.3, 0.3], rtol=1e-6)
  with pytest.raises(InputError):
    vl.codebook_usage(hits[0])
  with pytest.raises(InputError):
    vl.codebook_usage(hits, jnp.zeros(3))


@pytest.mark.parametrize("num_candidates", [64, 4])
def test_reseed_replaces_exactly_the_dead_codes(num_candidates):
  rng = np.random.default_rng(0)
  codebook = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  ema = jnp.array([1.0, 0.0, 0.5, 0.009, 2.0, 0.01, 0.0, 3.0])
  candidates = jnp.asarray(rng.normal(size=(num_candidates, 3)) + 10.0, jnp.float32)
  reseed = jax.jit(vl.reseed_dead_codes, static_argnames="threshold")
  out = reseed(codebook, ema, candidates, jax.random.key(1), threshold=0.01)
  dead = np.array([False, True, False, True, False, False, True, False])
  np.testing.assert_array_equal(out.dead_V, dead)
  new, old, cand = np.asarray(out.codebook_VC), np.asarray(codebook), np.asarray(candidates)
  np.testing.assert_array_equal(new[~dead], old[~dead])  # bit-identical
  for row in new[dead]:
    assert np.any(np.all(cand == row, axis=1))  # an actual candidate
  if num_candidates >= 8:
    assert len({tuple(r) for r in new[dead]}) == dead.sum()  # without replacement
  np.testing.assert_array_equal(np.asarray(out.ema_hits_V)[~dead], np.asarray(ema)[~dead])
  np.testing.assert_allclose(np.asarray(out.ema_hits_V)[dead], 0.01)
  with pytest.raises(InputError):
    vl.reseed_dead_codes(codebook, ema, candidates[:, :2], jax.random.key(0), 0.01)


# -- combined objectives -------------------------------------------------------------------------

def _toy_generator():
  """A generator whose last layer sits at decoder/conv_out/kernel, and its parameters."""
  rng = np.random.default_rng(3)
  params = {"enc": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
            "decoder": {"conv_out": {"kernel": jnp.asarray(rng.normal(size=(3, 3)) * 0.5,
                                                           jnp.float32)}}}

  def forward(p, images):
    h = jnp.tanh(jnp.einsum("bhwc,cd->bhwd", images, p["enc"]))
    recon = jnp.einsum("bhwc,cd->bhwd", h, p["decoder"]["conv_out"]["kernel"])
    return recon, jnp.mean(jnp.square(p["enc"]))  # (recon, a stand-in vq_loss)

  return params, forward


def _config(**overrides):
  c = vl.default_loss_config()
  c.disc_start_step = 5
  c.update(overrides)
  return c


def test_generator_loss_without_gan_or_lpips():
  x, r = _images(1, (2, 8, 8, 3)), _images(2, (2, 8, 8, 3))
  loss, m = vl.vqgan_generator_loss(x, r, jnp.float32(0.3), config=_config(vq_weight=2.0),
                                    step=0)
  np.testing.assert_allclose(loss, vl.l1(x, r) + 0.6, rtol=1e-6)
  assert float(m["gan_weight"]) == 0.0 and float(m["perceptual"]) == 0.0
  perceptual = lambda a, b: 3.0 * vl.l2(a, b)
  loss, m = vl.vqgan_generator_loss(x, r, 0.0, config=_config(perceptual_weight=0.5,
                                                               pixel_loss="l2"),
                                    step=0, perceptual_fn=perceptual)
  np.testing.assert_allclose(m["perceptual"], 3.0 * vl.l2(x, r), rtol=1e-6)
  np.testing.assert_allclose(loss, 2.5 * vl.l2(x, r), rtol=1e-6)


def test_generator_loss_adaptive_weight_and_gradient():
  params, forward = _toy_generator()
  x = _images(4, (2, 8, 8, 3))
  d = disc_lib.NLayerDiscriminator(ndf=4, n_layers=1, norm="none")
  d_params = _numpy_params(d, x, seed=2)
  disc_logits = lambda img: d.apply({"params": d_params}, img)
  perceptual = lambda a, b: vl.l2(jnp.tanh(a), jnp.tanh(b))
  config = _config(disc_weight=0.5)

  def loss_fn(p, step):
    recon, vq, vjp = vl.forward_with_last_layer_vjp(lambda q: forward(q, x), p)
    return vl.vqgan_generator_loss(x, recon, vq, config=config, step=step,
                                   perceptual_fn=perceptual, disc_logits_fn=disc_logits,
                                   last_layer_vjp=vjp)

  (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, 5)

  # Reference: the two losses as functions of the last-layer kernel, differentiated directly.
  def with_kernel(k):
    p = {"enc": params["enc"], "decoder": {"conv_out": {"kernel": k}}}
    return forward(p, x)[0]
  rec_of = lambda k: vl.l1(x, with_kernel(k)) + perceptual(x, with_kernel(k))
  gan_of = lambda k: -jnp.mean(disc_logits(with_kernel(k)))
  kernel = params["decoder"]["conv_out"]["kernel"]
  g_rec, g_gan = jax.grad(rec_of)(kernel), jax.grad(gan_of)(kernel)
  lam = np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4)
  np.testing.assert_allclose(m["adaptive_weight"], lam, rtol=1e-4)
  np.testing.assert_allclose(m["gan_weight"], 0.5 * lam, rtol=1e-4)

  # The gradient treats lambda as a constant.
  def fixed_loss(p):
    recon, vq = forward(p, x)
    rec = vl.l1(x, recon) + perceptual(x, recon)
    return rec + vq + 0.5 * lam * vl.generator_adversarial_loss(disc_logits(recon))
  expected = jax.grad(fixed_loss)(params)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

  # Before disc_start_step the GAN term is off, so the loss is rec + vq.
  _, m0 = jax.jit(loss_fn)(params, 4)
  assert float(m0["gan_weight"]) == 0.0
  np.testing.assert_allclose(m0["loss"], m0["rec"] + m0["vq"], rtol=1e-6)

  recon, vq = forward(params, x)
  with pytest.raises(ConfigError, match="last_layer_vjp"):
    vl.vqgan_generator_loss(x, recon, vq, config=config, step=0, disc_logits_fn=disc_logits)
  _, m_fixed = vl.vqgan_generator_loss(x, recon, vq, config=_config(adaptive_disc_weight=False),
                                       step=5, disc_logits_fn=disc_logits)
  assert float(m_fixed["gan_weight"]) == pytest.approx(0.5)


def test_last_layer_path_fits_the_vqvae():
  cfg = VQVAEConfig(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                    num_groups=4, using_sa=False, using_mid_sa=False, patch_nums=(1, 2, 4))
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
  abstract = jax.eval_shape(VQVAE(cfg).init, jax.random.key(0), x)["params"]
  recon, (vq, hits), vjp = jax.eval_shape(
      lambda p: vl.forward_with_last_layer_vjp(
          lambda q: (lambda r, v, h: (r, (v, h)))(*VQVAE(cfg).apply({"params": q}, x)), p)[:2],
      abstract) + (None,)
  assert recon.shape == x.shape and hits.shape == (3, 16)
  assert abstract["decoder"]["conv_out"]["kernel"].shape == (3, 3, 8, 3)
  with pytest.raises(InputError, match="decoder/conv_out"):
    vl.forward_with_last_layer_vjp(lambda p: (x, None), {"decoder": {}})


def test_discriminator_loss_gated_by_start():
  real, fake = jnp.array([0.0, 2.0]), jnp.array([0.5, -3.0])
  loss, m = vl.vqgan_discriminator_loss(real, fake, config=_config(), step=5)
  np.testing.assert_allclose(loss, vl.hinge_d_loss(real, fake))
  loss, m = vl.vqgan_discriminator_loss(real, fake, config=_config(), step=4)
  assert float(loss) == 0.0 and float(m["disc_factor"]) == 0.0


# -- config and builders ---------------------------------------------------------------------------

def test_default_config_and_validation():
  c = vl.default_loss_config()
  assert c.pixel_loss == "l1" and c.pixel_weight == 1.0 and c.perceptual_weight == 1.0
  assert c.disc_weight == 0.5 and c.vq_weight == 1.0 and c.disc_ndf == 64 and c.disc_layers == 3
  assert c.allow_missing_lpips is False and c.reseed_dead_codes is False
  vl.validate_loss_config(c)
  for field, value in (("pixel_loss", "l3"), ("disc_weight", -1.0), ("disc_layers", 0),
                       ("ema_hits_decay", 1.0)):
    bad = vl.default_loss_config()
    bad[field] = value
    with pytest.raises(ConfigError, match=field):
      vl.validate_loss_config(bad)


def test_build_perceptual_loss_missing_files(tmp_path, caplog):
  c = vl.default_loss_config()
  c.lpips_vgg_path = str(tmp_path / "missing_vgg16.pth")
  c.lpips_lin_path = str(tmp_path / "missing_vgg.pth")
  with pytest.raises(CheckpointError, match="missing_vgg16.pth"):
    vl.build_perceptual_loss(c)
  c.allow_missing_lpips = True
  with caplog.at_level(logging.WARNING):
    assert vl.build_perceptual_loss(c) is None
  assert "WITHOUT the perceptual loss" in caplog.text
  c.allow_missing_lpips = False
  c.perceptual_weight = 0.0
  assert vl.build_perceptual_loss(c) is None


def test_build_discriminator_from_config():
  c = vl.default_loss_config()
  c.disc_ndf, c.disc_layers, c.disc_num_groups = 8, 2, 4
  d = vl.build_discriminator(c)
  assert (d.ndf, d.n_layers, d.norm, d.num_groups) == (8, 2, "group", 4)
