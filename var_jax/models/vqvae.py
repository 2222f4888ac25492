"""The official VAR tokenizer (VQVAE encoder/decoder, VAR_SPEC §2) as Flax linen modules, NHWC.

Module names follow the PyTorch state dict with list indices folded in (`down.0.block.1` is
`down_0/block_1`), so conversion is a rename plus kernel transposes.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.models import precision
from var_jax.models.quant import MultiScaleQuantizer
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops import conv as conv_ops
from var_jax.ops import conv_winograd

_PAD1 = ((1, 1), (1, 1))
_NORM_EPS = 1e-6


def _conv(features: int, name: str, dtype, kernel: int = 3) -> precision.Conv:
  pad = ((kernel // 2, kernel // 2),) * 2
  return precision.Conv(features, (kernel, kernel), padding=pad, name=name, dtype=dtype)


def _norm(cfg: VQVAEConfig, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=cfg.num_groups, epsilon=_NORM_EPS, use_fast_variance=False,
                      name=name, dtype=jnp.float32)


class GroupNormParams(nn.Module):
  """nn.GroupNorm's parameters (scale, bias; same names, shapes and initialisers) without the op,
  for the fused kernel path, which applies them inside the convolution."""

  @nn.compact
  def __call__(self, channels: int):
    return (self.param("scale", nn.initializers.ones, (channels,), jnp.float32),
            self.param("bias", nn.initializers.zeros, (channels,), jnp.float32))


# The variable collection that `winograd_kernels` fills with the decoder's Winograd kernels,
# transformed once per model; placed beside the params (`with_winograd_kernels`), each conv that
# runs as Winograd reads its own there, else transforms its kernel in every call.
WINOGRAD_KERNELS = "winograd_kernels"


class Conv3x3Params(nn.Module):
  """precision.Conv's parameters for a 3x3 kernel (kernel HWIO, bias; same names, shapes and
  initialisers) without the op, and, where `winograd_tile` = m is given, the kernel transformed
  for Winograd's F(m x m, 3 x 3) in `dtype` if the params hold it (`with_winograd_kernels`; or
  while `winograd_kernels` fills them), else None."""
  features: int

  @nn.compact
  def __call__(self, in_features: int, winograd_tile: int | None = None, dtype=jnp.float32):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    transformed = None
    if winograd_tile is not None:
      name = f"F{winograd_tile}_{jnp.dtype(dtype).name}"
      if self.has_variable("params", name):  # with_winograd_kernels
        transformed = self.get_variable("params", name)
      elif self.is_mutable_collection(WINOGRAD_KERNELS) and not self.is_initializing():
        transformed = self.variable(WINOGRAD_KERNELS, name, conv_winograd.kernel_transform,
                                    kernel.astype(dtype), dtype, winograd_tile).value
    return kernel, bias, transformed


def _conv3x3_impl(cfg: VQVAEConfig, x_BHWC, dtype, cout: int, upsample: bool = False) -> str:
  """How a 3x3 conv of x (upsampled x2 first with `upsample`) to `cout` channels in `dtype` runs
  (ops.conv.conv3x3_impl, decided where the module is traced): "xla" through the flax modules,
  else through ops.conv.conv3x3."""
  B, H, W, cin = x_BHWC.shape
  out_hw = (2 * H, 2 * W) if upsample else (H, W)
  return conv_ops.conv3x3_impl(cfg.conv_impl, out_hw=out_hw, batch=B, dtype=dtype,
                               channels=(cin, cout))


def _winograd_tile(impl: str, out_hw, dtype) -> int | None:
  """m of the F(m x m, 3 x 3) a conv with `impl` runs for `out_hw` outputs in `dtype`, or None
  where it does not run as Winograd."""
  return conv_winograd.output_tile(*out_hw, dtype) if impl == "winograd" else None


def _norm_silu_conv(cfg: VQVAEConfig, x, features: int, norm_name: str, conv_name: str, dtype):
  """conv3x3(silu(group_norm(x))) with nn.GroupNorm `norm_name`'s and precision.Conv
  `conv_name`'s parameters: those modules on the XLA path, ops.conv.conv3x3 (one fused kernel on
  TPU) otherwise."""
  impl = _conv3x3_impl(cfg, x, dtype, features)
  if impl == "xla":
    return _conv(features, conv_name, dtype)(nn.silu(_norm(cfg, norm_name)(x)))
  gamma, beta = GroupNormParams(name=norm_name)(x.shape[-1])
  kernel, bias, transformed = Conv3x3Params(features, name=conv_name)(
      x.shape[-1], _winograd_tile(impl, x.shape[1:3], dtype), dtype)
  scale, shift = conv_ops.group_norm_affine(x, gamma, beta, groups=cfg.num_groups, eps=_NORM_EPS)
  return conv_ops.conv3x3(x, kernel.astype(dtype), bias.astype(dtype), scale, shift, impl=impl,
                          winograd_kernel=transformed)


class ResnetBlock(nn.Module):
  """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 shortcut when widths differ."""
  cfg: VQVAEConfig
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _norm_silu_conv(self.cfg, x, self.out_channels, "norm1", "conv1", self.dtype)
    h = _norm_silu_conv(self.cfg, h, self.out_channels, "norm2", "conv2", self.dtype)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, "nin_shortcut", self.dtype, kernel=1)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the h*w positions, logits scaled by C**-0.5."""
  cfg: VQVAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    B, H, W, C = x_BHWC.shape
    qkv = _conv(3 * C, "qkv", self.dtype, kernel=1)(_norm(self.cfg, "norm")(x_BHWC))
    qkv = qkv.reshape(B, H * W, 3, C)  # channel order is [q | k | v]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (C ** -0.5)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = precision.einsum("bqk,bkc->bqc", w, v).reshape(B, H, W, C)
    return x_BHWC + _conv(C, "proj_out", self.dtype, kernel=1)(h)


