"""The tokenizer's 3x3 convolutions (stride 1, zero padding 1, NHWC, HWIO kernels), optionally with
silu(x * scale + shift) applied to the input per image and channel: a GroupNorm + SiLU folded into
one affine map (`group_norm_affine`), which is how every resnet block and output head of the
official tokenizer feeds its convolutions.

`impl` picks the implementation:
* "xla": `lax.conv_general_dilated` on the activated input, the reference;
* "pallas_tpu": one Pallas kernel (`kernels/tpu_conv`) that reads x once, activates it in VMEM and
  writes the output once; differentiable (its custom vjp is the XLA path's), run under shard_map
  over the active mesh's batch axes (shapes the kernel cannot hold, `tpu_conv.fits`, take XLA);
* "row_blocks": matmuls over blocks of output rows (`ops/conv_rows.py`), XLA:CPU's fast path for
  bfloat16; differentiable (its custom vjp is the XLA path's);
* "winograd": Winograd's F(4x4, 3x3) (float32, sides multiples of 4; 4x fewer multiplies) or
  F(2x2, 3x3) (2.25x fewer) over blocks of output rows (`ops/conv_winograd.py`), XLA:CPU's fast
  path for float32; even heights and widths only; differentiable (its custom vjp is the XLA
  path's);
* "auto": on TPU the kernel for up to AUTO_KERNEL_MAX_IMAGES images per device, XLA above that;
  on CPU "winograd" where both channel counts are at least AUTO_WINOGRAD_MIN_CHANNELS and the
  output's sides are even, except for bfloat16 on a CPU with AMX (`host_cpu`), where the
  bfloat16 matmuls of "row_blocks" are fast enough to win; otherwise "row_blocks" for bfloat16
  and XLA for float32; XLA on GPU (the active mesh's devices decide, else
  jax.default_backend()).
`upsample=True` puts a nearest-neighbour x2 upsampling before the conv (the decoder's Upsample),
which the kernel does in VMEM, reading x at its own size. `interpret=True` runs the kernel in
interpret mode on any backend (slow; for tests).

The models keep nn.GroupNorm + `models.precision.Conv` wherever "xla" is chosen; this module's
XLA path is the kernel's reference and vjp.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from var_jax.errors import ConfigError, InputError
from var_jax.kernels import mesh_sharding, tpu_conv
from var_jax.ops import conv_rows, conv_winograd, host_cpu
from var_jax.ops.attention import computation_platform

CONV_IMPLS = ("auto", "xla", "pallas_tpu", "row_blocks", "winograd")

# XLA's TPU cost analysis of VAR-d16's released decoder in bf16 on one v5e chip, GB for the
# kernel path / the XLA convs: 2 images 4.2 / 18.8, 4 images 6.9 / 40.5, 8 images 13.7 / 11.6,
# 16 images 26.4 / 22.5. The kernel moves its activations with the channel (lane) axis padded
# to 128 (160 -> 256), which XLA's own layouts avoid at larger batches, where it charges its
# convs far less per image. So "auto" takes the kernel up to this many images per device; only a
# profile on a TPU can say whether the cost model's charges are what the chip does.
AUTO_KERNEL_MAX_IMAGES = 4

# Float32 on CPU: Winograd where both channel counts reach this. On the 2-core Intel Xeon of the
# measurements (`benchmarks/bench_conv.py`) it beat XLA's convolution at every 3x3 conv of the
# released decoder at batch 8 (160, 320 and 640 channels; x1.2-1.7; one decode's convs x1.41),
# at batch 1 on the whole decode (x1.09; single shapes within noise either way), and lost at 128
# channels (128 x 128 x 128 -> 128, 2 images: 35 ms against XLA's 20) and at the 3-channel output
# head (52 against 7 ms), where its 16 matmuls are too narrow for their loop's fixed cost. On a
# 2-core AMD EPYC (no AMX), batch 1: one decode's convs 2524 -> 1862 ms (`bench_conv.py`).
AUTO_WINOGRAD_MIN_CHANNELS = 160
# Bfloat16 on CPU: the row blocks' 9 multiplies per output and channel pair against Winograd
# F(2x2)'s 4, whose bf16-rounded transforms cost some accuracy (the released decoder's images
# against the float32 decode: mean 1.17 / 255 for Winograd, 1.03 / 255 for the row blocks). With
# AMX the row blocks won (2-core Xeon, the decoder's convs at batch 8: 4.4 s against Winograd's
# 7.1 s); without it (2-core AMD EPYC with AVX-512 BF16) Winograd won at the wide shapes (one
# decode's convs 1610 -> 1237 ms; the public bf16 call at batch 1 4.19 -> 3.85 s, batch 8 36.97
# -> 31.28 s, `benchmarks/bench_conv.py --sample winograd --dtypes bfloat16`), so that is the
# choice there.


def _cpu_fallback(dtype) -> str:
  """The CPU path of a conv Winograd does not take under "auto" (too narrow, or odd-sized): the
  row blocks for bfloat16, XLA's convolution for float32 (None: float32)."""
  return "row_blocks" if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 else "xla"


