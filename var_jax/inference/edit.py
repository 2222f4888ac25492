"""Zero-shot editing (paper §7): in-/out-painting and class editing with the sampler's loop.

At every scale the tokens of the kept region are forced to the source image's tokens (per-scale
keep-masks: the latent keep-mask resized bilinearly, no antialias, then > 0.5; the 1x1 scale
always kept), the rest is generated.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import InputError
from var_jax.inference import placement
from var_jax.inference.filters import check_sampling_options, effective_top_k
from var_jax.inference.sampler import Call, check_labels, generate, place_common
from var_jax.models.vqvae import VQVAE
from var_jax.ops.resize import bilinear_matrix, resize


def _encode_and_generate(var_params, vae_params, images, labels_B, rng, cfg, top_k, top_p, edit_masks, *,
                         var_config, vae_config, more_smooth, guided):
  src_tokens = VQVAE(vae_config).apply({"params": vae_params}, images, method=VQVAE.encode)
  return generate(var_params, vae_params, labels_B, rng, cfg, top_k, top_p, src_tokens, edit_masks,
                  var_config=var_config, vae_config=vae_config, more_smooth=more_smooth,
                  guided=guided)


_edit_jit = jax.jit(_encode_and_generate,
                    static_argnames=("var_config", "vae_config", "more_smooth", "guided"))


def edit_masks_per_scale(keep_BPP: np.ndarray, patch_nums: Sequence[int]) -> list[np.ndarray]:
  """Keep-masks per scale: bilinear (align_corners=False, no antialias) to pn, then > 0.5.

  The 1x1 scale is always kept (the official rule for pn*pn <= 3).
  """
  P = keep_BPP.shape[-1]
  out = []
  for pn in patch_nums:
    if pn * pn <= 3:
      out.append(np.ones((keep_BPP.shape[0], pn, pn), np.float32))
      continue
    m = bilinear_matrix(P, pn)
    small = np.einsum("oh,bhw,pw->bop", m, keep_BPP.astype(np.float64), m)
    out.append((small > 0.5).astype(np.float32))
  return out


def latent_keep_mask(mask, batch: int, image_size: int, latent: int) -> np.ndarray:
  """Accepts (H, W), (B, H, W), (P, P) or (B, P, P) keep-masks (1 = keep source, 0 = generate)."""
  m = np.asarray(mask)
  if m.dtype == bool:
    m = m.astype(np.float32)
  if not np.issubdtype(m.dtype, np.number):
    raise InputError(f"mask must be numeric or boolean, got dtype {m.dtype}.")
  if m.ndim == 2:
    m = m[None]
  if m.ndim != 3 or m.shape[0] not in (1, batch):
    raise InputError(f"mask must be (H, W) or (B, H, W) with B={batch}, got shape {np.asarray(mask).shape}.")
  if np.any((m < 0) | (m > 1)) or not np.all(np.isfinite(m)):
    raise InputError("mask values must lie in [0, 1] (1 = keep the source, 0 = generate).")
  if m.shape[1:] == (image_size, image_size):
    m = np.asarray(resize(jnp.asarray(m, jnp.float32)[..., None], latent, "area"))[..., 0]
    m = (m >= 0.5).astype(np.float32)
  elif m.shape[1:] != (latent, latent):
    raise InputError(f"mask is {m.shape[1]}x{m.shape[2]}, but must be the image size "
                     f"{image_size}x{image_size} or the latent size {latent}x{latent}.")
  return np.broadcast_to(m, (batch,) + m.shape[1:]).astype(np.float32)


def check_edit_images(model, images):
  """Float32 (B, H, W, 3) in [-1, 1] on the host (uint8 scaled), or an abstract batch."""
  tc = model.tokenizer.config
  if isinstance(images, jax.ShapeDtypeStruct):
    if tuple(images.shape[1:]) != (tc.image_size, tc.image_size, tc.in_channels):
      raise InputError(f"abstract images must be (B, {tc.image_size}, {tc.image_size}, "
                       f"{tc.in_channels}), got {images.shape}.")
    return jax.ShapeDtypeStruct(images.shape, jnp.float32)
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  return np.asarray(model.tokenizer.check_images(images))


def build_edit_call(model, images, mask, labels, *, rng, cfg=1.5, top_k=900, top_p=0.96,
                    more_smooth=False, mesh=None) -> Call:
  """Checks the arguments and places everything for `edit` (and `aot.lower_edit`)."""
  check_sampling_options(model, cfg, top_k, top_p)
  top_k = effective_top_k(model, top_k)
  labels_B = check_labels(model, labels)
  images = check_edit_images(model, images)
  B = images.shape[0]
  if labels_B.shape[0] != B:
    raise InputError(f"{labels_B.shape[0]} labels for {B} images.")
  tc = model.tokenizer.config
  keep = latent_keep_mask(mask, B, tc.image_size, tc.latent_size)
  mesh, placed, labels, keys, scalars = place_common(model, labels_B, rng, cfg, top_k, top_p, mesh)
  size = labels.shape[0]
  masks = edit_masks_per_scale(keep, tc.patch_nums)
  if placement.is_abstract(model):
    masks = [placement.as_abstract(m) for m in masks]
    images = placement.as_abstract(images)
  masks = [placement.put_batch(placement.pad_batch(m, size), mesh) for m in masks]
  images = placement.put_batch(placement.pad_batch(images, size), mesh)
  static = dict(var_config=model.config, vae_config=tc, more_smooth=bool(more_smooth),
                guided=float(cfg) != 0.0)
  args = (placed.var_params, placed.decoding_vae_params, images, labels, keys, *scalars, masks)
  return Call(_encode_and_generate, _edit_jit, args, static, mesh, B)


def edit(model, images, mask, labels, *, rng, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False,
         return_tokens=False, mesh=None):
  """Zero-shot editing: regenerate the masked region of `images`, conditioned on the rest.

  Args:
    model: a `var_jax.VARModel`.
    images: (B, H, W, 3) uint8, or float in [-1, 1], at the model's image size.
    mask: keep-mask, 1 = keep the source token, 0 = generate: (H, W) or (B, H, W) at image size
      (area-averaged to the latent grid, kept where >= 0.5), or at the latent size (P, P).
      In-painting: zeros inside the box. Out-painting: ones inside the box.
    labels: class ids (B,) (num_classes = unconditional; other classes give class editing).
    rng, cfg, top_k, top_p, more_smooth, return_tokens, mesh: as in `sample`.
  """
  out, tokens = build_edit_call(model, images, mask, labels, rng=rng, cfg=cfg, top_k=top_k,
                                top_p=top_p, more_smooth=more_smooth, mesh=mesh).run()
  return (out, tokens) if return_tokens else out
