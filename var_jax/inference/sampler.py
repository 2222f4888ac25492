"""Class-conditional sampling: one jitted scale-by-scale loop with a KV cache (also edit's loop).

`sample` implements the official `autoregressive_infer_cfg` (VAR_SPEC §6): the batch is doubled
with the null class for classifier-free guidance, the guidance ramps linearly over scales, logits
are filtered by top-k then top-p with the official semantics, and each scale's tokens update f_hat
through the tokenizer's `next_autoregressive_input`. All scales, all layers and the final decode
are one `jax.jit`; the KV cache is preallocated for the whole sequence and written scale by scale.
`cfg`, `top_k` and `top_p` are traced, so changing them does not recompile.

Without guidance (cfg=0) the loop runs B sequences, not 2B: half the transformer's work.

Collaborative decoding (CoDe, Chen et al., CVPR 2025): with a `refiner` (a second VARModel on the
same tokenizer, usually a smaller one), `model` drafts scales [0, draft_scales) and the refiner
fills its KV cache with the drafted prefix in one teacher-forcing pass, then samples the remaining
scales. Image i's random draws at scale si come from the same key whichever model runs the scale,
so draft_scales = K is plain sampling with `model` and draft_scales = 0 with the refiner.

`var_jax.inference.edit` runs the same loop with the kept tokens forced (zero-shot editing).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from var_jax.inference import placement
from var_jax.errors import InputError
from var_jax.kernels import mesh_sharding
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops import attention as attention_ops
from var_jax.inference.filters import (check_sampling_options, effective_top_k, filter_top_k_top_p,
                                        guidance_scale)


def to_uint8(images_BHWC: jax.Array) -> jax.Array:
  """[-1, 1] floats -> uint8, rounding (x + 1) / 2 * 255 to nearest and clipping."""
  return jnp.clip(jnp.round((images_BHWC + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# -- the generation loop -----------------------------------------------------------------------

def image_keys(rng: jax.Array, batch: int) -> jax.Array:
  """One key per image: `fold_in(rng, i)` for image i, or `rng` itself when it is (batch,) keys.

  Every random draw of image i comes from its own key, so image i depends only on (rng, i) and
  its label: not on the batch size, the padding, the device count or the number of hosts.
  """
  if rng.ndim == 0:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch, dtype=jnp.uint32))
  return rng


def _split_over_batch(x: jax.Array) -> jax.Array:
  """Keeps a batch-leading output split over the active mesh's batch axes (not gathered)."""
  axes = mesh_sharding.batch_axes()
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def _decode(vae, vae_params, f_hat):
  """f_hat (B, h, w, C) -> images in [-1, 1]; on CPU one image per batch shard at a time."""
  decode = lambda f: vae.apply({"params": vae_params}, f, method=VQVAE.decode_fhat)
  B = f_hat.shape[0]
  if attention_ops.computation_platform() != "cpu" or B == 1:
    return decode(f_hat)
  # On CPU the decoder's full-resolution convs run faster per image than batched (cache bound:
  # the public call at batch 8, float32, 41.79 s one image per step against 51.10 s batched,
  # both with Winograd F(4x4)), so images go through one per batch shard at a time;
  # accelerators keep the batch.
  shards = mesh_sharding.batch_shards()
  shards = shards if B % shards == 0 else 1
  groups = f_hat.reshape((shards, B // shards) + f_hat.shape[1:]).swapaxes(0, 1)
  images = jax.lax.map(decode, groups)  # (B / shards, shards, H, W, 3): each step one per shard
  return images.swapaxes(0, 1).reshape((B,) + images.shape[2:])


def generate(var_params, vae_params, labels_B, rng, cfg, top_k, top_p, edit_tokens, edit_masks,
             refiner_params=None, *, var_config: VARConfig, vae_config: VQVAEConfig,
             more_smooth: bool, guided: bool = True, refiner_config: VARConfig | None = None,
             draft_scales: int | None = None):
  """All scales, all layers and the decode. Returns (uint8 images, list of int32 token maps).

  Guidance (`guided`) runs 2B sequences laid out image by image (row 2i conditional, row 2i + 1
  the null class), so the halves of an image's pair sit on the same device wherever the batch is
  split; without it B sequences. With `refiner_config`, scales [draft_scales, K) run on the
  refiner (`refiner_params`), which first prefills its cache with scales [0, draft_scales).
  """
  vae = VQVAE(vae_config)
  codebook = vae.apply({"params": vae_params}, method=VQVAE.codebook)
  B = labels_B.shape[0]
  K, Cvae = var_config.num_scales, var_config.z_channels
  keys_B = image_keys(rng, B)
  rows = 2 if guided else 1
  labels_rB = labels_B
  if guided:
    labels_rB = jnp.stack([labels_B, jnp.full_like(labels_B, var_config.num_classes)],
                          axis=1).reshape(2 * B)
  first_refined = K if refiner_config is None else draft_scales
  latent = var_config.patch_nums[-1]
  f_hat = jnp.zeros((B, latent, latent, Cvae), jnp.float32)
  cache = None  # the KV cache of the model running the current scale
  inputs_BlC = []  # the input of every scale after the first: (B, pn**2, Cvae) each
  tokens = []
  for si, pn in enumerate(var_config.patch_nums):
    refining = si >= first_refined
    config, params = (refiner_config, refiner_params) if refining else (var_config, var_params)
    if refining and si == first_refined and si > 0:
      # The refiner's first scale: one pass over the drafted prefix fills its cache.
      x_rLC = jnp.repeat(jnp.concatenate(inputs_BlC, axis=1), rows, axis=0)
      logits_rLV, mutated = VAR(config, decode_scale=si, prefill=True).apply(
          {"params": params}, labels_rB, x_rLC, mutable=["cache"])
      logits_rlV = logits_rLV[:, logits_rLV.shape[1] - pn * pn:]
    else:
      variables = {"params": params} if si == 0 else {"params": params, "cache": cache}
      x_rlC = None if si == 0 else jnp.repeat(inputs_BlC[-1], rows, axis=0)
      logits_rlV, mutated = VAR(config, decode_scale=si).apply(variables, labels_rB, x_rlC,
                                                               mutable=["cache"])
    cache = mutated["cache"]
    if guided:
      t = guidance_scale(cfg, si, K)
      pairs = logits_rlV.reshape((B, 2) + logits_rlV.shape[1:])
      logits_BlV = (1.0 + t) * pairs[:, 0] - t * pairs[:, 1]
    else:
      logits_BlV = logits_rlV
    scale_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, si)))(keys_B)
    key_idx, key_gumbel = scale_keys[:, 0], scale_keys[:, 1]
    logits_BlV = filter_top_k_top_p(logits_BlV, top_k, top_p)
    idx_Bl = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(
        key_idx, logits_BlV).astype(jnp.int32)
    if more_smooth:
      ratio = si / (K - 1) if K > 1 else 0.0
      tau = max(0.27 * (1 - ratio * 0.95), 0.005)
      gumbel = -jnp.log(jax.vmap(
          lambda k: jax.random.exponential(k, logits_BlV.shape[1:], jnp.float32))(key_gumbel))
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
      inputs_BlC.append(nxt.reshape(B, -1, Cvae))
  images = _split_over_batch(to_uint8(_decode(vae, vae_params, f_hat)))
  return images, [_split_over_batch(t) for t in tokens]


