"""The tokenizer's fused GroupNorm-SiLU-3x3-conv (ops/conv.py, kernels/tpu_conv.py).

The kernel runs in interpret mode here; its expectations come from `lax.conv_general_dilated`
on an activation computed with numpy, and from the models' nn.GroupNorm / precision.Conv modules
(the XLA path of the tokenizer), never from the kernel's helpers. Its TPU lowering is compiled in
tests/test_aot_sampling.py through the public sampler.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.errors import ConfigError, InputError
from var_jax.kernels import tpu_conv
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops import conv as conv_ops
from var_jax.ops import host_cpu
from conv_reference import xla_conv3x3


def _reference(x, kernel, bias, scale=None, shift=None):
  """float64 numpy activation, then a float32 HIGHEST-precision XLA conv of it."""
  a = np.asarray(x, np.float64)
  if scale is not None:
    a = a * np.asarray(scale, np.float64)[:, None, None] + np.asarray(shift, np.float64)[:, None, None]
    a = a / (1.0 + np.exp(-a))
  y = jax.lax.conv_general_dilated(
      jnp.asarray(a, jnp.float32), jnp.asarray(kernel, jnp.float32), (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  return np.asarray(y) + np.asarray(bias, np.float32)


def _operands(rng, B, H, W, cin, cout, prologue, dtype=np.float32):
  x = rng.standard_normal((B, H, W, cin)).astype(dtype)
  kernel = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(dtype)
  bias = rng.standard_normal(cout).astype(dtype)
  scale = rng.standard_normal((B, cin)).astype(np.float32) if prologue else None
  shift = rng.standard_normal((B, cin)).astype(np.float32) if prologue else None
  return x, kernel, bias, scale, shift


@pytest.mark.parametrize("B, H, W, cin, cout, prologue, rows", [
    (2, 16, 16, 32, 48, True, None),   # one block of rows: both halos are the zero padding
    (2, 16, 16, 32, 48, True, 4),      # 4 row blocks: interior halos are real rows
    (1, 24, 16, 16, 16, False, 1),     # one row per step: every output row needs both halos
    (1, 8, 8, 640, 640, True, None),   # output channels split into 128-wide blocks
])
def test_kernel_matches_the_convolution_of_the_activation(B, H, W, cin, cout, prologue, rows):
  rng = np.random.default_rng(0)
  x, kernel, bias, scale, shift = _operands(rng, B, H, W, cin, cout, prologue)
  if cout == 640:
    assert tpu_conv.plan_blocks(H, W, cin, cout, jnp.float32, jnp.float32)[2] < cout
  got = tpu_conv.conv3x3(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias),
                         None if scale is None else jnp.asarray(scale),
                         None if shift is None else jnp.asarray(shift), rows=rows, interpret=True)
  want = _reference(x, kernel, bias, scale, shift)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype, prologue, rows", [
    (np.float32, False, None),  # one block: the halos are the zero padding
    (np.float32, True, 4),      # 4 blocks of 4 output rows from 2 input rows each
    (np.float32, False, 2),     # every block needs both halo rows of the input
])
def test_kernel_upsamples_like_repeat_then_convolution(dtype, prologue, rows):
  rng = np.random.default_rng(7)
  x, kernel, bias, scale, shift = _operands(rng, 2, 8, 8, 32, 48, prologue, dtype)
  got = tpu_conv.conv3x3(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias),
                         None if scale is None else jnp.asarray(scale),
                         None if shift is None else jnp.asarray(shift), upsample=True, rows=rows,
                         interpret=True)
  a = np.asarray(x, np.float64)
  if prologue:
    a = a * scale[:, None, None] + shift[:, None, None]
    a = a / (1.0 + np.exp(-a))
  want = _reference(a.repeat(2, axis=1).repeat(2, axis=2), kernel, bias)
  assert got.shape == (2, 16, 16, 48)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  with pytest.raises(InputError, match="even when upsampling"):
    tpu_conv.conv3x3(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), upsample=True,
                     rows=1, interpret=True)


def test_kernel_in_bfloat16_accumulates_in_float32():
  rng = np.random.default_rng(1)
  x, kernel, bias, scale, shift = _operands(rng, 2, 16, 16, 64, 64, True)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  got = tpu_conv.conv3x3(bf(x), bf(kernel), bf(bias), jnp.asarray(scale), jnp.asarray(shift),
                         rows=4, interpret=True)
  assert got.dtype == jnp.bfloat16
  # The activation rounded to bfloat16 as the kernel does, then an exact float32 conv of it.
  a = np.asarray(bf(x), np.float32) * scale[:, None, None] + shift[:, None, None]
  a = np.asarray(bf(a / (1 + np.exp(-a))), np.float32)
  want = _reference(a, np.asarray(bf(kernel), np.float32), np.asarray(bf(bias), np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


def test_group_norm_affine_is_flax_group_norm():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 64)) * 3 + 1, jnp.float32)
  gamma = jnp.asarray(rng.standard_normal(64), jnp.float32)
  beta = jnp.asarray(rng.standard_normal(64), jnp.float32)
  norm = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
  want = norm.apply({"params": {"scale": gamma, "bias": beta}}, x)
  scale, shift = conv_ops.group_norm_affine(x, gamma, beta, groups=32, eps=1e-6)
  np.testing.assert_allclose(np.asarray(x * scale[:, None, None] + shift[:, None, None]),
                             np.asarray(want), rtol=1e-5, atol=1e-5)


def test_group_norm_affine_against_float64_with_offset_channels():
  """Channel means up to 4 standard deviations from 0 and spread between the channels of a group:
  the one-pass sums lose nothing visible against a float64 two-pass GroupNorm."""
  rng = np.random.default_rng(6)
  offsets = rng.uniform(-4, 4, 64) * 2.5
  x = rng.standard_normal((2, 32, 32, 64)) * 2.5 + offsets
  gamma, beta = rng.standard_normal(64), rng.standard_normal(64)
  g = x.reshape(2, 32, 32, 16, 4)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * gamma + beta
  scale, shift = conv_ops.group_norm_affine(jnp.asarray(x, jnp.float32), jnp.asarray(gamma, jnp.float32),
                                            jnp.asarray(beta, jnp.float32), groups=16, eps=1e-6)
  got = np.asarray(x, np.float32) * np.asarray(scale)[:, None, None] + np.asarray(shift)[:, None, None]
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("prologue", [True, False])  # without: the upsampling conv
def test_kernel_path_is_differentiable_like_the_convolution(prologue):
  rng = np.random.default_rng(3)
  x, kernel, bias, scale, shift = _operands(rng, 2, 8, 8, 16, 16, True)
  x, kernel, bias, scale, shift = map(jnp.asarray, (x, kernel, bias, scale, shift))
  if not prologue:  # no activation: scale 1 and shift 0 feed the reference only
    scale, shift = jnp.ones_like(scale), jnp.zeros_like(shift)

  def loss(*args):
    extra = args[3:] if prologue else ()
    y = conv_ops.conv3x3(*args[:3], *extra, upsample=not prologue, impl="pallas_tpu",
                         interpret=True)
    return jnp.sum(jnp.sin(y))

  args = (x, kernel, bias, scale, shift)
  got = jax.grad(loss, argnums=range(5 if prologue else 3))(*args)

  def reference_loss(x, kernel, bias, scale, shift):
    a = x * scale[:, None, None] + shift[:, None, None]
    a = jax.nn.silu(a) if prologue else a
    return jnp.sum(jnp.sin(xla_conv3x3(upsample=not prologue)(a, kernel, bias)))

  want = jax.grad(reference_loss, argnums=range(5))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "row_blocks", "winograd"])
def test_bfloat16_gradients_sum_in_float32(impl):
  """bf16 conv (GroupNorm-SiLU prologue, 8 images upsampled to 16 x 16): the gradients of every
  input against float32 autodiff of the same bf16-rounded operands. The bias gradient sums the
  output gradient over 2048 positions, which XLA:CPU's bfloat16 reduction got 70% wrong."""
  rng = np.random.default_rng(11)
  x, kernel, bias, scale, shift = _operands(rng, 8, 8, 8, 16, 16, True)
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  x, kernel, bias = bf16(x), bf16(kernel / 4), bf16(bias * 20)
  scale, shift = jnp.asarray(scale), jnp.asarray(shift)

  def loss(conv):
    return lambda x, k, b, sc, sh: jnp.sum(jnp.square(conv(x, k, b, sc, sh).astype(jnp.float32)))

  through = lambda x, k, b, sc, sh: conv_ops.conv3x3(x, k, b, sc, sh, upsample=True, impl=impl)
  got = jax.grad(loss(through), argnums=range(5))(x, kernel, bias, scale, shift)

  def reference(x, k, b, sc, sh):
    return xla_conv3x3(upsample=True)(jax.nn.silu(x * sc[:, None, None] + sh[:, None, None]), k, b)

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  want = jax.grad(loss(reference), argnums=range(5))(f32(x), f32(kernel), f32(bias), scale, shift)
  for name, g, w in zip(("x", "kernel", "bias", "scale", "shift"), got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w)
    assert np.abs(g - w).max() <= 0.03 * np.abs(w).max(), name


