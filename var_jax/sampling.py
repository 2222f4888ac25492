"""Class-conditional sampling and zero-shot editing: one jitted scale-by-scale loop with a KV cache.

`sample` implements the official `autoregressive_infer_cfg` (VAR_SPEC §6): the batch is doubled
with the null class for classifier-free guidance, the guidance ramps linearly over scales, logits
are filtered by top-k then top-p with the official semantics, and each scale's tokens update f_hat
through the tokenizer's `next_autoregressive_input`. All scales, all layers and the final decode
are one `jax.jit`; the KV cache is preallocated for the whole sequence and written scale by scale.
`cfg`, `top_k` and `top_p` are traced, so changing them does not recompile.

`edit` is the paper's zero-shot in-/out-painting and class editing (§7): at every scale the tokens
of the kept region are forced to the source image's tokens, the rest is generated.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from var_jax.errors import InputError
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops import attention as attention_ops
from var_jax.ops.resize import bilinear_matrix, resize


# -- filtering ---------------------------------------------------------------------------------

def filter_top_k_top_p(logits_BlV: jax.Array, top_k, top_p) -> jax.Array:
  """The official `sample_with_top_k_top_p_` filter, as a function: removed logits become -inf.

  top-k (k > 0): drop logits strictly below the k-th largest (ties at the threshold survive).
  top-p (p > 0), on the top-k-filtered logits: keep a token iff the probability mass of the tokens
  ranked above it is < p; the largest token always survives. Both thresholds are found on one
  ascending sort, so `top_k` and `top_p` may be traced values.
  """
  V = logits_BlV.shape[-1]
  neg_inf = jnp.asarray(-jnp.inf, logits_BlV.dtype)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  asc = jnp.sort(logits_BlV, axis=-1)
  kth = jax.lax.dynamic_index_in_dim(asc, jnp.clip(V - top_k, 0, V - 1), axis=-1, keepdims=True)
  k_on = top_k > 0
  logits_BlV = jnp.where(k_on & (logits_BlV < kth), neg_inf, logits_BlV)
  asc = jnp.where(k_on & (asc < kth), neg_inf, asc)  # the same filter on the sorted copy
  cum = jnp.cumsum(jax.nn.softmax(asc.astype(jnp.float32), axis=-1), axis=-1)
  removed = (cum <= 1.0 - top_p).at[..., -1].set(False)
  n_removed = jnp.sum(removed, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(asc, n_removed, axis=-1)
  p_on = top_p > 0
  return jnp.where(p_on & (logits_BlV < threshold), neg_inf, logits_BlV)


def guidance_scale(cfg, si: int, num_scales: int):
  """t = cfg * si / (K - 1): no guidance at the first scale, full cfg at the last."""
  return cfg * (si / (num_scales - 1) if num_scales > 1 else 0.0)


def to_uint8(images_BHWC: jax.Array) -> jax.Array:
  """[-1, 1] floats -> uint8, rounding (x + 1) / 2 * 255 to nearest and clipping."""
  return jnp.clip(jnp.round((images_BHWC + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# -- the generation loop -----------------------------------------------------------------------

def _generate(var_params, vae_params, labels_B, rng, cfg, top_k, top_p, edit_tokens, edit_masks, *,
              var_config: VARConfig, vae_config: VQVAEConfig, more_smooth: bool):
  """All scales, all layers and the decode. Returns (uint8 images, list of int32 token maps)."""
  vae = VQVAE(vae_config)
  codebook = vae.apply({"params": vae_params}, method=VQVAE.codebook)
  B = labels_B.shape[0]
  K, Cvae = var_config.num_scales, var_config.z_channels
  labels_2B = jnp.concatenate([labels_B, jnp.full_like(labels_B, var_config.num_classes)])
  latent = var_config.patch_nums[-1]
  f_hat = jnp.zeros((B, latent, latent, Cvae), jnp.float32)
  cache = None
  x_next = None
  tokens = []
  for si, pn in enumerate(var_config.patch_nums):
    variables = {"params": var_params} if cache is None else {"params": var_params, "cache": cache}
    logits_2BlV, mutated = VAR(var_config, decode_scale=si).apply(
        variables, labels_2B, x_next, mutable=["cache"])
    cache = mutated["cache"]
    t = guidance_scale(cfg, si, K)
    logits_BlV = (1.0 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
    rng, key_idx, key_gumbel = jax.random.split(rng, 3)
    logits_BlV = filter_top_k_top_p(logits_BlV, top_k, top_p)
    idx_Bl = jax.random.categorical(key_idx, logits_BlV, axis=-1).astype(jnp.int32)
    if more_smooth:
      ratio = si / (K - 1) if K > 1 else 0.0
      tau = max(0.27 * (1 - ratio * 0.95), 0.005)
      gumbel = -jnp.log(jax.random.exponential(key_gumbel, logits_BlV.shape, jnp.float32))
      soft = jax.nn.softmax((logits_BlV * (1 + ratio) + gumbel) / tau, axis=-1)
      h_BlC = jnp.einsum("blv,vc->blc", soft, codebook, precision=jax.lax.Precision.HIGHEST)
    else:
      h_BlC = jnp.take(codebook, idx_Bl, axis=0)
    if edit_tokens is not None:
      keep_Bl1 = edit_masks[si].reshape(edit_masks[si].shape[0], -1, 1)
      src_Bl = edit_tokens[si].reshape(B, -1)
      h_BlC = keep_Bl1 * jnp.take(codebook, src_Bl, axis=0) + (1.0 - keep_Bl1) * h_BlC
      idx_Bl = jnp.where(keep_Bl1[..., 0] > 0.5, src_Bl, idx_Bl)
    tokens.append(idx_Bl.reshape(B, pn, pn))
    f_hat, nxt = vae.apply({"params": vae_params}, si, f_hat, h_BlC.reshape(B, pn, pn, Cvae),
                           method=VQVAE.next_autoregressive_input)
    if si < K - 1:
      x_next = jnp.tile(nxt.reshape(B, -1, Cvae), (2, 1, 1))
  decode = lambda f: vae.apply({"params": vae_params}, f, method=VQVAE.decode_fhat)
  if attention_ops.computation_platform() == "cpu" and B > 1:
    # One image at a time on CPU: the decoder's full-resolution convs run ~1.4x faster per image
    # than batched there (cache-bound); accelerators keep the batched decode.
    images = jax.lax.map(lambda f: decode(f[None])[0], f_hat)
  else:
    images = decode(f_hat)
  return to_uint8(images), tokens


_generate_jit = jax.jit(_generate, static_argnames=("var_config", "vae_config", "more_smooth"))


def _encode_and_generate(var_params, vae_params, images, labels_B, rng, cfg, top_k, top_p, edit_masks, *,
                         var_config, vae_config, more_smooth):
  src_tokens = VQVAE(vae_config).apply({"params": vae_params}, images, method=VQVAE.encode)
  return _generate(var_params, vae_params, labels_B, rng, cfg, top_k, top_p, src_tokens, edit_masks,
                   var_config=var_config, vae_config=vae_config, more_smooth=more_smooth)


_edit_jit = jax.jit(_encode_and_generate, static_argnames=("var_config", "vae_config", "more_smooth"))


# -- argument checks ---------------------------------------------------------------------------

DEFAULT_TOP_K = 900  # The released models' setting (VAR_SPEC §6.2).


def effective_top_k(model, top_k) -> int:
  """The default top_k=900 keeps every token of a vocabulary smaller than 900 (e.g. shapes-tiny)."""
  if isinstance(top_k, (int, np.integer)) and top_k == DEFAULT_TOP_K:
    return min(DEFAULT_TOP_K, model.config.vocab_size)
  return top_k


def check_sampling_options(model, cfg, top_k, top_p) -> None:
  """Raises InputError on guidance or filter values outside their ranges (before any compile)."""
  V = model.config.vocab_size
  top_k = effective_top_k(model, top_k)
  if not np.isscalar(cfg) or not np.isfinite(cfg) or cfg < 0:
    raise InputError(f"cfg (guidance scale) must be a finite number >= 0, got {cfg!r}.")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= V:
    raise InputError(f"top_k must be an int in [0, {V}] (0 = off), got {top_k!r}.")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not 0.0 <= top_p <= 1.0:
    raise InputError(f"top_p must be a number in [0, 1] (0 = off), got {top_p!r}.")


def _check_rng(rng) -> jax.Array:
  if isinstance(rng, (int, np.integer)):
    raise InputError("rng must be a JAX PRNG key, e.g. jax.random.key(0), not an int.")
  try:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      return rng
    if rng.shape == (2,) and rng.dtype == jnp.uint32:
      return jax.random.wrap_key_data(rng)
  except AttributeError:
    pass
  raise InputError(f"rng must be a JAX PRNG key (jax.random.key(seed)), got {type(rng).__name__}.")


def _batch_sharding(batch: int):
  """Splits the batch over every device when it divides; else keeps it on one device."""
  devices = jax.devices()
  if len(devices) > 1 and batch % len(devices) == 0:
    mesh = Mesh(np.asarray(devices), ("data",))
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  return None, None


def _place(labels_B, *extra):
  batch_sh, repl = _batch_sharding(labels_B.shape[0])
  if batch_sh is None:
    return (labels_B, *extra)
  return (jax.device_put(labels_B, batch_sh), *(jax.device_put(x, batch_sh) if x is not None else None
                                                 for x in extra))


# -- public API --------------------------------------------------------------------------------

def sample(model, labels, *, rng, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, return_tokens=False):
  """Generates class-conditional images with a VARModel.

  Args:
    model: a `var_jax.VARModel` (params + tokenizer).
    labels: int class ids (B,), in [0, num_classes); num_classes itself means unconditional.
    rng: a JAX PRNG key. The same key gives the same images on every call.
    cfg: classifier-free guidance scale, ramped linearly from 0 at the first scale to cfg at the last.
    top_k: keep the k largest logits per token (0 = off); at most the vocabulary size, except
      that the default 900 keeps every token of a smaller vocabulary.
    top_p: nucleus filtering on top of top-k (0 = off).
    more_smooth: the official Gumbel-softmax smoothing of the residual (for visualisation).
    return_tokens: also return the per-scale int32 token maps (B, pn, pn).

  Returns:
    uint8 images (B, H, W, 3), or (images, token maps) with return_tokens=True.
  """
  check_sampling_options(model, cfg, top_k, top_p)
  top_k = effective_top_k(model, top_k)
  labels_B = model.check_labels(labels, allow_null=True)
  rng = _check_rng(rng)
  (labels_B,) = _place(labels_B)
  images, tokens = _generate_jit(model.params, model.tokenizer.params, labels_B, rng,
                                 jnp.float32(cfg), jnp.int32(top_k), jnp.float32(top_p), None, None,
                                 var_config=model.config, vae_config=model.tokenizer.config,
                                 more_smooth=bool(more_smooth))
  return (images, list(tokens)) if return_tokens else images


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


def _latent_keep_mask(mask, batch: int, image_size: int, latent: int) -> np.ndarray:
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


def edit(model, images, mask, labels, *, rng, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False,
         return_tokens=False):
  """Zero-shot editing: regenerate the masked region of `images`, conditioned on the rest.

  Args:
    model: a `var_jax.VARModel`.
    images: (B, H, W, 3) uint8, or float in [-1, 1], at the model's image size.
    mask: keep-mask, 1 = keep the source token, 0 = generate: (H, W) or (B, H, W) at image size
      (area-averaged to the latent grid, kept where >= 0.5), or at the latent size (P, P).
      In-painting: zeros inside the box. Out-painting: ones inside the box.
    labels: class ids (B,) (num_classes = unconditional; other classes give class editing).
    rng, cfg, top_k, top_p, more_smooth, return_tokens: as in `sample`.
  """
  check_sampling_options(model, cfg, top_k, top_p)
  top_k = effective_top_k(model, top_k)
  labels_B = model.check_labels(labels, allow_null=True)
  rng = _check_rng(rng)
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  images = model.tokenizer.check_images(images)
  B = images.shape[0]
  if labels_B.shape[0] != B:
    raise InputError(f"{labels_B.shape[0]} labels for {B} images.")
  tc = model.tokenizer.config
  keep = _latent_keep_mask(mask, B, tc.image_size, tc.latent_size)
  masks = [jnp.asarray(m) for m in edit_masks_per_scale(keep, tc.patch_nums)]
  labels_B, images = _place(labels_B, images)
  out, tokens = _edit_jit(model.params, model.tokenizer.params, images, labels_B, rng, jnp.float32(cfg),
                          jnp.int32(top_k), jnp.float32(top_p), masks, var_config=model.config,
                          vae_config=model.tokenizer.config, more_smooth=bool(more_smooth))
  return (out, list(tokens)) if return_tokens else out