STATIC_ARGNAMES = ("var_config", "vae_config", "more_smooth", "guided", "refiner_config",
                   "draft_scales")
_generate_jit = jax.jit(generate, static_argnames=STATIC_ARGNAMES)


# -- argument checks ---------------------------------------------------------------------------

def check_rng(rng, batch: int | None = None) -> jax.Array:
  """A typed PRNG key, or `batch` of them (one per image); raw uint32 key data is wrapped."""
  if isinstance(rng, (int, np.integer)):
    raise InputError("rng must be a JAX PRNG key, e.g. jax.random.key(0), not an int.")
  try:
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
        raise AttributeError
      rng = jax.random.wrap_key_data(rng)
  except AttributeError:
    raise InputError(f"rng must be a JAX PRNG key (jax.random.key(seed)) or one key per image, got "
                     f"{type(rng).__name__}.") from None
  if rng.ndim == 1 and batch is not None and rng.shape[0] != batch:
    raise InputError(f"rng holds {rng.shape[0]} keys for {batch} images; pass one key, or one per image.")
  if rng.ndim > 1 or (rng.ndim == 1 and batch is None):
    raise InputError(f"rng must be one key or a (batch,) array of keys, got shape {rng.shape}.")
  return rng


def check_labels(model, labels) -> np.ndarray | jax.ShapeDtypeStruct:
  if isinstance(labels, jax.ShapeDtypeStruct):  # AOT: only the batch size matters
    if len(labels.shape) != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise InputError(f"abstract labels must be an integer (B,) ShapeDtypeStruct, got {labels}.")
    return jax.ShapeDtypeStruct(labels.shape, jnp.int32)
  return model.check_labels(labels, allow_null=True)


