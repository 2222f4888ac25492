"""Model FLOPs of one VAR training example (forward + backward), the numerator of MFU.

One count, used by the trainer's logged MFU (`train/train_var.py`), the AOT roofline
(`aot.py`) and the benchmarks. A multiply-add is 2 FLOPs; only matmuls count (norms, softmax,
GELU, the optimizer update are elementwise and left out, as MFU conventionally does). Per part:

* block linears (qkv, proj, fc1, fc2): applied to every token, 2 FLOPs per weight per token
  forward and 4 backward (the weight gradient and the input gradient), so 6 per weight per token;
* head: the same 6 per weight per token;
* word_embed: applied to the tokens after the first scale (the first scale's tokens are the
  class token + pos_start). Its input is the tokenizer's data, which needs no gradient: 2 forward
  + 2 for the weight gradient = 4 per weight per token;
* AdaLN projections (each block's 6C x C, or one shared, and the head's 2C x C): applied once per
  image to the class condition, 6 per weight per image (the class embedding is a lookup);
* attention: QK^T and PV are 2 C FLOPs each per (query, key) pair per layer forward, twice that
  backward (dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q): 12 C per pair that the
  block-causal mask lets through. A dense XLA attention computes the masked pairs too (all L²);
  those are not model FLOPs.

With `prog_si` (a progressive-training stage) the step runs on scales 0..prog_si only, i.e. the
first ed = sum(pn² for those scales) tokens, and only their pairs are visible.

No remat recompute is counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

from var_jax import scales
from var_jax.errors import ConfigError
from var_jax.models.var_config import VARConfig


def stage_patch_nums(var_cfg: VARConfig, prog_si: int | None = None) -> tuple[int, ...]:
  """The scales a step of stage `prog_si` trains on (all of them for None)."""
  if prog_si is None:
    return var_cfg.patch_nums
  if isinstance(prog_si, bool) or not 0 <= prog_si < var_cfg.num_scales:
    raise ConfigError(f"prog_si must be in [0, {var_cfg.num_scales - 1}] or None, got {prog_si!r}.")
  return var_cfg.patch_nums[:prog_si + 1]


def block_weights_per_token(var_cfg: VARConfig) -> int:
  """Weights of one block applied to every token: qkv (3C x C), proj (C x C), fc1, fc2."""
  C = var_cfg.embed_dim
  return 3 * C * C + C * C + 2 * C * var_cfg.mlp_dim


def adaln_weights(var_cfg: VARConfig) -> int:
  """Weights applied once per image: the blocks' AdaLN (6C x C each, or one shared) + the head's."""
  C = var_cfg.embed_dim
  return (1 if var_cfg.shared_aln else var_cfg.depth) * 6 * C * C + 2 * C * C


def flops_breakdown(var_cfg: VARConfig, prog_si: int | None = None) -> dict[str, float]:
  """Forward + backward model FLOPs of one example, by part, and their "total".

  Parts: "blocks" (qkv, proj, fc1, fc2 of all layers), "head", "word_embed", "adaln",
  "attention" (visible pairs only). See the module docstring.
  """
  patch_nums = stage_patch_nums(var_cfg, prog_si)
  C = var_cfg.embed_dim
  tokens = scales.seq_len(patch_nums)
  embedded = tokens - var_cfg.first_l
  visible = float(scales.block_causal_mask(patch_nums).sum())  # (query, key) pairs
  parts = {
      "blocks": 6.0 * var_cfg.depth * block_weights_per_token(var_cfg) * tokens,
      "head": 6.0 * C * var_cfg.vocab_size * tokens,
      "word_embed": 4.0 * var_cfg.z_channels * C * embedded,
      "adaln": 6.0 * adaln_weights(var_cfg),
      "attention": 12.0 * var_cfg.depth * C * visible,
  }
  parts["total"] = sum(parts.values())
  return parts


def flops_per_example(var_cfg: VARConfig, prog_si: int | None = None) -> float:
  """Model FLOPs of one example's forward + backward at stage `prog_si` (None: all scales)."""
  return flops_breakdown(var_cfg, prog_si)["total"]
