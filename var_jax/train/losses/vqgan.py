"""Losses, metrics and codebook upkeep for training the multi-scale VQVAE as a VQGAN.

The generator (encoder + quantizer + decoder) minimises, as in taming-transformers' VQGAN,

  pixel_weight * pixel(x, x_rec) + perceptual_weight * LPIPS(x, x_rec)       (= "rec", the NLL)
  + vq_weight * vq_loss
  + adopt(step) * disc_weight * lambda * (-mean D(x_rec))

with lambda = ||d rec / d W_last|| / (||d gan / d W_last|| + 1e-4), clipped to [0, 1e4] and held
constant (stop-gradient), W_last being the decoder's last convolution kernel: the GAN gradient
arriving at the output layer is rescaled to disc_weight times the size of the reconstruction's.
The discriminator minimises adopt(step) * hinge(D(x), D(x_rec)). `adopt(step)` is 0 until
`disc_start_step`, so the first phase trains a plain VQVAE with a perceptual loss.

Everything here is a pure function of arrays (jit-, grad- and pjit-safe; `step` may be traced).
The config builders (`build_perceptual_loss`, `build_discriminator`) run on the host.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from var_jax.errors import ConfigError, InputError
from var_jax.train.losses.discriminator import NLayerDiscriminator
from var_jax.train.losses.lpips import load_lpips, make_perceptual_loss

# Where the decoder's last convolution kernel lives in the VQVAE parameter tree.
DECODER_LAST_LAYER: tuple[str, ...] = ("decoder", "conv_out", "kernel")

PIXEL_LOSSES: tuple[str, ...] = ("l1", "l2")

# Floor of the mean squared error (images scaled to [0, 1]) in `psnr`: identical images give
# 10 * log10(1 / 1e-10) = 100 dB instead of inf, so batch means and "must be finite" metric checks
# keep working.
PSNR_MIN_MSE = 1e-10
PSNR_MAX_DB = 100.0

# The epsilon of taming's adaptive weight denominator.
ADAPTIVE_EPS = 1e-4


def default_loss_config() -> ml_collections.ConfigDict:
  """The tokenizer-training loss recipe; experiment configs override single fields."""
  c = ml_collections.ConfigDict()
  # Reconstruction ("NLL" in taming): pixel_weight * pixel + perceptual_weight * LPIPS.
  c.pixel_loss = "l1"           # "l1" (taming, LlamaGen) or "l2"
  c.pixel_weight = 1.0
  c.perceptual_weight = 1.0     # LPIPS-VGG16; 0 turns it off (and nothing is loaded)
  # GAN. taming's default disc_weight is 1.0 and its released VQGAN configs use 0.8; 0.5 (as in
  # LlamaGen's tokenizer recipe) is chosen here: with the adaptive rule it is exactly the ratio of
  # GAN to reconstruction gradient norm at the decoder output layer, and a gentler GAN keeps the
  # early codebook from being pushed around by a still-random discriminator.
  c.disc_weight = 0.5           # 0 turns the GAN term off
  c.adaptive_disc_weight = True  # taming's gradient-norm rule; False = the fixed disc_weight
  c.max_adaptive_weight = 1e4   # clip of the adaptive lambda (taming)
  c.disc_start_step = 20_000    # generator GAN term and discriminator loss are 0 before it
  c.disc_ndf = 64
  c.disc_layers = 3
  c.disc_norm = "group"         # "group" or "none" (no BatchNorm, see models/discriminator.py)
  c.disc_num_groups = 32
  # Quantizer: the model's vq_loss already includes beta * commitment; this scales the whole.
  c.vq_weight = 1.0
  # LPIPS weights (torch.save files; the official ones must be re-saved once, see models/lpips.py).
  c.lpips_vgg_path = "~/.cache/var_jax/lpips/vgg16-397923af.pth"
  c.lpips_lin_path = "~/.cache/var_jax/lpips/vgg.pth"
  c.allow_missing_lpips = False  # True: missing files -> warn and train without LPIPS
  # Dead codes: the EMA (over steps) of how often each code is picked per step, summed over scales.
  c.ema_hits_decay = 0.99       # the official quantizer's EMA rate for its vocab-hit buffer
  c.dead_code_threshold = 0.01  # EMA hits per step below this = dead (about once per 100 steps)
  c.reseed_dead_codes = False   # off like the official recipe; turn on if usage collapses
  c.reseed_every_steps = 1_000  # when on: reseed at steps > 0 that are multiples of this
  return c


def validate_loss_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unknown pixel loss, negative weights or bad discriminator sizes."""
  if config.pixel_loss not in PIXEL_LOSSES:
    raise ConfigError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {config.pixel_loss!r}.")
  for name in ("pixel_weight", "perceptual_weight", "disc_weight", "vq_weight",
               "max_adaptive_weight", "dead_code_threshold"):
    if not float(config[name]) >= 0:
      raise ConfigError(f"loss config {name} must be >= 0, got {config[name]}.")
  for name in ("disc_ndf", "disc_layers", "reseed_every_steps"):
    if int(config[name]) < 1:
      raise ConfigError(f"loss config {name} must be >= 1, got {config[name]}.")
  if int(config.disc_start_step) < 0:
    raise ConfigError(f"disc_start_step must be >= 0, got {config.disc_start_step}.")
  if not 0.0 <= float(config.ema_hits_decay) < 1.0:
    raise ConfigError(f"ema_hits_decay must be in [0, 1), got {config.ema_hits_decay}.")