@dataclasses.dataclass(frozen=True)
class Call:
  """One placed inference call: the jitted program, its placed arguments and the mesh.

  `run()` executes it and drops the batch padding; `lower()` gives the `jax.stages.Lowered` of
  exactly that program (what `var_jax.aot.lower_sample` / `lower_edit` return).
  """
  fn: Any
  jitted: Any
  args: tuple
  static: dict
  mesh: Mesh
  batch: int

  def lower(self, *, fresh: bool = False) -> jax.stages.Lowered:
    """Traces and lowers the program. fresh=True traces anew, past jit's trace cache (for
    lowering under a different trace-time setting, e.g. `aot.scan_unroll`)."""
    # A new function object: jit's trace cache is keyed on the function, so jitting `self.fn`
    # itself again would hand back the program traced before.
    jitted = (jax.jit(functools.partial(self.fn), static_argnames=tuple(self.static)) if fresh
              else self.jitted)
    with placement.batch_context(self.mesh):
      return jitted.lower(*self.args, **self.static)

  def run(self) -> tuple[jax.Array, list[jax.Array]]:
    with placement.batch_context(self.mesh):
      images, tokens = self.jitted(*self.args, **self.static)
    if images.shape[0] != self.batch:  # drop the padding (a static slice: no index transfer)
      drop = lambda x: jax.lax.slice_in_dim(x, 0, self.batch, axis=0)
      images, tokens = drop(images), [drop(t) for t in tokens]
    return images, list(tokens)


def place_common(model, labels_B, rng, cfg, top_k, top_p, mesh):
  """(mesh, placement, labels, keys, (cfg, top_k, top_p)) placed on the mesh.

  With an abstract model (ShapeDtypeStruct params) every input becomes a ShapeDtypeStruct with
  its sharding instead, so the same code describes the program for devices this host cannot
  reach (AOT).
  """
  mesh = placement.check_mesh(mesh)
  abstract = placement.is_abstract(model)
  B = labels_B.shape[0]
  size = placement.padded_size(B, mesh)
  placed = placement.place(model, mesh)
  rng = check_rng(rng, B) if not isinstance(rng, jax.ShapeDtypeStruct) else rng
  scalars = [np.asarray(v, dtype) for v, dtype in ((cfg, np.float32), (top_k, np.int32), (top_p, np.float32))]
  if abstract or isinstance(labels_B, jax.ShapeDtypeStruct):
    labels = placement.put_batch(jax.ShapeDtypeStruct((size,), jnp.int32), mesh)
    keys = placement.as_abstract(rng)
    keys = (placement.put_batch(jax.ShapeDtypeStruct((size,), keys.dtype), mesh) if keys.ndim
            else placement.put_replicated(keys, mesh))
    scalars = [placement.put_replicated(placement.as_abstract(v), mesh) for v in scalars]
    return mesh, placed, labels, keys, tuple(scalars)
  labels = placement.put_batch(placement.pad_batch(labels_B, size), mesh)
  if rng.ndim == 1:  # one key per image: pad with copies of the first (their images are dropped)
    keys = jnp.concatenate([rng, jnp.repeat(rng[:1], size - B)]) if size != B else rng
    keys = jax.device_put(keys, placement.batch_sharding(mesh))
  else:
    keys = jax.device_put(rng, placement.replicated(mesh))
  return mesh, placed, labels, keys, tuple(placement.put_replicated(v, mesh) for v in scalars)


def same_tokenizer(a, b) -> bool:
  """Whether two Tokenizers are the same: one object, or equal configs and equal params."""
  if a is b or a.params is b.params:
    return a.config == b.config
  if a.config != b.config:
    return False
  leaves_a, leaves_b = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
  if jax.tree.structure(a.params) != jax.tree.structure(b.params):
    return False
  if placement.is_abstract(a) or placement.is_abstract(b):  # AOT: layouts only
    return all(np.shape(x) == np.shape(y) for x, y in zip(leaves_a, leaves_b))
  return all(np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(leaves_a, leaves_b))


