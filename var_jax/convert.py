"""Official PyTorch state dicts -> Flax parameter trees (and the configs their shapes imply).

Conversion is a key rename plus layout changes (VAR_SPEC §1): conv (O, I, kh, kw) -> (kh, kw, I, O),
linear (out, in) -> (in, out). The result is checked against the Flax model's own parameter shapes
(from `jax.eval_shape`, no allocation); every missing, unexpected or mis-shaped key is reported at
once.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import numpy as np

from var_jax.errors import CheckpointError
from var_jax.models.vqvae_config import PATCH_NUMS_256, VQVAEConfig

Path = tuple[str, ...]

# Buffers of the official models: recomputed from the config here, never trained.
VQVAE_BUFFERS = ("quantize.ema_vocab_hit_SV",)


def _fold_indices(parts: list[str]) -> list[str]:
  """['down', '0', 'block', '1', 'conv1'] -> ['down_0', 'block_1', 'conv1']."""
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return out


def check_and_assign(converted: Mapping[Path, np.ndarray], abstract_params: Any, what: str) -> dict:
  """Places converted arrays into the structure of `abstract_params`, checking keys and shapes."""
  expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_params))
  expected = {k: v for k, v in expected.items()}
  missing = sorted("/".join(k) for k in expected if k not in converted)
  unexpected = sorted("/".join(k) for k in converted if k not in expected)
  misshaped = sorted(
      f"{'/'.join(k)}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
      for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape))
  if missing or unexpected or misshaped:
    lines = [f"The {what} checkpoint does not fit the model config."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    lines.append("Check that the file is the right model and that config overrides match it.")
    raise CheckpointError("\n".join(lines))
  out = {k: np.asarray(converted[k], dtype=np.float32) for k in expected}
  return flax.traverse_util.unflatten_dict(out)


def _require(sd: Mapping[str, np.ndarray], key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise CheckpointError(
        f"{what} checkpoint has no '{key}': this does not look like an official {what} state dict "
        f"({len(sd)} keys, first few: {sorted(sd)[:5]}).")
  return sd[key]


# -- VQVAE -------------------------------------------------------------------------------------

def infer_vqvae_config(sd: Mapping[str, np.ndarray], **overrides) -> VQVAEConfig:
  """Reads the tokenizer architecture from state-dict shapes; `overrides` win (patch_nums etc.)."""
  emb = _require(sd, "quantize.embedding.weight", "VQVAE")
  conv_in = _require(sd, "encoder.conv_in.weight", "VQVAE")
  ch = int(conv_in.shape[0])
  levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
  if not levels:
    raise CheckpointError("VQVAE checkpoint has no encoder.down.* keys.")
  ch_mult = tuple(int(_require(sd, f"encoder.down.{i}.block.0.conv1.weight", "VQVAE").shape[0]) // ch
                  for i in levels)
  num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
  last = levels[-1]
  phi_keys = [k for k in sd if k.startswith("quantize.quant_resi.") and k.endswith(".weight")]
  if any(".qresi_ls." in k for k in phi_keys):
    share = len(phi_keys)
  elif any(k == "quantize.quant_resi.qresi.weight" for k in phi_keys):
    share = 1
  else:
    share = 0
  values = dict(
      vocab_size=int(emb.shape[0]), z_channels=int(emb.shape[1]), ch=ch, ch_mult=ch_mult,
      num_res_blocks=num_res_blocks, in_channels=int(conv_in.shape[1]),
      using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in sd,
      using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
      quant_conv_ks=int(_require(sd, "quant_conv.weight", "VQVAE").shape[-1]),
      share_quant_resi=share, patch_nums=PATCH_NUMS_256)
  if not phi_keys:
    values["quant_resi"] = 0.0
  values.update(overrides)
  return VQVAEConfig.from_mapping(values)


def _vqvae_path(key: str) -> Path:
  parts = key.split(".")
  if parts[:2] == ["quantize", "quant_resi"]:
    rest = parts[2:]
    if rest[0] == "qresi_ls":
      idx, leaf = int(rest[1]), rest[2]
    elif rest[0] == "qresi":
      idx, leaf = 0, rest[1]
    else:
      idx, leaf = int(rest[0]), rest[1]
    return ("quantize", f"phi_{idx}", "conv", leaf)
  return tuple(_fold_indices(parts))


def vqvae_params_from_torch(sd: Mapping[str, np.ndarray], config: VQVAEConfig) -> dict:
  """Official VQVAE state dict -> Flax params of `var_jax.models.vqvae.VQVAE(config)`."""
  from var_jax.models import vqvae  # local: keeps this module light for config inference
  import jax
  import jax.numpy as jnp

  converted: dict[Path, np.ndarray] = {}
  for key, value in sd.items():
    if key in VQVAE_BUFFERS:
      continue
    path = _vqvae_path(key)
    value = np.asarray(value)
    leaf = path[-1]
    if leaf == "weight":
      if path[-2] == "embedding":
        path = path[:-1] + ("embedding",)
      elif value.ndim == 4:
        path, value = path[:-1] + ("kernel",), value.transpose(2, 3, 1, 0)
      elif value.ndim == 1:
        path = path[:-1] + ("scale",)
    converted[path] = value
  size = config.image_size
  abstract = jax.eval_shape(
      lambda: vqvae.VQVAE(config).init(jax.random.key(0), jnp.zeros((1, size, size, config.in_channels))))
  return check_and_assign(converted, abstract["params"], "VQVAE")

