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
from var_jax.ops import conv as conv_ops
from var_jax.ops import conv_winograd
from conv_reference import (conv_operands, numpy_conv3x3, tokenizer_through_auto_and_xla,
                            xla_conv3x3)


@pytest.mark.parametrize("B, H, W, cin, cout, upsample, max_pixels", [
    (2, 12, 10, 16, 24, False, 40),   # 4 rows per block, 3 blocks per image: interior halos
    (1, 6, 8, 8, 8, False, 10_000),   # one block: both halos the zero padding
    (1, 10, 6, 8, 12, False, 1),      # the 2-row minimum, 5 blocks
    (2, 3, 5, 8, 12, True, 40),       # upsampled to 6 x 10 first, then 3 blocks of 2 rows
])
def test_winograd_matches_the_float64_convolution(B, H, W, cin, cout, upsample, max_pixels):
  x, kernel, bias = conv_operands(0, B, H, W, cin, cout)
  got = conv_winograd.conv3x3_winograd(x, kernel, bias, upsample, max_pixels)
  a = np.asarray(x)
  if upsample:
    a = a.repeat(2, axis=1).repeat(2, axis=2)
  want = numpy_conv3x3(a, kernel, bias)
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
  x, kernel, bias = conv_operands(2, 2, 16, 16, 64, 48, jnp.bfloat16)
  got = conv_ops.conv3x3(x, kernel, bias, impl="winograd")
  assert got.dtype == jnp.bfloat16
  want = numpy_conv3x3(np.asarray(x, np.float32), np.asarray(kernel, np.float32),
                       np.asarray(bias, np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                             atol=3 * 2 ** -8 * np.abs(want).max())


@pytest.mark.parametrize("upsample", [False, True])
def test_winograd_is_differentiable_like_the_convolution(upsample):
  x, kernel, bias = conv_operands(4, 2, 8, 6, 8, 12)

  def loss(conv, x, kernel, bias):
    return jnp.sum(jnp.sin(conv(x, kernel, bias)))

  winograd = lambda x, kernel, bias: conv_ops.conv3x3(x, kernel, bias, upsample=upsample,
                                                      impl="winograd")
  got = jax.grad(loss, argnums=(1, 2, 3))(winograd, x, kernel, bias)
  want = jax.grad(loss, argnums=(1, 2, 3))(xla_conv3x3(upsample), x, kernel, bias)
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


# The released tokenizer's narrowest width (160), so that "auto" takes Winograd.
_SMALL = dict(ch=160, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, vocab_size=32,
              using_sa=True, using_mid_sa=True, patch_nums=(1, 2, 4, 8))


def test_float32_tokenizer_on_cpu_runs_its_convs_by_winograd(monkeypatch):
  """The user's path: a float32 tokenizer with the default conv_impl on CPU calls the Winograd
  conv for every resnet and upsampling conv (the output heads, to 8 and 3 channels, stay XLA's),
  and reconstructs what the flax nn.Conv + nn.GroupNorm modules (conv_impl="xla") do, to float32
  rounding."""
  # Encoder: 2 per resnet block (2 levels + 2 mid). Decoder: 2 per resnet block (2 levels of 2 +
  # 2 mid), one upsample.
  counts = {"encode_to_latent": 2 * 4, "decode_fhat_unclamped": 2 * 6 + 1}
  for method, calls, got, want in tokenizer_through_auto_and_xla(
      monkeypatch, conv_winograd, "conv3x3_winograd", _SMALL, "float32"):
    assert calls == counts[method]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