def check_refiner(model, refiner, draft_scales) -> int | None:
  """The checked number of drafted scales for collaborative decoding (None: no refiner).

  The refiner must be a VARModel on the same tokenizer (config and weights) with the same classes;
  draft_scales defaults to all but the last two scales (CoDe's 8 + 2 split of VAR's 10).
  """
  K = model.config.num_scales
  if refiner is None:
    if draft_scales is not None:
      raise InputError("draft_scales needs a refiner: pass refiner=<a second VARModel on the same "
                       "tokenizer> (or leave draft_scales unset for plain sampling).")
    return None
  if not hasattr(refiner, "tokenizer") or not hasattr(refiner, "placements"):
    raise InputError(f"refiner must be a var_jax.VARModel, got {type(refiner).__name__}.")
  if not same_tokenizer(model.tokenizer, refiner.tokenizer):
    raise InputError(
        "the refiner does not share the drafter's tokenizer (config or weights differ): "
        "collaborative decoding passes token maps between the models, so both must be built on "
        "one tokenizer (e.g. load both with the same vae checkpoint).")
  if refiner.config.num_classes != model.config.num_classes:
    raise InputError(f"the refiner has {refiner.config.num_classes} classes and the drafter "
                     f"{model.config.num_classes}: both must be trained on the same classes.")
  if draft_scales is None:
    draft_scales = max(K - 2, 0)
  if isinstance(draft_scales, bool) or not isinstance(draft_scales, (int, np.integer)) \
      or not 0 <= draft_scales <= K:
    raise InputError(f"draft_scales must be an int in [0, {K}] (scales the drafter samples before "
                     f"the refiner takes over), got {draft_scales!r}.")
  return int(draft_scales)


def build_sample_call(model, labels, *, rng, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False,
                      mesh=None, refiner=None, draft_scales=None) -> Call:
  """Checks the arguments and places everything for `sample` (and `aot.lower_sample`)."""
  check_sampling_options(model, cfg, top_k, top_p)
  draft_scales = check_refiner(model, refiner, draft_scales)
  top_k = effective_top_k(model, top_k)
  labels_B = check_labels(model, labels)
  mesh, placed, labels, keys, scalars = place_common(model, labels_B, rng, cfg, top_k, top_p, mesh)
  static = dict(var_config=model.config, vae_config=model.tokenizer.config,
                more_smooth=bool(more_smooth), guided=float(cfg) != 0.0)
  refiner_params = None
  if refiner is not None:
    refiner_params = placement.place(refiner, mesh).var_params
    static.update(refiner_config=refiner.config, draft_scales=draft_scales)
  args = (placed.var_params, placed.decoding_vae_params, labels, keys, *scalars, None, None, refiner_params)
  return Call(generate, _generate_jit, args, static, mesh, labels_B.shape[0])


# -- public API --------------------------------------------------------------------------------

def sample(model, labels, *, rng, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False, return_tokens=False,
           mesh=None, refiner=None, draft_scales=None):
  """Generates class-conditional images with a VARModel.

  Args:
    model: a `var_jax.VARModel` (params + tokenizer).
    labels: int class ids (B,), in [0, num_classes); num_classes itself means unconditional.
      Any B works on any device count (the batch is padded to the mesh and the padding dropped).
    rng: a JAX PRNG key, or (B,) keys, one per image. Image i draws only from its own key
      (`fold_in(rng, i)` for a single key), so it depends only on (rng, i, labels[i]): the same
      key gives the same images whatever the batch split, the device count or the host count.
    cfg: classifier-free guidance scale, ramped linearly from 0 at the first scale to cfg at the
      last. cfg=0 runs B sequences instead of 2B (for guidance-free models).
    top_k: keep the k largest logits per token; 0, or any k >= the vocabulary size (e.g. the
      default 900 on a smaller vocabulary), keeps every token.
    top_p: nucleus filtering on top of top-k (0 = off).
    more_smooth: the official Gumbel-softmax smoothing of the residual (for visualisation).
    return_tokens: also return the per-scale int32 token maps (B, pn, pn).
    mesh: the devices to run on (a `jax.sharding.Mesh` with axes among "data", "fsdp",
      "tensor"; e.g. `var_jax.sampling_mesh(tensor=4)`). None: every local device on "data".
      The batch is split over data x fsdp, the weights by their logical axes; they are placed
      once per mesh and stay on the devices for later calls.
    refiner: collaborative decoding: a second VARModel on the same tokenizer (typically smaller)
      that samples the last scales after `model` drafted the first ones; both run in one program
      with their weights on the mesh.
    draft_scales: how many scales `model` drafts before the refiner takes over (default: all but
      the last two). draft_scales = num_scales is plain sampling with `model`, 0 with the refiner.

  Returns:
    uint8 images (B, H, W, 3), or (images, token maps) with return_tokens=True.
  """
  images, tokens = build_sample_call(model, labels, rng=rng, cfg=cfg, top_k=top_k, top_p=top_p,
                                     more_smooth=more_smooth, mesh=mesh, refiner=refiner,
                                     draft_scales=draft_scales).run()
  return (images, tokens) if return_tokens else images