def resolve_impl(impl: str, interpret: bool = False, *, batch: int | None = None,
                 dtype=None, channels: tuple[int, int] | None = None,
                 platform: str | None = None) -> str:
  """The implementation ("xla", "pallas_tpu", "row_blocks" or "winograd") a call with `impl` on
  `batch` images (None: any) in `dtype` (the kernel's compute dtype; None: float32) with
  `channels` = (Cin, Cout) (None: wide enough for any) uses on `platform` (None: where it is
  traced). Sizes aside: "winograd" stands for XLA, or for the row blocks in bfloat16, on odd
  sizes (`conv3x3_impl`)."""
  if impl not in CONV_IMPLS:
    raise ConfigError(f"Unknown conv impl {impl!r}; valid choices are {CONV_IMPLS}.")
  platform = platform or computation_platform()
  if impl == "auto":
    if platform == "cpu":
      fallback = _cpu_fallback(dtype)
      if fallback == "row_blocks" and host_cpu.has_amx_bf16():  # bf16 with AMX: row blocks always
        return fallback
      wide = channels is None or min(channels) >= AUTO_WINOGRAD_MIN_CHANNELS
      return "winograd" if wide else fallback
    if platform != "tpu":
      return "xla"
    per_device = None if batch is None else -(-batch // mesh_sharding.batch_shards())
    small = per_device is None or per_device <= AUTO_KERNEL_MAX_IMAGES
    return "pallas_tpu" if small else "xla"
  if impl == "pallas_tpu" and platform != "tpu" and not interpret:
    raise ConfigError(f"conv impl 'pallas_tpu' needs a TPU backend but this computation runs on "
                      f"{platform!r}; use interpret=True, or 'auto' or 'xla'.")
  return impl


def conv3x3_impl(impl: str, *, out_hw: tuple[int, int], interpret: bool = False,
                 batch: int | None = None, dtype=None, channels: tuple[int, int] | None = None,
                 platform: str | None = None) -> str:
  """The implementation `conv3x3(impl=impl)` runs for `out_hw` = (height, width) outputs (after
  any upsampling): `resolve_impl`'s, except that Winograd's even sizes are a must, so an odd-sized
  conv under "auto" falls back (`_cpu_fallback`) and one asked for "winograd" by name is refused."""
  resolved = resolve_impl(impl, interpret, batch=batch, dtype=dtype, channels=channels,
                          platform=platform)
  if resolved == "winograd" and (out_hw[0] % 2 or out_hw[1] % 2):
    if impl == "winograd":
      raise InputError(f"conv impl 'winograd' needs an even output height and width, got "
                       f"{out_hw[0]} x {out_hw[1]}; use 'auto', 'xla' or 'row_blocks'.")
    return _cpu_fallback(dtype)
  return resolved


def conv3x3_multiplies(impl: str, *, out_hw: tuple[int, int], batch: int | None = None,
                       dtype=None, channels: tuple[int, int] | None = None,
                       platform: str | None = None) -> float:
  """Multiplies per output pixel and (Cin, Cout) pair of the algorithm `conv3x3(impl=impl)` runs
  for these (`conv3x3_impl`): 9 for a direct convolution (XLA's, the TPU kernel); 9 (R + 2) / R
  for the row blocks of R rows, whose matmuls also cover each block's 2 halo rows
  (`ops/conv_rows.py`); (m + 2)^2 / m^2 for Winograd's F(m x m, 3 x 3), whose transforms (adds
  and constant scalings) are not multiplies of the matmuls and are not counted."""
  chosen = conv3x3_impl(impl, out_hw=out_hw, batch=batch, dtype=dtype, channels=channels,
                        platform=platform)
  if chosen == "winograd":
    m = conv_winograd.output_tile(*out_hw, jnp.float32 if dtype is None else dtype)
    return (m + 2) ** 2 / m ** 2
  if chosen == "row_blocks":
    rows = conv_rows.block_rows(out_hw[0])
    return 9 * (rows + 2) / rows
  return 9.0


def group_norm_affine(x_BHWC, gamma_C, beta_C, *, groups: int, eps: float):
  """(scale_BC, shift_BC), float32, with x * scale + shift == GroupNorm(x) (biased variance over
  each image's group of H * W * C / groups values, then gamma, beta per channel).

  The sums of x and x² per channel, which need no mean first, where a two-pass variance reads x
  after its mean (42 MB per norm for 2 images at 256 x 256 x 160 in bf16). XLA:CPU (jax 0.10)
  runs each sum as its own library reduction over x: 3.5 ms together for one 256 x 256 x 160
  float32 image on a 2-core AMD EPYC, against 9.8 ms as one variadic reduce of (x, x²) and 18.6 ms
  as matmuls. Each channel's sum of squares about its mean, S2 - S1² / n, loses about
  float32 eps x mean² / variance of that channel relative to its variance (1e-6 for a channel
  mean 4 standard deviations from 0); the channels then combine into their group's mean and
  variance exactly (Chan et al.'s pairwise update), so a spread between channels costs nothing.
  Centring each channel on one of its own values first would remove that term, but reading a
  pixel of x before summing it keeps XLA from fusing the sums into x's producer where it does so
  (measured: the decoder's bytes rose by a quarter)."""
  B, H, W, C = x_BHWC.shape
  if C % groups:
    raise InputError(f"GroupNorm over {C} channels needs a divisor of {C} as groups, got {groups}.")
  x_BHWC = x_BHWC.astype(jnp.float32)
  n = H * W
  s1_BC, s2_BC = x_BHWC.sum(axis=(1, 2)), jnp.square(x_BHWC).sum(axis=(1, 2))
  mean_BGc = (s1_BC / n).reshape(B, groups, C // groups)
  m2_BGc = jnp.maximum(s2_BC - jnp.square(s1_BC) / n, 0.0).reshape(B, groups, C // groups)
  mean_BG = mean_BGc.mean(axis=-1)
  m2_BG = m2_BGc.sum(axis=-1) + n * jnp.square(mean_BGc - mean_BG[..., None]).sum(axis=-1)
  var_BG = m2_BG / (n * (C // groups))
  inv_BC = jnp.repeat(jax.lax.rsqrt(var_BG + eps), C // groups, axis=1)
  scale_BC = inv_BC * gamma_C.astype(jnp.float32)
  shift_BC = beta_C.astype(jnp.float32) - jnp.repeat(mean_BG, C // groups, axis=1) * scale_BC
  return scale_BC, shift_BC


def _activated(x_BHWC, scale_BC, shift_BC, dtype):
  if scale_BC is None:
    return x_BHWC.astype(dtype)
  a = x_BHWC.astype(jnp.float32) * scale_BC[:, None, None] + shift_BC[:, None, None]
  return jax.nn.silu(a).astype(dtype)


def _xla_conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample):
  dtype = kernel_HWIO.dtype  # float32 accumulation, as models/precision.py asks of every conv
  a_BHWC = _activated(x_BHWC, scale_BC, shift_BC, dtype)
  if upsample:
    a_BHWC = jnp.repeat(jnp.repeat(a_BHWC, 2, axis=1), 2, axis=2)
  y = jax.lax.conv_general_dilated(
      a_BHWC, kernel_HWIO, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
  # The bias joins the float32 sums before the one rounding to `dtype`, as in the TPU kernel, the
  # row blocks and Winograd; this is also every blocked path's vjp, whose bias gradient then sums
  # the output gradient over (B, H, W) in float32: XLA:CPU reduces a bfloat16 array with a
  # bfloat16 accumulator (8 x 16 x 16 values of ~50: 6% off), so a bf16 bias gradient summed
  # there was 70% off at 8 images of 16 x 16 px, and worse at the tokenizer's sizes.
  return (y + bias_O.astype(jnp.float32)).astype(dtype)


# The implementations that loop over blocks of rows in plain XLA ops (ops/conv_rows.py,
# ops/conv_winograd.py).
_BLOCKED_IMPLS = ("row_blocks", "winograd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(a_BHWC, kernel_HWIO, bias_O, winograd_kernel, upsample, impl):
  if impl == "row_blocks":
    return conv_rows.conv3x3_row_blocks(a_BHWC, kernel_HWIO, bias_O, upsample)
  return conv_winograd.conv3x3_winograd(a_BHWC, kernel_HWIO, bias_O, upsample,
                                        transformed_kernel=winograd_kernel)


def _blocked_fwd(a_BHWC, kernel_HWIO, bias_O, winograd_kernel, upsample, impl):
  out = _blocked(a_BHWC, kernel_HWIO, bias_O, winograd_kernel, upsample, impl)
  return out, (a_BHWC, kernel_HWIO, bias_O, winograd_kernel)


def _xla_vjp(upsample, residuals, g_BHWO):
  """The XLA path's vjp at residuals (x, kernel, bias) or (x, kernel, bias, scale, shift): the
  blocked and kernel paths' backward (XLA drops the unused forward conv and recomputes only the
  activation)."""
  conv = lambda x, k, b, scale=None, shift=None: _xla_conv3x3(x, k, b, scale, shift, upsample)
  _, vjp = jax.vjp(conv, *residuals)
  return vjp(g_BHWO)


def _blocked_bwd(upsample, impl, residuals, g_BHWO):
  # On the activated input: its activation is differentiated outside. A transformed Winograd
  # kernel is a function of the kernel computed outside (`kernel_transform`): the gradient flows
  # through the kernel, and the transformed copy gets none.
  del impl
  *residuals, winograd_kernel = residuals
  no_gradient = None if winograd_kernel is None else jnp.zeros_like(winograd_kernel)
  return (*_xla_vjp(upsample, residuals, g_BHWO), no_gradient)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _blocked_conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample, impl,
                     winograd_kernel=None):
  a_BHWC = _activated(x_BHWC, scale_BC, shift_BC, kernel_HWIO.dtype)
  operands = [a_BHWC, kernel_HWIO, bias_O] + ([] if winograd_kernel is None else [winograd_kernel])
  per_device = lambda a, k, b, u=None: _blocked(a, k, b, u, upsample, impl)
  if a_BHWC.shape[0] % mesh_sharding.batch_shards():
    # A batch the mesh cannot split evenly: XLA partitions the loop (correct, not fast).
    return per_device(*operands)
  # Each device loops over its own images' row blocks (XLA would otherwise gather the batch to
  # index it). `interpret=True`: plain XLA ops, which a jit may also partition without a mesh.
  return mesh_sharding.shard_map_over_batch(per_device, *operands, kernel=f"{impl} conv",
                                            interpret=True,
                                            batch_dims=[0] + [None] * (len(operands) - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel_conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample, interpret):
  per_device = functools.partial(tpu_conv.conv3x3, upsample=upsample, interpret=interpret)
  operands, batch_dims = [x_BHWC, kernel_HWIO, bias_O], [0, None, None]
  if scale_BC is not None:
    operands += [scale_BC, shift_BC]
    batch_dims += [0, 0]
  return mesh_sharding.shard_map_over_batch(per_device, *operands, kernel="pallas_tpu conv",
                                            interpret=interpret, batch_dims=batch_dims)


def _kernel_fwd(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample, interpret):
  out = _kernel_conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample, interpret)
  return out, (x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC)


def _kernel_bwd(upsample, interpret, residuals, g_BHWO):
  del interpret
  return _xla_vjp(upsample, residuals, g_BHWO)


_kernel_conv3x3.defvjp(_kernel_fwd, _kernel_bwd)


def conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC=None, shift_BC=None, *, upsample: bool = False,
            impl: str = "auto", interpret: bool = False, winograd_kernel=None):
  """conv3x3(a) + bias, a = x or silu(x * scale + shift) (float32, then the kernel's dtype),
  upsampled x2 by nearest neighbour first with `upsample` (the kernel reads x at its own size).

  Args:
    x_BHWC: input images (float32 or bfloat16).
    kernel_HWIO: (3, 3, Cin, Cout) in the compute dtype; bias_O: (Cout,).
    scale_BC, shift_BC: (B, Cin) float32 affine before the SiLU, together or neither.
    impl: "auto", "xla", "pallas_tpu", "row_blocks" or "winograd" (module docstring).
    interpret: run the kernel in interpret mode (any backend; slow).
    winograd_kernel: where this runs as Winograd's F(m x m, 3 x 3), the kernel transformed before
      (`conv_winograd.kernel_transform(kernel_HWIO, dtype, m)`, m = `conv_winograd.output_tile`
      of the output's height, width and dtype), else None (transformed in the call); the other
      implementations ignore it.

  Returns:
    (B, H, W, Cout), or (B, 2H, 2W, Cout) with `upsample`, in the kernel's dtype; matmuls
    accumulate in float32.
  """
  if x_BHWC.ndim != 4 or kernel_HWIO.shape[:3] != (3, 3, x_BHWC.shape[-1]):
    raise InputError(f"conv3x3 needs (B, H, W, Cin) images and a (3, 3, Cin, Cout) kernel, got "
                     f"{x_BHWC.shape} and {kernel_HWIO.shape}.")
  if bias_O.shape != kernel_HWIO.shape[3:]:
    raise InputError(f"bias shape {bias_O.shape} != ({kernel_HWIO.shape[3]},).")
  if (scale_BC is None) != (shift_BC is None):
    raise InputError("conv3x3 takes scale_BC and shift_BC together or neither.")
  if scale_BC is not None and not (scale_BC.shape == shift_BC.shape == (x_BHWC.shape[0], x_BHWC.shape[3])):
    raise InputError(f"scale_BC and shift_BC must be (B, Cin) = {(x_BHWC.shape[0], x_BHWC.shape[3])}, "
                     f"got {scale_BC.shape} and {shift_BC.shape}.")
  B, H, W, Cin = x_BHWC.shape
  out_H, out_W = (2 * H, 2 * W) if upsample else (H, W)
  resolved = conv3x3_impl(impl, out_hw=(out_H, out_W), interpret=interpret, batch=B,
                          dtype=kernel_HWIO.dtype, channels=kernel_HWIO.shape[2:])
  if resolved in _BLOCKED_IMPLS:
    return _blocked_conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample, resolved,
                            winograd_kernel if resolved == "winograd" else None)
  if (resolved == "xla"
      or not tpu_conv.fits(out_H, out_W, Cin, kernel_HWIO.shape[3], x_BHWC.dtype,
                           kernel_HWIO.dtype, upsample=upsample)):
    return _xla_conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample)
  return _kernel_conv3x3(x_BHWC, kernel_HWIO, bias_O, scale_BC, shift_BC, upsample, interpret)
