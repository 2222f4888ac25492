"""`VARModel`: the VAR transformer with its params and its tokenizer, behind a checked API.

    tok = var_jax.Tokenizer.from_torch("vae_ch160v4096z32.pth")
    model = var_jax.VARModel.from_torch("var_d16.pth", tok)
    logits = model.logits(labels_B, tok.encode(images))   # (B, L, V) float32, eval mode
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from var_jax.checkpoints import from_torch
from var_jax.inference import placement
from var_jax.errors import InputError
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae import VQVAE
from var_jax.inference.tokenizer import Tokenizer, _state_dict_from


class VARModel:
  """A VAR transformer (config, params, Flax module) bound to the tokenizer it was trained with."""

  def __init__(self, config: VARConfig, params: Any, tokenizer: Tokenizer):
    if not isinstance(config, VARConfig):
      raise InputError(f"config must be a VARConfig, got {type(config).__name__}.")
    if not isinstance(tokenizer, Tokenizer):
      raise InputError(f"tokenizer must be a var_jax.Tokenizer, got {type(tokenizer).__name__}.")
    tc = tokenizer.config
    if (tc.vocab_size, tc.z_channels, tc.patch_nums) != (config.vocab_size, config.z_channels,
                                                         config.patch_nums):
      raise InputError(
          f"VAR config (vocab {config.vocab_size}, Cvae {config.z_channels}, patch_nums "
          f"{config.patch_nums}) does not fit the tokenizer (vocab {tc.vocab_size}, Cvae "
          f"{tc.z_channels}, patch_nums {tc.patch_nums}).")
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.module = VAR(config)
    # Device copies of the weights by mesh, made by `var_jax.inference.placement.place` on first use
    # (sample, edit, logits) and reused while `params` and `tokenizer.params` stay the same objects.
    self.placements: dict = {}

  @classmethod
  def from_torch(cls, var_path_or_sd, tokenizer: Tokenizer, **config_overrides) -> "VARModel":
    """Converts an official `var_d*.pth` (or its state dict) for use with `tokenizer`.

    depth, width, heads, shared AdaLN and the class count are read from the shapes; patch_nums
    come from the tokenizer. `config_overrides` set numerics such as `dtype`, `attention_impl`.
    """
    if not isinstance(tokenizer, Tokenizer):
      raise InputError(f"tokenizer must be a var_jax.Tokenizer, got {type(tokenizer).__name__}.")
    sd = _state_dict_from(var_path_or_sd)
    tc = tokenizer.config
    config = from_torch.infer_var_config(sd, patch_nums=tc.patch_nums, vocab_size=tc.vocab_size,
                                      z_channels=tc.z_channels, **config_overrides)
    return cls(config, from_torch.var_params_from_torch(sd, config), tokenizer)

  def check_labels(self, labels, *, allow_null: bool) -> np.ndarray:
    """int class ids (B,) in [0, num_classes) (or == num_classes, the null class, if allowed),
    returned as a host int32 array."""
    labels = np.asarray(labels)
    hi = self.config.num_classes + (1 if allow_null else 0)
    if labels.ndim != 1 or labels.size == 0:
      raise InputError(f"labels must be a non-empty 1-D array of class ids, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
      raise InputError(f"labels must be integers, got dtype {labels.dtype}.")
    bad = labels[(labels < 0) | (labels >= hi)]
    if bad.size:
      raise InputError(f"class ids {sorted(set(bad.tolist()))[:10]} are outside [0, {hi}) for this "
                       f"model with {self.config.num_classes} classes"
                       + (f" ({self.config.num_classes} = unconditional)." if allow_null else "."))
    return labels.astype(np.int32)

  @functools.cached_property
  def _logits_jit(self):
    def fn(var_params, vae_params, labels, idx_maps):
      x = self.tokenizer.module.apply({"params": vae_params}, idx_maps, method=VQVAE.indices_to_var_input)
      return self.module.apply({"params": var_params}, labels, x)
    return jax.jit(fn)

  def logits(self, labels_B, index_maps: Sequence, *, mesh=None) -> jax.Array:
    """Teacher-forcing forward in eval mode: (B, L, V) float32 logits of every token.

    index_maps: the tokenizer's list of (B, pn, pn) token maps. Token t's logits predict token t
    from the class and every token of coarser scales.
    mesh: as in `var_jax.sample` (None: every local device; the batch is split over them).
    """
    labels = self.check_labels(labels_B, allow_null=True)
    idx = [np.asarray(m) for m in self.tokenizer.check_index_maps(index_maps)]
    B = labels.shape[0]
    if idx[0].shape[0] != B:
      raise InputError(f"{B} labels but token maps of batch {idx[0].shape[0]}.")
    mesh = placement.check_mesh(mesh)
    placed = placement.place(self, mesh)
    size = placement.padded_size(B, mesh)
    labels = placement.put_batch(placement.pad_batch(labels, size), mesh)
    idx = [placement.put_batch(placement.pad_batch(m, size), mesh) for m in idx]
    with placement.batch_context(mesh):
      out = self._logits_jit(placed.var_params, placed.vae_params, labels, idx)
    return out if size == B else out[:B]

  def num_params(self) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))
