"""Shared by the CPU convolution tests (test_conv_rows.py, test_conv_winograd.py): operands, the
references their expectations come from (a float64 numpy convolution, XLA's convolution), and
the user's paths through `ops.conv.conv3x3` (gradients) and a small tokenizer. The
implementations under test are reached only through those public calls."""
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig


def numpy_conv3x3(a_BHWC, kernel_HWIO, bias_O):
  """float64 zero-padded 3x3 convolution, NHWC x HWIO."""
  a = np.asarray(a_BHWC, np.float64)
  k = np.asarray(kernel_HWIO, np.float64)
  B, H, W, _ = a.shape
  ap = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(np.einsum("bhwc,co->bhwo", ap[:, dy:dy + H, dx:dx + W], k[dy, dx])
          for dy in range(3) for dx in range(3))
  return y + np.asarray(bias_O, np.float64)


def conv_operands(seed, B, H, W, cin, cout, dtype=jnp.float32):
  """Unit-normal images, a kernel scaled to unit-variance outputs, and a unit-normal bias."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((B, H, W, cin)), dtype)
  kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), dtype)
  bias = jnp.asarray(rng.standard_normal(cout), dtype)
  return x, kernel, bias


def xla_conv3x3(upsample: bool):
  """XLA's convolution at full precision, after a nearest x2 upsampling with `upsample`: the
  gradients' reference."""
  def conv(x, kernel, bias):
    a = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2) if upsample else x
    return jax.lax.conv_general_dilated(a, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST) + bias
  return conv


def gradients_through_impl_and_xla(impl: str, upsample: bool):
  """Gradients of sum(sin(conv)) with respect to the kernel, the bias and x (2 8 x 6 images, 8 ->
  12 channels) through `ops.conv.conv3x3(impl=impl)` and through XLA's full-precision
  convolution: [(got, want)] per argument."""
  from var_jax.ops import conv as conv_ops
  x, kernel, bias = conv_operands(4, 2, 8, 6, 8, 12)

  def loss(conv, x, kernel, bias):
    return jnp.sum(jnp.sin(conv(x, kernel, bias)))

  through_impl = lambda x, kernel, bias: conv_ops.conv3x3(x, kernel, bias, upsample=upsample,
                                                          impl=impl)
  got = jax.grad(loss, argnums=(1, 2, 3))(through_impl, x, kernel, bias)
  want = jax.grad(loss, argnums=(1, 2, 3))(xla_conv3x3(upsample), x, kernel, bias)
  return list(zip(got, want))


def tokenizer_through_auto_and_xla(monkeypatch, module, name: str, config: dict, dtype: str,
                                   image_side: int = 16):
  """The encoder and the decoder of a VQVAE(config, dtype) with the default conv_impl ("auto"),
  with `module.name` (the implementation under test) patched to record the input shape of each
  call, and of the same parameters on the precision.Conv + nn.GroupNorm modules (conv_impl="xla").
  Returns [(method name, input shapes of the calls, got, want)] for `encode_to_latent` on 2
  `image_side` px images and `decode_fhat_unclamped` on 2 latents of `image_side` / 2 (config's
  ch_mult has two levels)."""
  calls, implementation = [], getattr(module, name)

  def counted(x, *args, **kwargs):
    calls.append(x.shape)
    return implementation(x, *args, **kwargs)

  monkeypatch.setattr(module, name, counted)
  xla = VQVAE(VQVAEConfig(**config, dtype=dtype, conv_impl="xla"))
  auto = VQVAE(VQVAEConfig(**config, dtype=dtype))
  side = image_side
  img = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (2, side, side, 3)), jnp.float32)
  f_hat = jnp.asarray(np.random.default_rng(7).standard_normal(
      (2, side // 2, side // 2, config["z_channels"])), jnp.float32)
  params = jax.jit(xla.init)(jax.random.PRNGKey(0), img)["params"]
  results = []
  for method, inputs in [(VQVAE.encode_to_latent, img), (VQVAE.decode_fhat_unclamped, f_hat)]:
    want = np.asarray(jax.jit(lambda p, x: xla.apply({"params": p}, x, method=method))(
        params, inputs), np.float32)
    calls.clear()
    got = np.asarray(jax.jit(lambda p, x: auto.apply({"params": p}, x, method=method))(
        params, inputs), np.float32)
    results.append((method.__name__, list(calls), got, want))
  return results
