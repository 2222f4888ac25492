"""The 3x3 convolution by Winograd's F(2x2, 3x3) and F(4x4, 3x3) (ops/conv_winograd.py), XLA:CPU's
float32 path.

Expectations come from a float64 numpy convolution (nine shifted einsums), the transform matrices
as written in Lavin & Gray (2016) applied with numpy, and XLA's convolution; never from the
module's helpers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from var_jax.errors import InputError
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops import conv as conv_ops
from var_jax.ops import conv_winograd
from conv_reference import (conv_operands, gradients_through_impl_and_xla, numpy_conv3x3,
                            tokenizer_through_auto_and_xla)

# F(4x4, 3x3) sums more terms with larger coefficients: its float32 error is ~10x F(2x2)'s
# (measured at unit-variance outputs: ~1e-6 against ~1e-5).
_TOLERANCE = {2: 1e-5, 4: 1e-4}


@pytest.mark.parametrize("B, H, W, cin, cout, upsample, tile, max_tiles", [
    (2, 12, 10, 16, 24, False, 2, 10),   # 4 rows per block, 3 blocks per image: interior halos
    (1, 6, 8, 8, 8, False, 2, 10_000),   # one block: both halos the zero padding
    (1, 10, 6, 8, 12, False, 2, 1),      # the 2-row minimum, 5 blocks
    (2, 3, 5, 8, 12, True, 2, 10),       # upsampled to 6 x 10 first, then 3 blocks of 2 rows
    (2, 12, 8, 16, 24, False, 4, 2),     # 4 rows per block, 3 blocks per image
    (1, 8, 12, 8, 8, False, 4, 10_000),  # one block
    (1, 4, 6, 8, 12, True, 4, 3),        # upsampled to 8 x 12, then 2 blocks of 4 rows
])
def test_winograd_matches_the_float64_convolution(B, H, W, cin, cout, upsample, tile, max_tiles):
  x, kernel, bias = conv_operands(0, B, H, W, cin, cout)
  got = conv_winograd.conv3x3_winograd(x, kernel, bias, upsample, tile, max_tiles)
  a = np.asarray(x)
  if upsample:
    a = a.repeat(2, axis=1).repeat(2, axis=2)
  want = numpy_conv3x3(a, kernel, bias)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=_TOLERANCE[tile], atol=_TOLERANCE[tile])


@pytest.mark.parametrize("tile", [2, 4])
def test_convs_of_one_shape_trace_the_transforms_once(monkeypatch, tile):
  """Each block's transforms are hundreds of traced ops: a decoder's convs of one shape share
  one trace of them (the released decoder traced 76 blocks for 11 shapes), and repeating the conv
  still gives each kernel's own result."""
  traced = []
  real = conv_winograd._input_transform
  monkeypatch.setattr(conv_winograd, "_input_transform",
                      lambda d, m: traced.append(d.shape) or real(d, m))
  x, kernel_a, bias = conv_operands(3, 1, 8, 12, 8, 8)
  kernel_b = -2.0 * kernel_a
  # A fresh trace cache: another test may have traced these shapes already.
  jax.clear_caches()
  both = jax.jit(lambda x: [conv_winograd.conv3x3_winograd(x, k, bias, False, tile, 10_000)
                            for k in (kernel_a, kernel_b)])(x)
  assert len(traced) == 1, traced
  for got, k in zip(both, (kernel_a, kernel_b)):
    want = numpy_conv3x3(np.asarray(x), k, bias)
    np.testing.assert_allclose(np.asarray(got), want, rtol=_TOLERANCE[tile], atol=_TOLERANCE[tile])


# G of F(2x2, 3x3) and F(4x4, 3x3), Lavin & Gray (2016).
_G = {2: np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
      4: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])}


@pytest.mark.parametrize("tile", [2, 4])
def test_kernel_transform_is_g_g_gt(tile):
  G = _G[tile]
  k = np.random.default_rng(1).standard_normal((3, 3, 4, 5))
  want = np.einsum("ay,yxio,bx->abio", G, k, G)
  got = conv_winograd.kernel_transform(jnp.asarray(k, jnp.float32), jnp.float32, tile)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_block_rows_is_the_largest_multiple_of_the_tile_dividing_the_height_within_the_budget():
  rows = conv_winograd.block_rows
  assert [rows(h, w, 2) for h, w in ((256, 256), (128, 128), (64, 64), (16, 16))] == [8, 16, 32, 16]
  assert [rows(h, w, 4) for h, w in ((256, 256), (128, 128), (64, 64))] == [32, 64, 64]
  assert rows(12, 10, 2, max_tiles=10) == 4
  assert rows(10, 6, 2, max_tiles=1) == 2  # never fewer than one tile row
  assert rows(18, 4, 2, max_tiles=10) == 6  # 8 would fit the budget but does not divide 18
  assert rows(24, 8, 4, max_tiles=7) == 12  # 12 rows: 3 x 2 tiles; 24 rows would be 12
  assert rows(20, 8, 4, max_tiles=100) == 20