# -- builders (host side) -----------------------------------------------------------------------

def build_perceptual_loss(config: ml_collections.ConfigDict,
                          dtype: jnp.dtype = jnp.float32) -> Optional[Callable]:
  """The frozen LPIPS loss `(x, y) -> scalar` the config asks for, or None when it is off.

  None when perceptual_weight is 0, or when the weight files are absent and allow_missing_lpips
  is set (with a logged warning). Files that exist but cannot be read always raise.

  Raises:
    CheckpointError: files missing (and not allowed to be), unreadable or of the wrong layout.
  """
  validate_loss_config(config)
  if float(config.perceptual_weight) == 0.0:
    return None
  paths = [os.path.expanduser(p) for p in (config.lpips_vgg_path, config.lpips_lin_path)]
  absent = [p for p in paths if not os.path.isfile(p)]
  if absent and config.allow_missing_lpips:
    logging.warning("LPIPS weight files %s not found: training WITHOUT the perceptual loss "
                    "(allow_missing_lpips=True). Reconstructions will be blurrier.", absent)
    return None
  module, params = load_lpips(*paths, dtype=dtype)
  return make_perceptual_loss(module, params)


def build_discriminator(config: ml_collections.ConfigDict,
                        dtype: jnp.dtype = jnp.float32) -> NLayerDiscriminator:
  """The PatchGAN discriminator of the loss config (disc_ndf, disc_layers, disc_norm)."""
  validate_loss_config(config)
  return NLayerDiscriminator(ndf=int(config.disc_ndf), n_layers=int(config.disc_layers),
                             norm=config.disc_norm, num_groups=int(config.disc_num_groups),
                             dtype=dtype)


# -- adversarial terms --------------------------------------------------------------------------

