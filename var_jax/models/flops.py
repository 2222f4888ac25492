"""Matmul FLOPs of VAR: one training example (the numerator of MFU), one sampled image, and what a
flash-style attention kernel runs. The one place the repository counts matmul and attention FLOPs.

Used by the trainer's logged MFU (`train/train_var.py`), the AOT roofline (`var_jax.aot`) and the
benchmarks. A multiply-add is 2 FLOPs; only matmuls count (norms, softmax, GELU, the optimizer
update are elementwise and left out, as MFU conventionally does).

Everything starts from the forward pass of one sequence (`forward_breakdown`):

* block linears (qkv, proj, fc1, fc2): 2 FLOPs per weight per token;
* head: the same 2 per weight per token;
* word_embed: applied to the tokens after the first scale (the first scale's tokens are the
  class token + pos_start), 2 per weight per token;
* AdaLN projections (each block's 6C x C, or one shared, and the head's 2C x C): applied to the
  class condition, 2 per weight each time the network is applied (the class embedding is a
  lookup);
* attention: QK^T and PV are 2 C FLOPs each per (query, key) pair per layer, 4 C per pair that
  the block-causal mask lets through. A dense XLA attention computes the masked pairs too (all
  L²); those are not model FLOPs. A query row of scale k sees the keys of scales 0..k, so the
  visible pairs are also what a KV-cached sampler attends to, scale by scale.

Training (`flops_breakdown`) adds the backward pass: 4 per weight per token more (the weight
gradient and the input gradient), so 6 per weight; word_embed's input is the tokenizer's data and
needs no gradient, so 2 + 2 = 4 per weight; attention's backward is twice its forward (dP = dO V^T,
dV = P^T dO, dQ = dS K, dK = dS^T Q): 12 C per visible pair. No remat recompute is counted (model
FLOPs, not hardware FLOPs). With `prog_si` (a progressive-training stage) the step runs on scales
0..prog_si only, i.e. the first ed = sum(pn² for those scales) tokens, and only their pairs are
visible.

Sampling (`sampler_flops_per_image`) is the forward pass of each sequence (two per image with
classifier-free guidance), the network applied once per scale, except the AdaLN projections: they
depend on the label only and the sampler computes them once per call.
`kernel_attention_flops_per_example` is the hardware count of a flash kernel's attention in
training (it recomputes QK^T in the backward, and the forward again under remat).
"""
from __future__ import annotations

from typing import Sequence

from var_jax import scales
from var_jax.errors import ConfigError
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae_config import VQVAEConfig

# FLOPs per visible (query, key) pair, per layer and per channel.
ATTENTION_FORWARD_PER_PAIR = 4     # QK^T, PV
ATTENTION_BACKWARD_PER_PAIR = 8    # dO V^T, P^T dO, dS K, dS^T Q
KERNEL_ATTENTION_BACKWARD_PER_PAIR = 10  # the same and QK^T again (probabilities are not stored)


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


def visible_pairs(patch_nums: Sequence[int]) -> float:
  """(query, key) pairs the block-causal mask lets through: sum over scales of rows x keys so far."""
  return float(scales.block_causal_mask(tuple(patch_nums)).sum())


def forward_breakdown(var_cfg: VARConfig, prog_si: int | None = None, *,
                      adaln_calls: int = 1) -> dict[str, float]:
  """Forward matmul FLOPs of one sequence, by part: "blocks", "head", "word_embed", "adaln",
  "attention" (visible pairs only). `adaln_calls`: times the AdaLN projections are applied."""
  patch_nums = stage_patch_nums(var_cfg, prog_si)
  C = var_cfg.embed_dim
  tokens = scales.seq_len(patch_nums)
  return {
      "blocks": 2.0 * var_cfg.depth * block_weights_per_token(var_cfg) * tokens,
      "head": 2.0 * C * var_cfg.vocab_size * tokens,
      "word_embed": 2.0 * var_cfg.z_channels * C * (tokens - var_cfg.first_l),
      "adaln": 2.0 * adaln_weights(var_cfg) * adaln_calls,
      "attention": float(ATTENTION_FORWARD_PER_PAIR * var_cfg.depth * C) * visible_pairs(patch_nums),
  }


def flops_breakdown(var_cfg: VARConfig, prog_si: int | None = None) -> dict[str, float]:
  """Forward + backward model FLOPs of one example, by part, and their "total".

  Parts: "blocks" (qkv, proj, fc1, fc2 of all layers), "head", "word_embed", "adaln",
  "attention" (visible pairs only). See the module docstring.
  """
  forward = forward_breakdown(var_cfg, prog_si)
  attention_factor = (ATTENTION_FORWARD_PER_PAIR + ATTENTION_BACKWARD_PER_PAIR) / ATTENTION_FORWARD_PER_PAIR
  factor = {"word_embed": 2.0, "attention": attention_factor}  # the rest: forward 2 + backward 4
  parts = {name: factor.get(name, 3.0) * value for name, value in forward.items()}
  parts["total"] = sum(parts.values())
  return parts


def flops_per_example(var_cfg: VARConfig, prog_si: int | None = None) -> float:
  """Model FLOPs of one example's forward + backward at stage `prog_si` (None: all scales)."""
  return flops_breakdown(var_cfg, prog_si)["total"]