def test_output_tile_is_4_for_float32_images_of_64_x_64_and_more():
  tile = conv_winograd.output_tile
  assert tile(256, 256, jnp.float32) == tile(64, 64, jnp.float32) == 4
  assert tile(32, 128, jnp.float32) == 4   # 4096 pixels
  assert tile(32, 32, jnp.float32) == 2    # too few tiles
  assert tile(60, 64, jnp.float32) == 2    # 3840 pixels
  assert tile(66, 64, jnp.float32) == 2    # 66 rows: even, not a multiple of 4
  assert tile(256, 256, jnp.bfloat16) == 2


def test_a_height_the_tile_does_not_divide_is_an_error():
  x, kernel, bias = conv_operands(3, 1, 6, 8, 4, 4)
  with pytest.raises(ValueError, match="multiples of 4, got 6 x 8"):
    conv_winograd.conv3x3_winograd(x, kernel, bias, tile=4)
  with pytest.raises(ValueError, match="tile 3 is not one of"):
    conv_winograd.conv3x3_winograd(x, kernel, bias, tile=3)


def test_winograd_in_bfloat16_stays_within_a_few_bf16_steps():
  """bf16 operands round the transformed tiles too: looser than the row blocks' single rounding,
  still within 3 bf16 steps of the output's scale at 64 input channels."""
  x, kernel, bias = conv_operands(2, 2, 16, 16, 64, 48, jnp.bfloat16)
  got = conv_ops.conv3x3(x, kernel, bias, impl="winograd")
  assert got.dtype == jnp.bfloat16
  want = numpy_conv3x3(np.asarray(x, np.float32), np.asarray(kernel, np.float32),
                       np.asarray(bias, np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=3 * 2 ** -8 * np.abs(want).max())


@pytest.mark.parametrize("upsample", [False, True])
def test_winograd_is_differentiable_like_the_convolution(upsample):
  for g, w in gradients_through_impl_and_xla("winograd", upsample):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_auto_takes_winograd_for_wide_float32_convs_on_cpu_and_xla_for_odd_sizes():
  wide = conv_ops.AUTO_WINOGRAD_MIN_CHANNELS
  assert conv_ops.resolve_impl("auto", batch=8, dtype=jnp.float32) == "winograd"
  assert conv_ops.resolve_impl("auto", batch=8) == "winograd"  # no dtype: float32
  assert conv_ops.resolve_impl("auto", dtype=jnp.float32, channels=(wide, wide)) == "winograd"
  assert conv_ops.resolve_impl("auto", dtype=jnp.float32, channels=(wide, 3)) == "xla"
  assert conv_ops.resolve_impl("auto", dtype=jnp.float32, channels=(wide - 1, wide)) == "xla"
  assert conv_ops.resolve_impl("winograd", channels=(8, 8)) == "winograd"  # asked for by name
  # An odd height under "auto" takes XLA's convolution (exactly its result)...
  x, kernel, bias = conv_operands(5, 1, 7, 6, wide, wide)
  got = conv_ops.conv3x3(x, kernel, bias, impl="auto")
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(conv_ops.conv3x3(x, kernel, bias, impl="xla")))
  # ...and asked for by name it is an error that says what to use instead.
  with pytest.raises(InputError, match="even output height and width.*'auto'"):
    conv_ops.conv3x3(x, kernel, bias, impl="winograd")