def test_conv_rejects_bad_inputs():
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(InputError, match="3, 3, Cin, Cout"):
    conv_ops.conv3x3(x, jnp.zeros((3, 3, 5, 4)), jnp.zeros(4), impl="xla")
  with pytest.raises(InputError, match="bias shape"):
    conv_ops.conv3x3(x, jnp.zeros((3, 3, 4, 4)), jnp.zeros(3), impl="xla")
  with pytest.raises(InputError, match="together or neither"):
    conv_ops.conv3x3(x, jnp.zeros((3, 3, 4, 4)), jnp.zeros(4), jnp.zeros((1, 4)), impl="xla")
  with pytest.raises(InputError, match=r"\(B, Cin\)"):
    conv_ops.conv3x3(x, jnp.zeros((3, 3, 4, 4)), jnp.zeros(4), jnp.zeros((2, 4)), jnp.zeros((2, 4)),
                     impl="xla")
  with pytest.raises(ConfigError, match="needs a TPU backend"):
    conv_ops.conv3x3(x, jnp.zeros((3, 3, 4, 4)), jnp.zeros(4), impl="pallas_tpu")
  with pytest.raises(ConfigError, match="valid choices"):
    conv_ops.conv3x3(x, jnp.zeros((3, 3, 4, 4)), jnp.zeros(4), impl="cudnn")
  with pytest.raises(InputError, match="positive divisor"):
    tpu_conv.conv3x3(x, jnp.zeros((3, 3, 4, 4)), jnp.zeros(4), rows=3, interpret=True)
  with pytest.raises(ConfigError, match="conv_impl"):
    VQVAEConfig(conv_impl="cudnn")


