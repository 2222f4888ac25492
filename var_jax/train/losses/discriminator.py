"""PatchGAN discriminator (the pix2pix / taming-transformers `NLayerDiscriminator`), NHWC.

Every output logit judges one overlapping patch of the input (70x70 pixels for n_layers = 3):

  conv4x4/2 (ndf)                          + LeakyReLU(0.2)
  conv4x4/2 (ndf * min(2**n, 8))    + norm + LeakyReLU(0.2)    for n = 1 .. n_layers - 1
  conv4x4/1 (ndf * min(2**n_layers, 8)) + norm + LeakyReLU(0.2)
  conv4x4/1 (1)                                                 -> logits

All convolutions pad by 1 and are initialised from N(0, 0.02), biases from 0.

Normalisation: taming uses BatchNorm. Here the choice is GroupNorm (default) or none. BatchNorm
keeps running statistics as mutable state that must be threaded through every apply, averaged
across devices for consistent results under pjit/shard_map, and its training-mode statistics mix
real and fake images when a step feeds both through in one batch; GroupNorm normalises each
example on its own, so the discriminator is a pure function of (params, images). As in taming,
normalised convolutions have no bias (the norm's own offset replaces it).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.errors import ConfigError, InputError
from var_jax.models import precision

NORMS: tuple[str, ...] = ("group", "none")
_INIT = nn.initializers.normal(stddev=0.02)
_PAD = ((1, 1), (1, 1))


def discriminator_widths(ndf: int, n_layers: int) -> list[int]:
  """Output channels of the n_layers + 1 hidden convolutions (the final 1-channel one excluded)."""
  return [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]


def output_side(side: int, n_layers: int) -> int:
  """Logit-map side for an input side: each stride-2 4x4 conv halves (floor), each stride-1 one
  removes a pixel."""
  for _ in range(n_layers):
    side = (side + 2 - 4) // 2 + 1
  return side - 2


class NLayerDiscriminator(nn.Module):
  """PatchGAN: (B, H, W, C) images in [-1, 1] -> (B, h, w, 1) float32 real/fake logits.

  Attributes:
    ndf: width of the first convolution (64).
    n_layers: number of stride-2 convolutions (3).
    norm: "group" (GroupNorm, default) or "none"; see the module docstring for why no BatchNorm.
    num_groups: GroupNorm groups; every normalised width must be divisible by it.
    dtype: compute dtype of the convolutions; parameters, norms and logits are float32.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = "group"
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  def _check(self) -> None:
    if int(self.ndf) < 1 or int(self.n_layers) < 1:
      raise ConfigError(f"NLayerDiscriminator needs ndf >= 1 and n_layers >= 1, got "
                        f"ndf={self.ndf}, n_layers={self.n_layers}.")
    if self.norm not in NORMS:
      raise ConfigError(f"NLayerDiscriminator.norm must be one of {NORMS}, got {self.norm!r}.")
    if self.norm == "group":
      bad = [w for w in discriminator_widths(self.ndf, self.n_layers)[1:] if w % self.num_groups]
      if self.num_groups < 1 or bad:
        raise ConfigError(f"GroupNorm with num_groups={self.num_groups} needs every normalised "
                          f"width divisible by it; ndf={self.ndf}, n_layers={self.n_layers} "
                          f"gives {bad}.")

  def _norm(self, h: jax.Array, name: str) -> jax.Array:
    if self.norm == "none":
      return h
    return nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=jnp.float32,
                        name=name)(h)

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    self._check()
    if x_BHWC.ndim != 4:
      raise InputError(f"NLayerDiscriminator takes (B, H, W, C) images, got shape {x_BHWC.shape}.")
    if output_side(min(x_BHWC.shape[1:3]), self.n_layers) < 1:
      raise InputError(f"Images of {x_BHWC.shape[1]}x{x_BHWC.shape[2]} are too small for a "
                       f"{self.n_layers}-layer PatchGAN (no output patch is left).")
    widths = discriminator_widths(self.ndf, self.n_layers)
    use_bias = self.norm == "none"

    def conv(features: int, stride: int, name: str, bias: bool) -> precision.Conv:
      return precision.Conv(features, (4, 4), strides=(stride, stride), padding=_PAD,
                            use_bias=bias, kernel_init=_INIT, dtype=self.dtype, name=name)

    h = conv(widths[0], 2, "conv_0", True)(x_BHWC.astype(self.dtype))
    h = nn.leaky_relu(h, 0.2)
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = conv(widths[n], stride, f"conv_{n}", use_bias)(h)
      h = nn.leaky_relu(self._norm(h, f"norm_{n}"), 0.2).astype(self.dtype)
    logits = conv(1, 1, "conv_out", True)(h)
    return logits.astype(jnp.float32)