@pytest.mark.parametrize("batch", [8, 3])  # split over the 8 devices, and a batch they cannot split
def test_winograd_under_a_mesh(batch):
  x, kernel, bias = conv_operands(6, batch, 8, 8, 8, 8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data") if batch % 8 == 0 else jax.P()))
    got = jax.jit(lambda x, k, b: conv_ops.conv3x3(x, k, b, impl="winograd"))(xs, kernel, bias)
  want = numpy_conv3x3(np.asarray(x), np.asarray(kernel), np.asarray(bias))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


# The released tokenizer's narrowest width (160), so that "auto" takes Winograd; 64 px images.
_SMALL = dict(ch=160, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=32,
              using_sa=True, using_mid_sa=True, patch_nums=(1, 2, 4, 8, 16, 32))


def test_float32_tokenizer_on_cpu_runs_its_convs_by_winograd(monkeypatch):
  """The user's path: a float32 tokenizer with the default conv_impl on CPU calls the Winograd
  conv for every resnet and upsampling conv (the output heads, to 8 and 3 channels, stay XLA's),
  F(4x4, 3x3) at the 64 px level and F(2x2, 3x3) at 32 px, and reconstructs what the precision.Conv
  + nn.GroupNorm modules (conv_impl="xla") do, to float32 rounding."""
  tiles = []  # each call's m, as it transforms its kernel (no transformed kernels are passed here)
  kernel_transform = conv_winograd.kernel_transform
  monkeypatch.setattr(conv_winograd, "kernel_transform",
                      lambda kernel, dtype, tile: tiles.append(tile) or kernel_transform(
                          kernel, dtype, tile))
  # Encoder: 2 per resnet block (2 levels + 2 mid). Decoder: 2 per resnet block (2 levels of 2 +
  # 2 mid), one upsample.
  counts = {"encode_to_latent": 2 * 4, "decode_fhat_unclamped": 2 * 6 + 1}
  results = tokenizer_through_auto_and_xla(monkeypatch, conv_winograd, "conv3x3_winograd", _SMALL,
                                           "float32", image_side=64)
  # The tile of each call, in order: the encoder's 2 convs at 64 px, its 6 at 32 px; the
  # decoder's 8 at 32 px (mid and its first level), then the upsample to 64 px and 4 convs there.
  assert tiles == [4] * 2 + [2] * 6 + [2] * 8 + [4] * 5
  for method, calls, got, want in results:
    assert len(calls) == counts[method]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_a_tokenizer_of_odd_latent_side_runs_under_auto(monkeypatch):
  """A 30 px tokenizer (latent side 15, patch_nums ending in 15) with the default conv_impl: the
  convs at 15 x 15 are odd-sized for Winograd and fall back to XLA's convolution
  (`ops.conv.conv3x3_impl`), those at 30 x 30 run F(2x2, 3x3); encoder and decoder reconstruct
  what the flax modules do. The model used to pass "winograd" on by name and fail at 15 x 15."""
  config = {**_SMALL, "patch_nums": (1, 3, 5, 15)}
  results = tokenizer_through_auto_and_xla(monkeypatch, conv_winograd, "conv3x3_winograd", config,
                                           "float32", image_side=30)
  # Winograd only at 30 px: the encoder's first level (2 convs), the decoder's upsample and its
  # last level (1 + 4); everything at 15 px went to XLA.
  counts = {"encode_to_latent": 2, "decode_fhat_unclamped": 1 + 4}
  for method, calls, got, want in results:
    assert len(calls) == counts[method]
    assert all(shape[1] in (15, 30) for shape in calls)  # the upsample reads 15 px
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  # Asked for by name, Winograd at an odd size is a clear error from the model too.
  model = VQVAE(VQVAEConfig(**config, conv_impl="winograd"))
  with pytest.raises(InputError, match="even output height and width, got 15 x 15"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 3)))


def test_a_kernel_transformed_before_gives_the_same_conv_and_gradients():
  """`conv3x3(impl="winograd", winograd_kernel=U)` with U transformed outside the call (as a
  sampler's placement does) computes what the call's own transform gives, differentiates as XLA's
  convolution through the kernel (U gets no gradient), and a U of the wrong tile is refused."""
  x, kernel, bias = conv_operands(3, 1, 8, 8, 16, 24)
  u = conv_winograd.kernel_transform(kernel, jnp.float32, 2)
  conv = lambda x, k, b, u=None: conv_ops.conv3x3(x, k, b, impl="winograd", winograd_kernel=u)
  np.testing.assert_array_equal(conv(x, kernel, bias, u), conv(x, kernel, bias))
  loss = lambda *args: jnp.sum(conv(*args) ** 2)
  grads_with = jax.grad(loss, argnums=(0, 1, 2, 3))(x, kernel, bias, u)
  grads_without = jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)
  for got, want in zip(grads_with, grads_without):
    np.testing.assert_array_equal(got, want)
  assert not np.any(grads_with[3])
  with pytest.raises(ValueError, match=r"F\(2x2, 3x3\) must be \(4, 4, 16, 24\)"):
    conv(x, kernel, bias, conv_winograd.kernel_transform(kernel, jnp.float32, 4))


