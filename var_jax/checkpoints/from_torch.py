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
  abstract = vqvae.param_shapes(config)
  return check_and_assign(converted, abstract, "VQVAE")



# -- VAR -----------------------------------------------------------------------------------------

def infer_var_config(sd: Mapping[str, np.ndarray], *, patch_nums, vocab_size: int | None = None,
                     z_channels: int | None = None, **overrides):
  """Reads the VAR architecture from state-dict shapes and checks it against the tokenizer's."""
  from var_jax import scales
  from var_jax.models.var_config import VARConfig

  class_emb = _require(sd, "class_emb.weight", "VAR")
  head = _require(sd, "head.weight", "VAR")
  word = _require(sd, "word_embed.weight", "VAR")
  pos = _require(sd, "pos_1LC", "VAR")
  C = int(class_emb.shape[1])
  depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
  if depth == 0:
    raise CheckpointError("VAR checkpoint has no blocks.* keys.")
  l2 = "blocks.0.attn.scale_mul_1H11" in sd
  heads = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1]) if l2 else overrides.pop("num_heads", depth)
  fc1 = _require(sd, "blocks.0.ffn.fc1.weight", "VAR")
  values = dict(depth=depth, embed_dim=C, num_heads=heads, mlp_ratio=fc1.shape[0] / C,
                num_classes=int(class_emb.shape[0]) - 1, vocab_size=int(head.shape[0]),
                z_channels=int(word.shape[1]), patch_nums=tuple(patch_nums),
                shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2)
  if vocab_size is not None and vocab_size != values["vocab_size"]:
    raise CheckpointError(
        f"The VAR checkpoint predicts {values['vocab_size']} codes but the tokenizer has {vocab_size}: "
        "this VAR was trained with another tokenizer. Load the VQVAE it was released with.")
  if z_channels is not None and z_channels != values["z_channels"]:
    raise CheckpointError(
        f"The VAR checkpoint embeds {values['z_channels']}-dim latents but the tokenizer's are "
        f"{z_channels}-dim: this VAR was trained with another tokenizer.")
  if int(pos.shape[1]) != scales.seq_len(patch_nums):
    raise CheckpointError(
        f"The VAR checkpoint has {pos.shape[1]} positions but patch_nums {tuple(patch_nums)} give "
        f"{scales.seq_len(patch_nums)} tokens: pass the patch_nums it was trained with "
        "(256 px: 1,2,3,4,5,6,8,10,13,16; 512 px: 1,2,3,4,6,9,13,18,24,32).")
  values.update(overrides)
  return VARConfig.from_mapping(values)


def _check_var_buffers(sd: Mapping[str, np.ndarray], config) -> None:
  """The official buffers depend on patch_nums only: they must equal what we recompute."""
  from var_jax import scales
  if "lvl_1L" in sd and not np.array_equal(np.asarray(sd["lvl_1L"]).reshape(-1),
                                           scales.scale_ids(config.patch_nums)):
    raise CheckpointError("The checkpoint's lvl_1L buffer does not match patch_nums "
                          f"{config.patch_nums}: the model was trained with another scale schedule.")
  if "attn_bias_for_masking" in sd:
    bias = np.asarray(sd["attn_bias_for_masking"]).reshape(config.seq_len, config.seq_len)
    if not np.array_equal(bias == 0, scales.block_causal_mask(config.patch_nums)):
      raise CheckpointError("The checkpoint's attn_bias_for_masking is not the block-causal mask of "
                            f"patch_nums {config.patch_nums}.")
  for key, value in sd.items():
    if key.endswith("attn.zero_k_bias") and np.any(np.asarray(value) != 0):
      raise CheckpointError(f"{key} is not zero: this is not an official VAR checkpoint.")


def _var_leaf(key: str, value: np.ndarray, config) -> tuple[Path, np.ndarray] | None:
  """One official VAR tensor -> (Flax path, array), or None for buffers."""
  H, D, C = config.num_heads, config.head_dim, config.embed_dim
  if key in ("lvl_1L", "attn_bias_for_masking") or key.endswith("zero_k_bias"):
    return None
  simple = {
      "pos_start": ("pos_start",), "pos_1LC": ("pos_1LC",),
      "class_emb.weight": ("class_emb", "embedding"), "lvl_embed.weight": ("lvl_embed", "embedding"),
  }
  if key in simple:
    return simple[key], value
  m = re.match(r"blocks\.\d+\.(.*)", key)
  prefix: Path = ("blocks",) if m else ()
  rest = m.group(1) if m else key
  rest = rest.replace("ada_lin.1.", "ada_lin.").replace("shared_ada_lin.1.", "shared_ada_lin.")
  if rest == "attn.mat_qkv.weight":
    return prefix + ("attn", "mat_qkv"), value.reshape(3, H, D, C).transpose(3, 0, 1, 2)
  if rest in ("attn.q_bias", "attn.v_bias"):
    return prefix + tuple(rest.split(".")), value.reshape(H, D)
  if rest == "attn.scale_mul_1H11":
    return prefix + ("attn", "scale_mul_1H11"), value.reshape(-1)
  if rest == "attn.proj.weight":
    return prefix + ("attn", "proj_kernel"), value.T.reshape(H, D, C)
  if rest == "attn.proj.bias":
    return prefix + ("attn", "proj_bias"), value
  if rest == "ada_gss":
    return prefix + ("ada_gss",), value.reshape(6, C)
  parts = rest.split(".")
  if parts[-1] == "weight" and value.ndim == 2:
    return prefix + tuple(parts[:-1]) + ("kernel",), value.T
  return prefix + tuple(parts), value


def var_params_from_torch(sd: Mapping[str, np.ndarray], config) -> dict:
  """Official VAR state dict -> Flax params of `var_jax.models.var.VAR(config)` (blocks stacked)."""
  from flax.core import meta
  from var_jax.models import var as var_model

  _check_var_buffers(sd, config)
  per_layer: dict[Path, dict[int, np.ndarray]] = {}
  converted: dict[Path, np.ndarray] = {}
  for key, value in sd.items():
    leaf = _var_leaf(key, np.asarray(value), config)
    if leaf is None:
      continue
    path, array = leaf
    if path[0] == "blocks":
      per_layer.setdefault(path, {})[int(key.split(".")[1])] = array
    else:
      converted[path] = array
  for path, layers in per_layer.items():
    if sorted(layers) != list(range(config.depth)):
      missing = sorted(set(range(config.depth)) - set(layers))
      raise CheckpointError(f"VAR checkpoint lacks {'/'.join(path)} for blocks {missing}.")
    shapes = {i: layers[i].shape for i in range(config.depth)}
    if len(set(shapes.values())) > 1:
      first = shapes[0]
      odd = [f"blocks.{i}: {s}" for i, s in shapes.items() if s != first]
      raise CheckpointError(f"VAR checkpoint has mis-shaped {'/'.join(path)} across blocks (block 0: "
                            f"{first}; {', '.join(odd)}): the file is corrupt or mixes two models.")
    converted[path] = np.stack([layers[i] for i in range(config.depth)])
  abstract = var_model.param_shapes(config)
  return check_and_assign(converted, meta.unbox(abstract), "VAR")
