"""The 3x3 convolution by Winograd's F(2x2, 3x3) (ops/conv_winograd.py), XLA:CPU's float32 path.

Expectations come from a float64 numpy convolution (nine shifted einsums), the transform matrices
as written in Lavin & Gray (2016) applied with numpy, and XLA's convolution; never from the
module's helpers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.errors import InputError
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops import conv as conv_ops
from var_jax.ops import conv_winograd


def _numpy_conv3x3(a_BHWC, kernel_HWIO, bias_O):
  """float64 zero-padded 3x3 convolution, NHWC x HWIO."""
  a = np.asarray(a_BHWC, np.float64)
  k = np.asarray(kernel_HWIO, np.float64)
  B, H, W, _ = a.shape
  ap = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(np.einsum("bhwc,co->bhwo", ap[:, dy:dy + H, dx:dx + W], k[dy, dx])
          for dy in range(3) for dx in range(3))
  return y + np.asarray(bias_O, np.float64)


def _operands(seed, B, H, W, cin, cout, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, H, W, cin)), dtype)
  kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), dtype)
  bias = jnp.asarray(rng.standard_normal(cout), dtype)
  return x, kernel, bias


@pytest.mark.parametrize("B, H, W, cin, cout, upsample, max_pixels", [
    (2, 12, 10, 16, 24, False, 40),   # 4 rows per block, 3 blocks per image: interior halos
    (1, 6, 8, 8, 8, False, 10_000),   # one block: both halos the zero padding
    (1, 10, 6, 8, 12, False, 1),      # the 2-row minimum, 5 blocks
    (2, 3, 5, 8, 12, True, 40),       # upsampled to 6 x 10 first, then 3 blocks of 2 rows
])
def test_winograd_matches_the_float64_convolution(B, H, W, cin, cout, upsample, max_pixels):
  x, kernel, bias = _operands(0, B, H, W, cin, cout)
  got = conv_winograd.conv3x3_winograd(x, kernel, bias, upsample, max_pixels)
  a = np.asarray(x)
  if upsample:
    a = a.repeat(2, axis=1).repeat(2, axis=2)
  want = _numpy_conv3x3(a, kernel, bias)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_kernel_transform_is_g_g_gt():
  G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
  k = np.random.default_rng(1).standard_normal((3, 3, 4, 5))
  want = np.einsum("ay,yxio,bx->abio", G, k, G)
  got = conv_winograd.kernel_transform(jnp.asarray(k, jnp.float32), jnp.float32)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_block_rows_is_the_largest_even_divisor_within_the_pixel_budget():
  rows = conv_winograd.block_rows
  assert [rows(h, w) for h, w in ((256, 256), (128, 128), (64, 64), (16, 16))] == [8, 16, 32, 16]
  assert rows(12, 10, max_pixels=40) == 4
  assert rows(10, 6, max_pixels=1) == 2  # never fewer than one tile row
  assert rows(18, 4, max_pixels=40) == 6  # 8 would fit the budget but does not divide 18


def test_winograd_in_bfloat16_stays_within_a_few_bf16_steps():
  """bf16 operands round the transformed tiles too: looser than the row blocks' single rounding,
  still within 3 bf16 steps of the output's scale at 64 input channels."""
  x, kernel, bias = _operands(2, 2, 16, 16, 64, 48, jnp.bfloat16)
  got = conv_ops.conv3x3(x, kernel, bias, impl="winograd")
  assert got.dtype == jnp.bfloat16
  want = _numpy_conv3x3(np.asarray(x, np.float32), np.asarray(kernel, np.float32),
                        np.asarray(bias, np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=3 * 2 ** -8 * np.abs(want).max())


@pytest.mark.parametrize("upsample", [False, True])
def test_winograd_is_differentiable_like_the_convolution(upsample):
  x, kernel, bias = _operands(4, 2, 8, 6, 8, 12)

  def loss(conv, x, kernel, bias):
    return jnp.sum(jnp.sin(conv(x, kernel, bias)))

  def reference(x, kernel, bias):
    if upsample:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST) + bias

  winograd = lambda x, kernel, bias: conv_ops.conv3x3(x, kernel, bias, upsample=upsample,
                                                      impl="winograd")
  got = jax.grad(loss, argnums=(1, 2, 3))(winograd, x, kernel, bias)
  want = jax.grad(loss, argnums=(1, 2, 3))(reference, x, kernel, bias)
  for g, w in zip(got, want):
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
  x, kernel, bias = _operands(5, 1, 7, 6, wide, wide)
  got = conv_ops.conv3x3(x, kernel, bias, impl="auto")
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(conv_ops.conv3x3(x, kernel, bias, impl="xla")))
  # ...and asked for by name it is an error that says what to use instead.
  with pytest.raises(InputError, match="even output height and width.*'auto'"):
    conv_ops.conv3x3(x, kernel, bias, impl="winograd")


@pytest.mark.parametrize("batch", [8, 3])  # split over the 8 devices, and a batch they cannot split
def test_winograd_under_a_mesh(batch):
  x, kernel, bias = _operands(6, batch, 8, 8, 8, 8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data") if batch % 8 == 0 else jax.P()))
    got = jax.jit(lambda x, k, b: conv_ops.conv3x3(x, k, b, impl="winograd"))(xs, kernel, bias)
  want = _numpy_conv3x3(np.asarray(x), np.asarray(kernel), np.asarray(bias))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


# The released tokenizer's narrowest width (160), so that "auto" takes Winograd.
_SMALL = dict(ch=160, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=32,
              using_sa=True, using_mid_sa=True, patch_nums=(1, 2, 4, 8))


def test_float32_tokenizer_on_cpu_runs_its_convs_by_winograd(monkeypatch):
  """The user's path: a float32 tokenizer with the default conv_impl on CPU calls the Winograd
  conv for every resnet and upsampling conv (the output heads, to 8 and 3 channels, stay XLA's),
  and reconstructs what the flax nn.Conv + nn.GroupNorm modules (conv_impl="xla") do, to float32
  rounding."""
  calls, winograd = [], conv_winograd.conv3x3_winograd

  def counted(x, *args):
    calls.append(x.shape)
    return winograd(x, *args)

  monkeypatch.setattr(conv_winograd, "conv3x3_winograd", counted)
  xla = VQVAE(VQVAEConfig(**_SMALL, conv_impl="xla"))
  auto = VQVAE(VQVAEConfig(**_SMALL))
  img = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  params = jax.jit(xla.init)(jax.random.PRNGKey(0), img)["params"]
  for method, inputs, count in [
      # Encoder: 2 per resnet block (2 levels + 2 mid).
      (VQVAE.encode_to_latent, img, 2 * 4),
      # Decoder: 2 per resnet block (2 levels of 2 + 2 mid), one upsample.
      (VQVAE.decode_fhat_unclamped,
       jnp.asarray(np.random.default_rng(7).standard_normal((2, 8, 8, 8)), jnp.float32), 2 * 6 + 1),
  ]:
    want = np.asarray(jax.jit(lambda p, x: xla.apply({"params": p}, x, method=method))(
        params, inputs), np.float32)
    calls.clear()
    got = np.asarray(jax.jit(lambda p, x: auto.apply({"params": p}, x, method=method))(
        params, inputs), np.float32)
    assert len(calls) == count
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