class Downsample(nn.Module):
  """Zero-pad one row at the bottom and one column at the right, then a stride-2 3x3 conv."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return precision.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                          name="conv", dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  cfg: VQVAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    impl = _conv3x3_impl(self.cfg, x, self.dtype, x.shape[-1], upsample=True)
    if impl == "xla":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      return _conv(x.shape[-1], "conv", self.dtype)(x)
    out_hw = (2 * x.shape[1], 2 * x.shape[2])
    kernel, bias, transformed = Conv3x3Params(x.shape[-1], name="conv")(
        x.shape[-1], _winograd_tile(impl, out_hw, self.dtype), self.dtype)
    return conv_ops.conv3x3(x, kernel.astype(self.dtype), bias.astype(self.dtype), upsample=True,
                            impl=impl, winograd_kernel=transformed)


class Level(nn.Module):
  """One resolution level: res blocks (each followed by attention if `with_attn`), then resampling."""
  cfg: VQVAEConfig
  out_channels: int
  num_blocks: int
  with_attn: bool
  resample: str | None  # "down", "up" or None.
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    for i in range(self.num_blocks):
      h = ResnetBlock(self.cfg, self.out_channels, self.dtype, name=f"block_{i}")(h)
      if self.with_attn:
        h = AttnBlock(self.cfg, self.dtype, name=f"attn_{i}")(h)
    if self.resample == "down":
      h = Downsample(self.dtype, name="downsample")(h)
    elif self.resample == "up":
      h = Upsample(self.cfg, self.dtype, name="upsample")(h)
    return h


class Mid(nn.Module):
  cfg: VQVAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    c = h.shape[-1]
    h = ResnetBlock(self.cfg, c, self.dtype, name="block_1")(h)
    if self.cfg.using_mid_sa:
      h = AttnBlock(self.cfg, self.dtype, name="attn_1")(h)
    return ResnetBlock(self.cfg, c, self.dtype, name="block_2")(h)


class Encoder(nn.Module):
  """Image (B, H, W, 3) in [-1, 1] -> latent (B, H/16, W/16, z_channels)."""
  cfg: VQVAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    n = len(cfg.ch_mult)
    h = _conv(cfg.ch, "conv_in", self.dtype)(x.astype(self.dtype))
    for i, mult in enumerate(cfg.ch_mult):
      last = i == n - 1
      h = Level(cfg, cfg.ch * mult, cfg.num_res_blocks, with_attn=last and cfg.using_sa,
                resample=None if last else "down", dtype=self.dtype, name=f"down_{i}")(h)
    h = Mid(cfg, self.dtype, name="mid")(h)
    return _norm_silu_conv(cfg, h, cfg.z_channels, "norm_out", "conv_out", self.dtype)


class Decoder(nn.Module):
  """Latent (B, h, w, z_channels) -> image (B, 16h, 16w, 3), not clamped."""
  cfg: VQVAEConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.cfg
    n = len(cfg.ch_mult)
    h = _conv(cfg.ch * cfg.ch_mult[-1], "conv_in", self.dtype)(z.astype(self.dtype))
    h = Mid(cfg, self.dtype, name="mid")(h)
    for i in reversed(range(n)):  # Lowest resolution first; up_0 is the full-resolution level.
      h = Level(cfg, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1,
                with_attn=(i == n - 1) and cfg.using_sa, resample="up" if i else None,
                dtype=self.dtype, name=f"up_{i}")(h)
    h = _norm_silu_conv(cfg, h, cfg.in_channels, "norm_out", "conv_out", self.dtype)
    return h.astype(jnp.float32)


class VQVAE(nn.Module):
  """Encoder + quant_conv + multi-scale quantizer + post_quant_conv + decoder.

  Use the methods with `apply(..., method=...)`:
    encode(img) -> list of (B, pn, pn) int32 token maps;
    decode(idx_maps) -> image in [-1, 1];
    decode_fhat(f_hat) -> image in [-1, 1];
    indices_to_var_input(idx_maps) -> (B, L - pn_0**2, Cvae);
    next_autoregressive_input(si, f_hat, h) -> (f_hat, next map);
    __call__(img) -> (unclamped reconstruction, vq_loss, hits_SV) for tokenizer training.
  """
  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg, dtype)
    self.decoder = Decoder(cfg, dtype)
    self.quant_conv = _conv(cfg.z_channels, "quant_conv", dtype, kernel=cfg.quant_conv_ks)
    self.post_quant_conv = _conv(cfg.z_channels, "post_quant_conv", dtype, kernel=cfg.quant_conv_ks)
    self.quantize = MultiScaleQuantizer(cfg)

  def encode_to_latent(self, img_BHWC: jax.Array) -> jax.Array:
    """The continuous map f that gets quantized, float32."""
    return self.quant_conv(self.encoder(img_BHWC)).astype(jnp.float32)

  def encode(self, img_BHWC: jax.Array) -> list[jax.Array]:
    return self.quantize.encode(self.encode_to_latent(img_BHWC))

  def encode_fhats(self, img_BHWC: jax.Array) -> list[jax.Array]:
    """Cumulative f_hat after each scale (the official `f_to_idxBl_or_fhat(to_fhat=True)`)."""
    return self.quantize.quantize(self.encode_to_latent(img_BHWC))[1]

  def decode_fhat_unclamped(self, f_hat_BhwC: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(f_hat_BhwC.astype(jnp.dtype(self.config.dtype))))

  def decode_fhat(self, f_hat_BhwC: jax.Array) -> jax.Array:
    return jnp.clip(self.decode_fhat_unclamped(f_hat_BhwC), -1.0, 1.0)

  def indices_to_fhat(self, idx_maps: Sequence[jax.Array]) -> jax.Array:
    return self.quantize.indices_to_fhat(idx_maps, last_only=True)

  def decode(self, idx_maps: Sequence[jax.Array]) -> jax.Array:
    return self.decode_fhat(self.quantize.indices_to_fhat(idx_maps, last_only=True))

  def indices_to_var_input(self, idx_maps: Sequence[jax.Array]) -> jax.Array:
    return self.quantize.indices_to_var_input(idx_maps)

  def next_autoregressive_input(self, si: int, f_hat: jax.Array, h_BpnpnC: jax.Array):
    return self.quantize.next_autoregressive_input(si, f_hat, h_BpnpnC)

  def lookup(self, idx_Bhw: jax.Array) -> jax.Array:
    """Codebook vectors (B, h, w, Cvae) of a token map."""
    return self.quantize.lookup(idx_Bhw)

  def codebook(self) -> jax.Array:
    return self.quantize.codebook()

  def __call__(self, img_BHWC: jax.Array):
    f = self.encode_to_latent(img_BHWC)
    f_hat, vq_loss, hits_SV = self.quantize(f)
    return self.decode_fhat_unclamped(f_hat), vq_loss, hits_SV


@functools.partial(jax.jit, static_argnums=0)
def winograd_kernels(config: VQVAEConfig, params):
  """The WINOGRAD_KERNELS of the decoder's convs that run as Winograd here: each conv's kernel
  transformed for its F(m x m, 3 x 3) in its dtype (`ops.conv_winograd.kernel_transform`), laid
  out like `params`; empty where none does (off CPU). The decoder is traced for one image at the
  last scale's latent size, as a sampler's CPU decode runs it; only the transforms are computed
  (the decode's outputs are unused); jitted, so traced once per config and param layout. With
  `with_winograd_kernels` a sampling program (`Placement.decoding_vae_params`) reads them
  instead of transforming every kernel in every call (a float32 VAR-d16 call at batch 1 on a
  2-core CPU 5.76 -> 5.22 s, `benchmarks/bench_conv.py --kernel-transform`). `Tokenizer.decode`
  keeps transforming in the call: held beside its params they made one image's decode only 4%
  faster (1.44 -> 1.39 s; 4 images within noise) for ~560 MB kept for the tokenizer's life."""
  pn = config.patch_nums[-1]
  f_hat = jnp.zeros((1, pn, pn, config.z_channels), jnp.float32)
  _, variables = VQVAE(config).apply({"params": params}, f_hat, method=VQVAE.decode_fhat,
                                     mutable=[WINOGRAD_KERNELS])
  return variables.get(WINOGRAD_KERNELS, {})


def with_winograd_kernels(params, kernels):
  """`params` with `winograd_kernels`' entries beside each conv's kernel and bias (where the
  Winograd convs look for them first). Inference only: they are the kernels' function, not
  parameters of their own (nothing trains them)."""
  merged = dict(params)
  for name, entry in kernels.items():
    merged[name] = with_winograd_kernels(params[name], entry) if name in params else entry
  return merged


def init_params(config: VQVAEConfig, key: jax.Array):
  """Fresh VQVAE params for `config` (the official init). Under `jax.jit` it computes them as one
  program (op by op it compiles a few hundred small ones); under `jax.eval_shape` it gives their
  shapes, the target a loaded checkpoint is checked against."""
  size = config.image_size
  return VQVAE(config).init(key, jnp.zeros((1, size, size, config.in_channels)))["params"]


def param_shapes(config: VQVAEConfig):
  """`init_params(config, key)` as ShapeDtypeStructs (nothing is computed): the target a loaded
  checkpoint is checked against."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
