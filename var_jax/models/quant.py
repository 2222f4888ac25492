"""The multi-scale residual vector quantizer of VAR's tokenizer (VAR_SPEC §3), NHWC.

Maps are (B, h, w, Cvae). Scale si's token map is (B, pn_si, pn_si) int32, row-major.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops.resize import resize

_HIGHEST = jax.lax.Precision.HIGHEST


class Phi(nn.Module):
  """h -> (1 - r) h + r conv3x3(h): the residual refinement applied after up-sampling."""
  channels: int
  ratio: float

  @nn.compact
  def __call__(self, h_BHWC):
    conv = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name="conv", precision=_HIGHEST)
    r = abs(self.ratio)
    return h_BHWC * (1.0 - r) + conv(h_BHWC) * r


class MultiScaleQuantizer(nn.Module):
  """Residual quantization over `patch_nums` with a shared codebook and Phi convolutions."""
  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(cfg.vocab_size, cfg.z_channels, name="embedding",
                              embedding_init=nn.initializers.normal(1.0 / cfg.vocab_size))
    self.phis = [Phi(cfg.z_channels, cfg.quant_resi, name=f"phi_{i}") for i in range(cfg.num_phi)]

  # -- building blocks -----------------------------------------------------------------------

  def codebook(self) -> jax.Array:
    return self.embedding.embedding

  def apply_phi(self, h_BHWC: jax.Array, si: int) -> jax.Array:
    if not self.phis:
      return h_BHWC
    return self.phis[self.config.phi_table[si]](h_BHWC)

  def upsample_to_latent(self, h_BhwC: jax.Array) -> jax.Array:
    return resize(h_BhwC, self.config.latent_size, "bicubic")

  def nearest_code(self, z_NC: jax.Array) -> jax.Array:
    """argmin_v ||z - e_v||^2 with the official expansion (first minimum on ties)."""
    e_VC = self.codebook().astype(jnp.float32)
    z_NC = z_NC.astype(jnp.float32)
    d_NV = (jnp.sum(z_NC * z_NC, axis=1, keepdims=True) + jnp.sum(e_VC * e_VC, axis=1)[None]
            - 2.0 * jnp.dot(z_NC, e_VC.T, precision=_HIGHEST))
    return jnp.argmin(d_NV, axis=1).astype(jnp.int32)

  def scale_contribution(self, h_BpnpnC: jax.Array, si: int) -> jax.Array:
    """Phi(bicubic(h)) at latent resolution: what scale si adds to f_hat."""
    if si < self.config.num_scales - 1:
      h_BpnpnC = self.upsample_to_latent(h_BpnpnC)
    return self.apply_phi(h_BpnpnC, si)

  def lookup(self, idx_Bhw: jax.Array) -> jax.Array:
    return jnp.take(self.codebook(), idx_Bhw, axis=0)

  # -- tokenisation ----------------------------------------------------------------------------

  def quantize(self, f_BHWC: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """The residual loop of §3.4. Returns (index maps per scale, cumulative f_hat per scale)."""
    cfg = self.config
    f_BHWC = jax.lax.stop_gradient(f_BHWC.astype(jnp.float32))
    B, H, W, C = f_BHWC.shape
    if (H, W) != (cfg.latent_size, cfg.latent_size):
      raise ValueError(f"latent map is {H}x{W} but patch_nums ends at {cfg.latent_size}.")
    f_rest = f_BHWC
    f_hat = jnp.zeros_like(f_BHWC)
    idx_maps, f_hats = [], []
    for si, pn in enumerate(cfg.patch_nums):
      z = resize(f_rest, pn, "area") if si < cfg.num_scales - 1 else f_rest
      idx_Bpp = self.nearest_code(z.reshape(-1, C)).reshape(B, pn, pn)
      h = self.scale_contribution(self.lookup(idx_Bpp), si)
      f_hat = f_hat + h
      f_rest = f_rest - h
      idx_maps.append(idx_Bpp)
      f_hats.append(f_hat)
    return idx_maps, f_hats

  def encode(self, f_BHWC: jax.Array) -> list[jax.Array]:
    return self.quantize(f_BHWC)[0]

  def indices_to_fhat(self, idx_maps: Sequence[jax.Array], last_only: bool = True):
    """Rebuilds the cumulative f_hat from token maps (§3.5, default mode)."""
    f_hat = None
    f_hats = []
    for si, idx in enumerate(idx_maps):
      h = self.scale_contribution(self.lookup(idx), si)
      f_hat = h if f_hat is None else f_hat + h
      f_hats.append(f_hat)
    return f_hat if last_only else f_hats

  def indices_to_var_input(self, idx_maps: Sequence[jax.Array]) -> jax.Array:
    """Teacher-forcing input of VAR (§3.6): (B, L - pn_0**2, Cvae) float32."""
    cfg = self.config
    if len(idx_maps) != cfg.num_scales:
      raise ValueError(f"expected {cfg.num_scales} token maps, got {len(idx_maps)}.")
    f_hat = None
    nexts = []
    for si in range(cfg.num_scales - 1):
      h = self.scale_contribution(self.lookup(idx_maps[si]), si).astype(jnp.float32)
      f_hat = h if f_hat is None else f_hat + h
      nxt = resize(f_hat, cfg.patch_nums[si + 1], "area")
      nexts.append(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1]))
    if not nexts:
      B = idx_maps[0].shape[0]
      return jnp.zeros((B, 0, cfg.z_channels), jnp.float32)
    return jnp.concatenate(nexts, axis=1)

  def next_autoregressive_input(self, si: int, f_hat_BHWC: jax.Array, h_BpnpnC: jax.Array):
    """One sampling step (§3.7): returns (new f_hat, the next scale's input map).

    The next input is area(f_hat) at pn_{si+1} as (B, pn, pn, Cvae); at the last scale it is f_hat.
    """
    cfg = self.config
    f_hat_BHWC = f_hat_BHWC + self.scale_contribution(h_BpnpnC, si).astype(f_hat_BHWC.dtype)
    if si < cfg.num_scales - 1:
      return f_hat_BHWC, resize(f_hat_BHWC, cfg.patch_nums[si + 1], "area")
    return f_hat_BHWC, f_hat_BHWC

  # -- training forward (§3.8) ---------------------------------------------------------------

  def __call__(self, f_BHWC: jax.Array):
    """Training forward: straight-through f_hat, VQ loss and per-scale code hit counts.

    Returns:
      f_hat_st: stopgrad(f_hat) - stopgrad(f) + f, float32 (B, H, W, C).
      vq_loss: mean over scales of beta * mse(sg(f_hat_si), f) + mse(f_hat_si, sg(f)).
      hits_SV: int32 (num_scales, vocab): how often each code was picked at each scale.
    """
    cfg = self.config
    f = f_BHWC.astype(jnp.float32)
    f_sg = jax.lax.stop_gradient(f)
    # quantize() stops gradients into f, but its f_hats still depend on the codebook and Phis.
    idx_maps, f_hats = self.quantize(f)
    vq_loss = 0.0
    for f_hat in f_hats:
      vq_loss = vq_loss + cfg.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
      vq_loss = vq_loss + jnp.mean(jnp.square(f_hat - f_sg))
    vq_loss = vq_loss / cfg.num_scales
    f_hat = f_hats[-1]
    f_hat_st = jax.lax.stop_gradient(f_hat) - f_sg + f
    hits_SV = jnp.stack([
        jnp.zeros((cfg.vocab_size,), jnp.int32).at[idx.reshape(-1)].add(1) for idx in idx_maps])
    return f_hat_st, vq_loss, hits_SV