def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss: 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (loss_real + loss_fake)


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
  """The generator's hinge GAN loss: -mean D(fake)."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_generator_weight(grad_rec: Any, grad_gan: Any,
                              max_weight: float = 1e4) -> jax.Array:
  """taming's lambda = ||grad_rec|| / (||grad_gan|| + 1e-4), clipped to [0, max_weight].

  Args:
    grad_rec: gradient of the reconstruction (pixel + perceptual) loss w.r.t. the decoder's last
      layer weight (an array or any pytree; the norm is the global L2 norm).
    grad_gan: gradient of the generator GAN loss w.r.t. the same weight.
    max_weight: upper clip.

  Returns:
    float32 scalar with its gradient stopped. Zero gradients give 0 (rec) or
    ||grad_rec|| / 1e-4 clipped (gan), never NaN.
  """
  norm_rec = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grad_rec))
  norm_gan = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grad_gan))
  weight = jnp.clip(norm_rec / (norm_gan + ADAPTIVE_EPS), 0.0, max_weight)
  return jax.lax.stop_gradient(weight)


def adopt_weight(weight: Any, step: Any, start_step: Any) -> jax.Array:
  """`weight` from `start_step` on, 0 before it (step may be a traced integer)."""
  return jnp.where(jnp.asarray(step) >= start_step, jnp.asarray(weight, jnp.float32), 0.0)


# -- pixel losses and metrics -------------------------------------------------------------------

def l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute difference over every element, float32."""
  _check_same_shape(x, y, "l1")
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared difference over every element, float32."""
  _check_same_shape(x, y, "l2")
  return jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))


def pixel_loss(x: jax.Array, y: jax.Array, kind: str = "l1") -> jax.Array:
  """`l1` or `l2` by name."""
  if kind == "l1":
    return l1(x, y)
  if kind == "l2":
    return l2(x, y)
  raise ConfigError(f"pixel loss must be one of {PIXEL_LOSSES}, got {kind!r}.")


def psnr(x_BHWC: jax.Array, y_BHWC: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of images in [-1, 1], measured on the usual [0, 1] scale: (B,) float32.

  Both batches are clipped to [-1, 1] first (what would be displayed; reconstructions are
  unclamped) and mapped to [0, 1], so PSNR = 10 log10(1 / mse01) with mse01 = mse_[-1,1] / 4.
  The MSE is floored at 1e-10, so identical images give 100 dB rather than inf.
  """
  _check_same_shape(x_BHWC, y_BHWC, "psnr")
  if x_BHWC.ndim < 2:
    raise InputError(f"psnr takes a batch of images (B, ...), got shape {x_BHWC.shape}.")
  x01 = (jnp.clip(x_BHWC.astype(jnp.float32), -1.0, 1.0) + 1.0) * 0.5
  y01 = (jnp.clip(y_BHWC.astype(jnp.float32), -1.0, 1.0) + 1.0) * 0.5
  mse_B = jnp.mean(jnp.square(x01 - y01), axis=tuple(range(1, x_BHWC.ndim)))
  return -10.0 * jnp.log10(jnp.maximum(mse_B, PSNR_MIN_MSE))


def _check_same_shape(x: jax.Array, y: jax.Array, what: str) -> None:
  if x.shape != y.shape:
    raise InputError(f"{what} needs two arrays of one shape, got {x.shape} and {y.shape}.")


# -- the combined objectives --------------------------------------------------------------------

def forward_with_last_layer_vjp(
    forward_fn: Callable[[Any], tuple[jax.Array, Any]], params: Mapping,
    path: Sequence[str] = DECODER_LAST_LAYER,
) -> tuple[jax.Array, Any, Callable[[jax.Array], jax.Array]]:
  """Runs the generator once and also returns the map g_recon -> d/dW_last (for lambda).

  `jax.vjp` linearises `forward_fn` with respect to the last-layer kernel only, so this costs one
  forward pass plus residuals of the last layer; `recon` and `aux` remain ordinary differentiable
  outputs for an enclosing `jax.grad` over all of `params`.

  Args:
    forward_fn: params -> (reconstruction, aux); e.g. for the VQVAE
      `lambda p: (lambda r, v, h: (r, (v, h)))(*vqvae.apply({"params": p}, images))`.
    params: the generator's parameter tree (nested dicts).
    path: keys of the last layer kernel inside `params`.

  Returns:
    (recon, aux, last_layer_vjp) with last_layer_vjp(g_recon) -> gradient w.r.t. the kernel.
  """
  kernel = _get_path(params, path)

  def with_kernel(k: jax.Array):
    return forward_fn(_set_path(params, path, k))

  recon, vjp_fn, aux = jax.vjp(with_kernel, kernel, has_aux=True)

  def last_layer_vjp(g_recon: jax.Array) -> jax.Array:
    return vjp_fn(g_recon.astype(recon.dtype))[0]

  return recon, aux, last_layer_vjp


def _get_path(tree: Mapping, path: Sequence[str]) -> jax.Array:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise InputError(f"The generator parameters have no {'/'.join(path[:i + 1])!r}; pass the "
                       f"path of the decoder's last layer kernel (default {DECODER_LAST_LAYER}).")
    node = node[key]
  return node


def _set_path(tree: Mapping, path: Sequence[str], value: jax.Array) -> dict:
  """A copy of `tree` with the leaf at `path` replaced (only the dicts on the path are copied)."""
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set_path(tree[path[0]], path[1:], value)
  return out