def test_kernel_plan_refuses_what_it_cannot_hold():
  assert tpu_conv.fits(256, 256, 160, 160, jnp.bfloat16, jnp.bfloat16)
  # A row width that is not a whole number of sublane tiles, and weights too large to hold.
  assert not tpu_conv.fits(24, 24, 32, 32, jnp.bfloat16, jnp.bfloat16)
  assert tpu_conv.fits(24, 24, 32, 32, jnp.float32, jnp.float32)
  assert not tpu_conv.fits(16, 16, 2048, 2048, jnp.bfloat16, jnp.bfloat16)
  # Those shapes take the XLA convolution on the kernel path instead of failing to lower.
  x = jnp.ones((1, 24, 24, 32), jnp.bfloat16)
  k = jnp.full((3, 3, 32, 32), 0.01, jnp.bfloat16)
  want = conv_ops.conv3x3(x, k, jnp.zeros(32, jnp.bfloat16), impl="xla")
  got = conv_ops.conv3x3(x, k, jnp.zeros(32, jnp.bfloat16), impl="pallas_tpu", interpret=True)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_auto_is_xla_on_gpu_and_a_blocked_matmul_path_on_cpu(monkeypatch):
  assert conv_ops.resolve_impl("auto") == "winograd"  # float32 on this CPU
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: True)
  assert conv_ops.resolve_impl("auto", batch=1, dtype=jnp.bfloat16) == "row_blocks"
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: False)
  assert conv_ops.resolve_impl("auto", batch=1, dtype=jnp.bfloat16) == "winograd"
  monkeypatch.setattr(conv_ops, "computation_platform", lambda: "gpu")
  assert conv_ops.resolve_impl("auto") == "xla"
  assert conv_ops.resolve_impl("auto", batch=1, dtype=jnp.bfloat16) == "xla"


