"""The 3x3 convolution as matmuls over row blocks (ops/conv_rows.py), XLA:CPU's bfloat16 path.

Expectations come from a float64 numpy convolution (nine shifted einsums) and from XLA's
convolution, never from the module's helpers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.ops import conv as conv_ops
from var_jax.ops import conv_rows, conv_winograd, host_cpu
from conv_reference import (conv_operands, gradients_through_impl_and_xla, numpy_conv3x3,
                            tokenizer_through_auto_and_xla)


def _silu_affine(x, scale, shift):
  a = np.asarray(x, np.float64) * scale[:, None, None] + shift[:, None, None]
  return a / (1.0 + np.exp(-a))


@pytest.mark.parametrize("B, H, W, cin, cout, upsample, max_rows", [
    (2, 12, 10, 16, 24, False, 4),   # 3 blocks per image: interior halo rows are real rows
    (1, 7, 9, 8, 8, False, 32),      # a prime height: one block, both halos the zero padding
    (1, 10, 6, 8, 12, False, 1),     # one row per block
    (2, 6, 5, 8, 12, True, 4),       # upsampled to 12 x 10 first, then 3 blocks per image
])
def test_row_blocks_match_the_float64_convolution(B, H, W, cin, cout, upsample, max_rows):
  x, kernel, bias = conv_operands(0, B, H, W, cin, cout)
  got = conv_rows.conv3x3_row_blocks(x, kernel, bias, upsample, max_rows)
  a = np.asarray(x)
  if upsample:
    a = a.repeat(2, axis=1).repeat(2, axis=2)
  want = numpy_conv3x3(a, kernel, bias)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_row_blocks_in_bfloat16_sum_every_tap_in_float32():
  """bf16 operands: the only rounding is the output's, once (a bf16 sum of the three vertical
  taps' partial results would be off by several bf16 steps on this data)."""
  x, kernel, bias = conv_operands(1, 2, 16, 16, 64, 48, jnp.bfloat16)
  got = conv_rows.conv3x3_row_blocks(x, kernel, bias, False, 8)
  assert got.dtype == jnp.bfloat16
  want = numpy_conv3x3(np.asarray(x, np.float32), np.asarray(kernel, np.float32),
                       np.asarray(bias, np.float32))
  # Round-to-nearest bf16 is within half a step (2^-8 relative) of the exact value; the float32
  # sums add ~1e-6.
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8 + 1e-5, atol=1e-6)


def test_conv3x3_row_blocks_path_with_the_norm_prologue():
  """ops.conv.conv3x3(impl="row_blocks") with the GroupNorm-SiLU affine, bf16 like the models."""
  x, kernel, bias = conv_operands(2, 2, 8, 8, 32, 32, jnp.bfloat16)
  rng = np.random.default_rng(3)
  scale = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
  shift = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
  got = conv_ops.conv3x3(x, kernel, bias, scale, shift, impl="row_blocks")
  # The activation rounded to bfloat16 (the conv's operand dtype), then an exact convolution.
  a = np.asarray(jnp.asarray(_silu_affine(np.asarray(x, np.float32), np.asarray(scale),
                                          np.asarray(shift)), jnp.bfloat16), np.float32)
  want = numpy_conv3x3(a, np.asarray(kernel, np.float32), np.asarray(bias, np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8 + 1e-5, atol=1e-5)


@pytest.mark.parametrize("upsample", [False, True])
def test_row_blocks_are_differentiable_like_the_convolution(upsample):
  for g, w in gradients_through_impl_and_xla("row_blocks", upsample):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_block_rows_is_the_largest_divisor_up_to_the_limit():
  assert [conv_rows.block_rows(h) for h in (256, 128, 16, 7, 48, 96)] == [32, 32, 16, 7, 24, 32]
  assert conv_rows.block_rows(12, max_rows=5) == 4


def test_auto_takes_row_blocks_for_bfloat16_on_amx_cpus_only(monkeypatch):
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: True)
  assert conv_ops.resolve_impl("auto", batch=8, dtype=jnp.bfloat16) == "row_blocks"
  assert conv_ops.resolve_impl("auto", dtype=jnp.bfloat16, channels=(640, 640)) == "row_blocks"
  assert conv_ops.resolve_impl("auto", batch=8, dtype=jnp.float32) == "winograd"
  assert conv_ops.resolve_impl("auto", batch=8) == "winograd"  # no dtype: float32
  assert conv_ops.resolve_impl("row_blocks", dtype=jnp.float32) == "row_blocks"  # by name
  for platform in ("gpu", "cuda"):
    monkeypatch.setattr(conv_ops, "computation_platform", lambda: platform)
    assert conv_ops.resolve_impl("auto", batch=8, dtype=jnp.bfloat16) == "xla"
  monkeypatch.setattr(conv_ops, "computation_platform", lambda: "tpu")
  assert conv_ops.resolve_impl("auto", batch=64, dtype=jnp.bfloat16) == "xla"


