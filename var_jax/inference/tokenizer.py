"""`Tokenizer`: the multi-scale VQVAE with its parameters, behind a small checked API.

    tok = var_jax.Tokenizer.from_torch("vae_ch160v4096z32.pth")
    idx_maps = tok.encode(images)      # float32 (B, H, W, 3) in [-1, 1] -> [int32 (B, pn, pn)] * K
    images = tok.decode(idx_maps)      # -> float32 (B, H, W, 3) in [-1, 1]
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.checkpoints import from_torch
from var_jax.errors import InputError
from var_jax.models.vqvae import VQVAE
from var_jax.models.vqvae_config import VQVAEConfig

# Images may exceed [-1, 1] by float rounding of the caller's own scaling; more is a caller bug.
_RANGE_SLACK = 1e-3


def _state_dict_from(path_or_state_dict) -> Mapping[str, np.ndarray]:
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    from var_jax.checkpoints.torch_pickle import load_torch_checkpoint
    return load_torch_checkpoint(path_or_state_dict)
  if isinstance(path_or_state_dict, Mapping):
    return {k: np.asarray(v) for k, v in path_or_state_dict.items()}
  raise InputError(f"expected a checkpoint path or a state dict, got {type(path_or_state_dict).__name__}.")


class Tokenizer:
  """The official VAR tokenizer (multi-scale VQVAE): config, params and jitted encode/decode."""

  def __init__(self, config: VQVAEConfig, params: Any):
    if not isinstance(config, VQVAEConfig):
      raise InputError(f"config must be a VQVAEConfig, got {type(config).__name__}.")
    self.config = config
    self.params = params
    self.module = VQVAE(config)

  @classmethod
  def from_torch(cls, path_or_state_dict, **config_overrides) -> "Tokenizer":
    """Builds the tokenizer from an official `.pth` file (or its state dict), without torch.

    The architecture is read from the tensor shapes; `config_overrides` set what shapes cannot
    tell (`patch_nums`, default the 256 px schedule; `dtype`).
    """
    sd = _state_dict_from(path_or_state_dict)
    config = from_torch.infer_vqvae_config(sd, **config_overrides)
    return cls(config, from_torch.vqvae_params_from_torch(sd, config))

  # -- checks ----------------------------------------------------------------------------------

  def check_images(self, images) -> jax.Array:
    """Validates a float (B, H, W, 3) batch in [-1, 1] of the configured size."""
    cfg = self.config
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
      raise InputError(f"images must be an array, got {type(images).__name__}.")
    if len(shape) != 4 or shape[-1] != cfg.in_channels:
      raise InputError(f"images must be (B, H, W, {cfg.in_channels}) NHWC, got shape {tuple(shape)}. "
                       "Transpose NCHW arrays with x.transpose(0, 2, 3, 1).")
    if shape[1:3] != (cfg.image_size, cfg.image_size):
      raise InputError(f"images are {shape[1]}x{shape[2]} but this tokenizer takes "
                       f"{cfg.image_size}x{cfg.image_size} (16 x last patch number {cfg.patch_nums[-1]}).")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise InputError(f"images must be floating point in [-1, 1], got dtype {dtype}. "
                       "For uint8 pixels use x / 127.5 - 1.")
    lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
      raise InputError(f"images must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]. "
                       "Scale [0, 1] images with 2x - 1 and uint8 with x / 127.5 - 1.")
    return jnp.asarray(images, jnp.float32)

  def check_index_maps(self, index_maps: Sequence) -> list[jax.Array]:
    """Validates a list of K int token maps (B, pn_k, pn_k) with ids in [0, vocab_size)."""
    cfg = self.config
    if not isinstance(index_maps, (list, tuple)) or len(index_maps) != cfg.num_scales:
      got = len(index_maps) if isinstance(index_maps, (list, tuple)) else type(index_maps).__name__
      raise InputError(f"index_maps must be a list of {cfg.num_scales} token maps "
                       f"(one per scale {cfg.patch_nums}), got {got}.")
    out = []
    batch = None
    for si, (pn, idx) in enumerate(zip(cfg.patch_nums, index_maps)):
      shape = tuple(getattr(idx, "shape", ()))
      if len(shape) != 3 or shape[1:] != (pn, pn):
        raise InputError(f"token map {si} must be (B, {pn}, {pn}), got shape {shape}.")
      if batch is None:
        batch = shape[0]
      elif shape[0] != batch:
        raise InputError(f"token map {si} has batch {shape[0]} but map 0 has {batch}.")
      if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise InputError(f"token map {si} must hold integer ids, got dtype {idx.dtype}.")
      lo, hi = int(jnp.min(idx)), int(jnp.max(idx))
      if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(f"token map {si} has ids in [{lo}, {hi}], outside [0, {cfg.vocab_size}).")
      out.append(jnp.asarray(idx, jnp.int32))
    return out

  # -- jitted operations -------------------------------------------------------------------------

  @functools.cached_property
  def _encode_jit(self):
    return jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=VQVAE.encode))

  @functools.cached_property
  def _decode_jit(self):
    return jax.jit(lambda p, idx: self.module.apply({"params": p}, idx, method=VQVAE.decode))

  def encode(self, images) -> list[jax.Array]:
    """float32 (B, H, W, 3) in [-1, 1] -> list of int32 (B, pn, pn), coarse to fine."""
    return list(self._encode_jit(self.params, self.check_images(images)))

  def decode(self, index_maps: Sequence) -> jax.Array:
    """List of int32 (B, pn, pn) token maps -> float32 (B, H, W, 3) in [-1, 1]."""
    return self._decode_jit(self.params, self.check_index_maps(index_maps))

  def apply(self, *args, method, **kwargs):
    """`module.apply` with this tokenizer's params, for the other VQVAE methods."""
    return self.module.apply({"params": self.params}, *args, method=method, **kwargs)