def _small_winograd_models():
  """(tokenizer, make_model(seed)): a small tokenizer whose decoder's convs run as Winograd by
  name (at 32 channels; "auto" takes it from 160 on CPU, the same code, costlier) and one-block
  VAR models on it with random params."""
  import var_jax
  from var_jax.models import var as var_module
  from var_jax.models import vqvae
  from var_jax.models.var_config import VARConfig
  tok_cfg = VQVAEConfig(**{**_SMALL, "ch": 32, "patch_nums": (1, 2, 4, 8)}, conv_impl="winograd")
  random_like = lambda shapes, rng: jax.tree.map(
      lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), meta.unbox(shapes))
  tokenizer = var_jax.Tokenizer(tok_cfg, random_like(vqvae.param_shapes(tok_cfg),
                                                     np.random.default_rng(0)))
  var_cfg = VARConfig(depth=1, embed_dim=64, num_heads=2, num_classes=4, vocab_size=32,
                      z_channels=8, patch_nums=(1, 2, 4, 8))
  make = lambda seed=1: var_jax.VARModel(
      var_cfg, random_like(var_module.param_shapes(var_cfg), np.random.default_rng(seed)),
      tokenizer)
  return tokenizer, make


def _counting(monkeypatch, module):
  """Counts the calls of module.winograd_kernels (patched to a counting wrapper)."""
  calls, real = [], module.winograd_kernels
  monkeypatch.setattr(module, "winograd_kernels",
                      lambda config, params: calls.append(1) or real(config, params))
  return calls


def test_sampler_decodes_with_the_kernels_transformed_once_at_placement(monkeypatch):
  """`var_jax.sample` on CPU: its placement transforms the decoder's Winograd kernels once
  (beside the tokenizer params it places), and the sampling program reads them instead of
  transforming every kernel in every call: the images equal those of a program that transforms
  them in the call (a placement without them), and zeroed placed kernels change them (the
  program reads the placed ones). A refiner's placement and `VARModel.logits`, which decode
  nothing, never transform them."""
  import var_jax
  from var_jax.models import vqvae
  _, make = _small_winograd_models()
  one_device = var_jax.sampling_mesh(devices=jax.devices()[:1])
  sample = lambda model, **kw: np.asarray(var_jax.sample(model, [0, 3], rng=jax.random.key(2),
                                                         top_k=4, mesh=one_device, **kw))

  model = make()
  calls = _counting(monkeypatch, vqvae)
  images = sample(model)
  sample(model)
  assert len(calls) == 1  # once per placement, not per call
  (placed,) = model.placements.values()
  decoder_params = placed.decoding_vae_params["decoder"]
  transformed = [jax.tree_util.keystr(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(decoder_params)[0]
                 if jax.tree_util.keystr(path).endswith("['F2_float32']")]
  # The decoder's 3x3 convs after a GroupNorm, at 8 and 16 px: 2 per resnet block (2 mid, 2 levels
  # of num_res_blocks + 1 = 2), the upsample's and conv_out (conv_in, on the latent, is XLA's).
  assert len(transformed) == 2 * 2 + 2 * 2 * 2 + 1 + 1, transformed
  conv1 = decoder_params["mid"]["block_1"]["conv1"]
  G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])  # F(2x2, 3x3), Lavin & Gray
  np.testing.assert_allclose(conv1["F2_float32"],
                             np.einsum("ai,ijco,bj->abco", G, np.asarray(conv1["kernel"], np.float64), G),
                             rtol=1e-6, atol=1e-7)

  # Decoding nothing, the logits and a refiner's placement transform no kernel.
  del calls[:]
  other = make()
  idx = [np.zeros((2, pn, pn), np.int32) for pn in (1, 2, 4, 8)]
  other.logits([0, 1], idx, mesh=one_device)
  assert not calls
  refiner = make(seed=2)
  sample(other, refiner=refiner, draft_scales=2)
  assert len(calls) == 1  # the drafting model's placement only
  assert "decoding_vae_params" not in vars(refiner.placements[one_device])
  assert "vae_params" not in vars(refiner.placements[one_device])  # no tokenizer copy either

  with monkeypatch.context() as patch:
    patch.setattr(vqvae, "winograd_kernels", lambda config, params: {})
    np.testing.assert_array_equal(sample(make()), images)
  real = vqvae.winograd_kernels
  monkeypatch.setattr(vqvae, "winograd_kernels",
                      lambda config, params: jax.tree.map(jnp.zeros_like, real(config, params)))
  assert np.any(sample(make()) != images)