def test_auto_takes_winograd_for_wide_bfloat16_convs_on_cpus_without_amx(monkeypatch):
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: False)
  wide = conv_ops.AUTO_WINOGRAD_MIN_CHANNELS
  assert conv_ops.resolve_impl("auto", batch=8, dtype=jnp.bfloat16) == "winograd"
  assert conv_ops.resolve_impl("auto", dtype=jnp.bfloat16, channels=(wide, wide)) == "winograd"
  # Narrow convs (the 3-channel output head) keep the row blocks, not XLA's bf16 convolution.
  assert conv_ops.resolve_impl("auto", dtype=jnp.bfloat16, channels=(wide, 3)) == "row_blocks"
  narrow = (wide - 1, wide)
  assert conv_ops.resolve_impl("auto", dtype=jnp.bfloat16, channels=narrow) == "row_blocks"
  assert conv_ops.resolve_impl("auto", dtype=jnp.float32, channels=(wide, 3)) == "xla"
  # An odd height, which Winograd's tiles cannot cover, takes the row blocks (exactly their result).
  x, kernel, bias = conv_operands(8, 1, 7, 6, wide, wide, jnp.bfloat16)
  got = conv_ops.conv3x3(x, kernel, bias, impl="auto")
  want = conv_ops.conv3x3(x, kernel, bias, impl="row_blocks")
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("batch", [8, 3])  # split over the 8 devices, and a batch they cannot split
def test_row_blocks_under_a_mesh(batch):
  x, kernel, bias = conv_operands(5, batch, 8, 8, 8, 8, jnp.bfloat16)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data") if batch % 8 == 0 else jax.P()))
    got = jax.jit(lambda x, k, b: conv_ops.conv3x3(x, k, b, impl="row_blocks"))(xs, kernel, bias)
  want = numpy_conv3x3(np.asarray(x, np.float32), np.asarray(kernel, np.float32),
                       np.asarray(bias, np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8 + 1e-5, atol=1e-5)


_SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
              using_sa=True, using_mid_sa=True, patch_nums=(1, 2, 4, 8))


@pytest.mark.parametrize("amx", [True, False])
def test_bfloat16_tokenizer_on_cpu_runs_its_convs_as_row_blocks(monkeypatch, amx):
  """The user's path: a bf16 tokenizer (of convs narrower than Winograd's minimum) with the
  default conv_impl on CPU, with or without AMX, calls the row-block conv for every resnet,
  upsampling and output-head conv, and reconstructs what the precision.Conv modules
  (conv_impl="xla") do, to bf16 rounding."""
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: amx)
  # Encoder: 2 per resnet block (2 levels + 2 mid) and the output head. Decoder: 2 per resnet
  # block (2 levels of 2 + 2 mid), one upsample, the output head.
  counts = {"encode_to_latent": 2 * 4 + 1, "decode_fhat_unclamped": 2 * 6 + 2}
  for method, calls, got, want in tokenizer_through_auto_and_xla(
      monkeypatch, conv_rows, "conv3x3_row_blocks", _SMALL, "bfloat16"):
    assert len(calls) == counts[method]
    # Two bf16 paths that round differently (the norm's one-pass statistics, the summation order)
    # through several layers: within a few bf16 steps of the output's scale.
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * np.abs(want).max())


# The released tokenizer's narrowest width (160), so that "auto" takes Winograd where it may.
_WIDE = dict(_SMALL, ch=160, ch_mult=(1, 1))


def test_bfloat16_tokenizer_on_a_cpu_without_amx_runs_its_wide_convs_by_winograd(monkeypatch):
  """The user's path on a CPU without AMX: a bf16 tokenizer of 160 channels with the default
  conv_impl calls the Winograd conv for every resnet and upsampling conv (the input conv from 3
  channels and the output heads to 8 and 3 take the row blocks), and reconstructs what the flax
  modules do to a few bf16 steps (Winograd rounds its transforms to bf16 too)."""
  monkeypatch.setattr(host_cpu, "has_amx_bf16", lambda: False)
  counts = {"encode_to_latent": 2 * 4, "decode_fhat_unclamped": 2 * 6 + 1}
  for method, calls, got, want in tokenizer_through_auto_and_xla(
      monkeypatch, conv_winograd, "conv3x3_winograd", _WIDE, "bfloat16"):
    assert len(calls) == counts[method]
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-2 * np.abs(want).max())