def kernel_attention_flops_per_example(var_cfg: VARConfig, remat: bool,
                                       prog_si: int | None = None) -> float:
  """FLOPs a flash-style kernel runs for one training example's attention, forward + backward.

  Per visible (query, key) pair and layer: 4 C forward, 10 C backward (QK^T again, dO V^T,
  P^T dO, dS K, dS^T Q), 4 C more when remat recomputes the forward. Whole masked tiles are
  skipped; the partly visible ones are charged as visible only, so this is a lower bound. A
  kernel that declares no cost estimate to XLA (splash) is missing this from `cost_analysis()`.
  """
  per_pair = (ATTENTION_FORWARD_PER_PAIR * (2 if remat else 1)
              + KERNEL_ATTENTION_BACKWARD_PER_PAIR)
  patch_nums = stage_patch_nums(var_cfg, prog_si)
  return float(per_pair * var_cfg.depth * var_cfg.embed_dim) * visible_pairs(patch_nums)


def sampler_flops_per_image(var_cfg: VARConfig, guidance: bool = True) -> dict[str, float]:
  """Matmul FLOPs of one image's KV-cached sampling pass, by part, and their "total".

  The forward pass of each sequence (two with classifier-free guidance), the network applied once
  per scale: the block linears, head and word embedding on each scale's rows, attention from each
  scale's rows to every cached key so far (the visible pairs); the AdaLN projections once (they
  depend on the label only; the sampler keeps them for later scales).
  """
  seqs = 2 if guidance else 1
  forward = forward_breakdown(var_cfg, adaln_calls=1)
  parts = {name: seqs * value for name, value in forward.items()}
  parts["total"] = sum(parts.values())
  return parts


# -- the tokenizer's decoder -------------------------------------------------------------------

def _decoder_layers(vae_cfg: VQVAEConfig, conv3x3_multiplies=None):
  """(part, FLOPs, output elements) of each matmul layer decoding one f_hat: post_quant_conv, the
  decoder's convolutions (3x3 and 1x1 shortcuts) and its attention (qkv, QK^T, PV, proj), in order.
  A k x k convolution is 2 k^2 Cin Cout FLOPs per output position; with `conv3x3_multiplies`, a
  callable (output side, Cin, Cout) -> multiplies per output pixel and channel pair, each 3x3
  conv the decoder runs through `ops.conv` (the resnet blocks', the upsamplings' and conv_out;
  conv_in and post_quant_conv are flax convs) is charged 2 x that x Cin Cout per position."""
  r, z = vae_cfg.latent_size, vae_cfg.z_channels

  def conv(cin, cout, k, r, routed=False):
    routed = routed and k == 3 and conv3x3_multiplies is not None
    per_pair = conv3x3_multiplies(r, cin, cout) if routed else k * k
    return ("convs", 2.0 * per_pair * cin * cout * r * r, r * r * cout)

  def res_block(cin, cout, r):
    yield conv(cin, cout, 3, r, routed=True)
    yield conv(cout, cout, 3, r, routed=True)
    if cin != cout:
      yield conv(cin, cout, 1, r)

  def attn_block(c, r):
    n = r * r
    yield conv(c, 3 * c, 1, r)
    yield ("attention", 2.0 * n * n * c, n * n)  # QK^T
    yield ("attention", 2.0 * n * n * c, n * c)  # PV
    yield conv(c, c, 1, r)

  yield conv(z, z, vae_cfg.quant_conv_ks, r)  # post_quant_conv
  c = vae_cfg.ch * vae_cfg.ch_mult[-1]
  yield conv(z, c, 3, r)  # conv_in
  yield from res_block(c, c, r)
  if vae_cfg.using_mid_sa:
    yield from attn_block(c, r)
  yield from res_block(c, c, r)
  n = len(vae_cfg.ch_mult)
  for i in reversed(range(n)):
    cout = vae_cfg.ch * vae_cfg.ch_mult[i]
    for _ in range(vae_cfg.num_res_blocks + 1):
      yield from res_block(c, cout, r)
      c = cout
      if i == n - 1 and vae_cfg.using_sa:
        yield from attn_block(c, r)
    if i:
      r *= 2
      yield conv(c, c, 3, r, routed=True)  # upsample: nearest x2, then a 3x3 conv
  yield conv(c, vae_cfg.in_channels, 3, r, routed=True)  # conv_out


def decoder_flops_per_image(vae_cfg: VQVAEConfig, conv3x3_multiplies=None) -> dict[str, float]:
  """Matmul FLOPs of decoding one image's f_hat (post_quant_conv + decoder): "convs",
  "attention" (the decoder's QK^T and PV) and "total". Norms, activations and Winograd's
  transforms are not counted. `conv3x3_multiplies` (output side, Cin, Cout) -> multiplies per
  output pixel and channel pair charges the 3x3 convs as an algorithm runs them
  (`_decoder_layers`); None: every conv direct (9), the model's math."""
  parts = {"convs": 0.0, "attention": 0.0}
  for part, layer_flops, _ in _decoder_layers(vae_cfg, conv3x3_multiplies):
    parts[part] += layer_flops
  parts["total"] = parts["convs"] + parts["attention"]
  return parts


def decoder_output_elements(vae_cfg: VQVAEConfig) -> int:
  """Elements the decoder's matmul layers write for one image (each layer's output once)."""
  return int(sum(out for _, _, out in _decoder_layers(vae_cfg)))