def vqgan_generator_loss(
    images_BHWC: jax.Array, recon_BHWC: jax.Array, vq_loss: jax.Array, *,
    config: ml_collections.ConfigDict, step: Any,
    perceptual_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
    disc_logits_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
    last_layer_vjp: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The generator objective; differentiate the returned loss w.r.t. the VQVAE parameters.

  Args:
    images_BHWC: the real images in [-1, 1].
    recon_BHWC: the unclamped reconstruction (from `forward_with_last_layer_vjp` when the GAN
      weight is adaptive).
    vq_loss: the quantizer loss returned by the VQVAE (already includes beta).
    config: `default_loss_config()` or an override of it.
    step: the training step (may be traced); the GAN term is 0 before config.disc_start_step.
    perceptual_fn: (x, y) -> scalar LPIPS (`build_perceptual_loss`), or None for no LPIPS.
    disc_logits_fn: recon -> logits with the discriminator parameters closed over, or None for
      no GAN term (it is also skipped when disc_weight is 0).
    last_layer_vjp: from `forward_with_last_layer_vjp`; required when config.adaptive_disc_weight
      and the GAN term is on.

  Returns:
    (loss, metrics) with metrics: loss, rec (the NLL), pixel, perceptual, vq, gan (-mean D),
    adaptive_weight (lambda) and gan_weight (what multiplied the gan term); all float32 scalars.
  """
  _check_same_shape(images_BHWC, recon_BHWC, "vqgan_generator_loss")
  use_lpips = perceptual_fn is not None and float(config.perceptual_weight) > 0
  use_gan = disc_logits_fn is not None and float(config.disc_weight) > 0
  if use_gan and config.adaptive_disc_weight and last_layer_vjp is None:
    raise ConfigError("adaptive_disc_weight needs last_layer_vjp (see "
                      "forward_with_last_layer_vjp); or set adaptive_disc_weight = False.")
  zero = jnp.zeros((), jnp.float32)

  def rec_loss_fn(recon: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    pixel = pixel_loss(images_BHWC, recon, config.pixel_loss)
    perceptual = perceptual_fn(images_BHWC, recon) if use_lpips else zero
    rec = float(config.pixel_weight) * pixel + float(config.perceptual_weight) * perceptual
    return rec, (pixel, perceptual)

  def gan_loss_fn(recon: jax.Array) -> jax.Array:
    return generator_adversarial_loss(disc_logits_fn(recon))

  if use_gan and config.adaptive_disc_weight:
    # One pass each: the value (differentiable for the outer grad) and its gradient w.r.t. recon.
    rec, rec_vjp, (pixel, perceptual) = jax.vjp(rec_loss_fn, recon_BHWC, has_aux=True)
    gan, gan_vjp = jax.vjp(gan_loss_fn, recon_BHWC)
    g_rec_img = jax.lax.stop_gradient(rec_vjp(jnp.ones_like(rec))[0])
    g_gan_img = jax.lax.stop_gradient(gan_vjp(jnp.ones_like(gan))[0])
    lam = adaptive_generator_weight(last_layer_vjp(g_rec_img), last_layer_vjp(g_gan_img),
                                    float(config.max_adaptive_weight))
  else:
    rec, (pixel, perceptual) = rec_loss_fn(recon_BHWC)
    gan = gan_loss_fn(recon_BHWC) if use_gan else zero
    lam = jnp.ones((), jnp.float32) if use_gan else zero
  gan_weight = adopt_weight(float(config.disc_weight), step, config.disc_start_step) * lam
  vq = jnp.asarray(vq_loss, jnp.float32)
  loss = rec + float(config.vq_weight) * vq + gan_weight * gan
  metrics = {"loss": loss, "rec": rec, "pixel": pixel, "perceptual": perceptual, "vq": vq,
             "gan": gan, "adaptive_weight": lam, "gan_weight": gan_weight}
  return loss, metrics


def vqgan_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, *,
                             config: ml_collections.ConfigDict,
                             step: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """adopt(step) * hinge loss; feed D the real images and stop_gradient(recon).

  Returns:
    (loss, metrics) with metrics: disc_loss, logits_real, logits_fake (means), disc_factor.
  """
  factor = adopt_weight(1.0, step, config.disc_start_step)
  loss = factor * hinge_d_loss(logits_real, logits_fake)
  return loss, {"disc_loss": loss, "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
                "logits_fake": jnp.mean(logits_fake.astype(jnp.float32)), "disc_factor": factor}


# -- codebook upkeep ----------------------------------------------------------------------------

def update_ema_hits(ema_hits_V: jax.Array, hits_SV: jax.Array, decay: float = 0.99) -> jax.Array:
  """EMA over steps of each code's hits this step, summed over scales: (V,) float32."""
  hits_V = jnp.sum(hits_SV.astype(jnp.float32), axis=0)
  return decay * ema_hits_V.astype(jnp.float32) + (1.0 - decay) * hits_V


def codebook_usage(hits_SV: jax.Array, ema_hits_V: Optional[jax.Array] = None,
                   threshold: float = 0.01) -> dict[str, jax.Array]:
  """How much of the codebook a batch used.

  Args:
    hits_SV: (num_scales, vocab) hit counts, as returned by the VQVAE.
    ema_hits_V: optional (vocab,) EMA of hits per step (`update_ema_hits`).
    threshold: codes whose EMA is below it count as dead.

  Returns:
    usage_per_scale (S,): fraction of codes picked at least once at each scale; usage: fraction
    picked at any scale; and, given ema_hits_V, dead_codes (int32) and dead_fraction.
  """
  if hits_SV.ndim != 2:
    raise InputError(f"hits_SV must be (num_scales, vocab), got shape {hits_SV.shape}.")
  used_SV = hits_SV > 0
  out = {"usage_per_scale": jnp.mean(used_SV.astype(jnp.float32), axis=1),
         "usage": jnp.mean(jnp.any(used_SV, axis=0).astype(jnp.float32))}
  if ema_hits_V is not None:
    if ema_hits_V.shape != hits_SV.shape[1:]:
      raise InputError(f"ema_hits_V must be ({hits_SV.shape[1]},), got {ema_hits_V.shape}.")
    dead_V = ema_hits_V < threshold
    out["dead_codes"] = jnp.sum(dead_V.astype(jnp.int32))
    out["dead_fraction"] = jnp.mean(dead_V.astype(jnp.float32))
  return out


class ReseedResult(NamedTuple):
  """What `reseed_dead_codes` returns."""
  codebook_VC: jax.Array  # dead rows replaced, live rows bit-identical
  ema_hits_V: jax.Array   # reseeded codes restarted at `threshold`, others unchanged
  dead_V: jax.Array       # bool: which codes were replaced


def reseed_dead_codes(codebook_VC: jax.Array, ema_hits_V: jax.Array, candidates_NC: jax.Array,
                      key: jax.Array, threshold: float) -> ReseedResult:
  """Replaces codes whose EMA hits are below `threshold` by randomly drawn encoder outputs.

  Fixed shapes (jittable): a candidate row is drawn for every code (without replacement when
  there are at least as many candidates as codes, so reseeded codes are distinct) and used only
  where the code is dead. The reseeded codes' EMA restarts at `threshold`, so they are not judged
  dead again before they had a chance to be picked. The optimizer's moments for those rows are
  left as they are.

  Args:
    codebook_VC: (vocab, C) codebook.
    ema_hits_V: (vocab,) EMA of hits per step.
    candidates_NC: (N, C) encoder outputs (e.g. the batch's pre-quantization latents, flattened).
    key: PRNG key.
    threshold: EMA below it = dead.
  """
  if codebook_VC.ndim != 2 or candidates_NC.ndim != 2 or ema_hits_V.ndim != 1:
    raise InputError(f"reseed_dead_codes takes codebook (V, C), ema_hits (V,) and candidates "
                     f"(N, C); got {codebook_VC.shape}, {ema_hits_V.shape}, "
                     f"{candidates_NC.shape}.")
  V, C = codebook_VC.shape
  N = candidates_NC.shape[0]
  if ema_hits_V.shape[0] != V or candidates_NC.shape[1] != C or N == 0:
    raise InputError(f"reseed_dead_codes: codebook {codebook_VC.shape}, ema_hits "
                     f"{ema_hits_V.shape} and candidates {candidates_NC.shape} do not match "
                     f"(need V entries of EMA, width C and at least one candidate).")
  picks_V = jax.random.choice(key, N, (V,), replace=N < V)
  new_VC = jnp.take(candidates_NC, picks_V, axis=0).astype(codebook_VC.dtype)
  dead_V = ema_hits_V < threshold
  codebook_VC = jnp.where(dead_V[:, None], new_VC, codebook_VC)
  ema_hits_V = jnp.where(dead_V, jnp.asarray(threshold, ema_hits_V.dtype), ema_hits_V)
  return ReseedResult(codebook_VC, ema_hits_V, dead_V)