def test_auto_takes_the_kernel_on_tpu_for_few_images_per_chip(monkeypatch):
  monkeypatch.setattr(conv_ops, "computation_platform", lambda: "tpu")
  limit = conv_ops.AUTO_KERNEL_MAX_IMAGES
  with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))):
    assert conv_ops.resolve_impl("auto", batch=2 * limit) == "pallas_tpu"
    assert conv_ops.resolve_impl("auto", batch=2 * limit + 1) == "xla"  # limit + 1 on a chip
    assert conv_ops.resolve_impl("pallas_tpu", batch=64) == "pallas_tpu"  # asked for by name
  with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2),
                                      ("data", "tensor"))):
    assert conv_ops.resolve_impl("auto", batch=limit) == "pallas_tpu"  # tensor is no batch axis
    assert conv_ops.resolve_impl("auto", batch=limit + 1) == "xla"


_SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
              using_sa=True, using_mid_sa=True)


@pytest.fixture
def kernel_as_on_tpu(monkeypatch):
  """The tokenizer traced as on a one-chip TPU (platform "tpu", a one-device mesh), its kernels
  run in interpret mode."""
  kernel, calls = tpu_conv.conv3x3, []

  def interpreted(*args, interpret=False, **kwargs):
    calls.append(args[0].shape)
    return kernel(*args, interpret=True, **kwargs)

  monkeypatch.setattr(conv_ops, "computation_platform", lambda: "tpu")
  monkeypatch.setattr(tpu_conv, "conv3x3", interpreted)
  with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))):
    yield calls


# float32: 16 px, every level (16 and 8 wide) whole sublane tiles; bfloat16 (16-row tiles) at
# 32 px. Interpret mode makes both ~30-60 s on 2 cores: run by hand (pytest -m slow); CI covers
# the kernel's numerics per call above and its count in the TPU programs (test_aot_*).
@pytest.mark.slow
@pytest.mark.parametrize("dtype, size", [("float32", 16), ("bfloat16", 32)])
def test_tokenizer_on_the_kernel_path_matches_the_flax_modules(kernel_as_on_tpu, dtype, size):
  """Same parameter tree (names, shapes) and, within rounding, the same reconstructions as the
  nn.GroupNorm + precision.Conv path, for the encoder and the decoder."""
  patch_nums = tuple(2 ** i for i in range(size.bit_length() - 1))  # up to size / 2
  xla = VQVAE(VQVAEConfig(**_SMALL, patch_nums=patch_nums, dtype=dtype, conv_impl="xla"))
  fused = VQVAE(VQVAEConfig(**_SMALL, patch_nums=patch_nums, dtype=dtype, conv_impl="auto"))
  img = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, size, size, 3)), jnp.float32)
  params = xla.init(jax.random.PRNGKey(0), img)["params"]
  fused_params = fused.init(jax.random.PRNGKey(0), img)["params"]
  shapes = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)
  assert shapes(fused_params) == shapes(params)
  for a, b in zip(jax.tree.leaves(fused_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)  # same initialisers, same keys

  want_f = xla.apply({"params": params}, img, method=VQVAE.encode_to_latent)
  kernel_as_on_tpu.clear()
  got_f = fused.apply({"params": params}, img, method=VQVAE.encode_to_latent)
  # Encoder: 2 per resnet block (2 levels + 2 mid) and its output head; conv_in (3 channels in)
  # and the stride-2 downsample stay XLA convs.
  assert len(kernel_as_on_tpu) == 2 * 4 + 1
  f_hat = jnp.asarray(np.random.default_rng(5).standard_normal((2, size // 2, size // 2, 8)),
                      jnp.float32)
  want = xla.apply({"params": params}, f_hat, method=VQVAE.decode_fhat_unclamped)
  kernel_as_on_tpu.clear()
  got = fused.apply({"params": params}, f_hat, method=VQVAE.decode_fhat_unclamped)
  # Decoder: 2 per resnet block (2 levels of 2 + 2 mid), one upsample, the output head.
  assert len(kernel_as_on_tpu) == 2 * 6 + 1 + 1
  tol = 2e-5 if dtype == "float32" else 5e-2
  scale = lambda a: float(np.abs(np.asarray(a, np.float32)).max())
  np.testing.assert_allclose(np.asarray(got_f, np.float32), np.asarray(want_f, np.float32),
                             rtol=tol, atol=tol * scale(want_f))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol * scale(want))
