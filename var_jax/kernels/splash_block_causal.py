"""VAR training attention on TPU: JAX's splash attention kernel, forward and custom-vjp backward.

This module works on the arrays one device holds (the caller wraps it in shard_map). It pads the
sequence to the block grid, builds the block-causal-over-scales mask from patch_nums
(`splash_masks.RowEndMask`), and vmaps splash's multi-head kernel over the local batch.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

from var_jax import scales
from var_jax.errors import ConfigError
from var_jax.kernels import splash_masks

# ---------------------------------------------------------------------------------------------
# Block sizes: the one place they are chosen.
#
# Splash needs the sequence to be a multiple of its blocks, and blocks a multiple of 128 lanes, so
# L is padded to a multiple of SEQ_MULTIPLE: 680 -> 768 at 256 px, 2240 -> 2304 at 512 px (2304
# rather than 2560: 9% padding instead of 14%, and 2304 = 3 x 768 keeps the large block below).
#
# Then the block is the largest multiple of 128 that divides the padded length, capped at
# MAX_BLOCK: 768 for both resolutions. Why so large, when VAR's mask is only ~60% visible? With
# head_dim 64 a tile is little work: q·kᵀ and p·v are 4·64 flops per logit, so a 128 x 128 tile
# is ~4 MFLOP, ~20 ns of a v5e MXU, against a fixed ~0.35 us per Pallas grid step. Splash skips
# only blocks that are entirely masked; counting them (benchmarks/aot_tpu_attention.py prints
# this table) gives, per head and batch row:
#   L_pad  block    grid steps  visible blocks  logits computed / L_pad²
#   768    128      36          28              0.78
#   768    256       9           8              0.89
#   768    768       1           1              1.00    <- chosen: 1 step instead of 9 or 36
#   2304   256      81          60              0.74
#   2304   384      36          28              0.78
#   2304   768       9           8              0.89    <- chosen
#   2560   512      25          20              0.80
# so finer blocks save at most ~25% of the (cheap) logit work and pay 9-36x the step overhead.
# KV_COMPUTE_BLOCK bounds the (bq, bkv_compute) float32 temporaries the kernel keeps in VMEM
# (768 x 256 x 4 B = 768 KiB each), so the 768-row blocks fit the default scoped VMEM: forward
# and backward compile ahead of time for v4, v5e, v5p and v6e, bf16 and f32, at 256 and 512 px.
# The backward uses splash's fused dq+dkv kernel: it recomputes the logits once instead of twice
# (separate dq and dkv kernels), and with head_dim 64 the logit recompute (exp on the VPU/EUP)
# is the dominant cost, not the dq partial sums the fused kernel writes per key block.
# ---------------------------------------------------------------------------------------------
SEQ_MULTIPLE = 128
MAX_BLOCK = 768
KV_COMPUTE_BLOCK = 256


def padded_seq_len(seq_len: int) -> int:
  """The sequence length splash runs on: L rounded up to SEQ_MULTIPLE."""
  return splash_masks.round_up(seq_len, SEQ_MULTIPLE)


def training_block_sizes(padded_len: int) -> splash.BlockSizes:
  """Splash block sizes for a padded sequence of `padded_len` tokens (see the table above)."""
  if padded_len % SEQ_MULTIPLE:
    raise ConfigError(f"padded_len={padded_len} is not a multiple of {SEQ_MULTIPLE}.")
  block = max(b for b in range(SEQ_MULTIPLE, MAX_BLOCK + 1, SEQ_MULTIPLE) if padded_len % b == 0)
  compute = KV_COMPUTE_BLOCK if block % KV_COMPUTE_BLOCK == 0 else SEQ_MULTIPLE
  return splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=compute,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=compute,
      use_fused_bwd_kernel=True,
  )


def make_block_causal_kernel(
    patch_nums: Sequence[int], num_heads: int, *, interpret: bool = False
) -> splash.SplashAttentionKernel:
  """Splash multi-head kernel (with custom vjp) for VAR's mask over the padded sequence."""
  padded_len = padded_seq_len(scales.seq_len(patch_nums))
  mask = splash_masks.block_causal_splash_mask(patch_nums, padded_len, num_heads)
  return splash.make_splash_mha(
      mask,
      block_sizes=training_block_sizes(padded_len),
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
  )


def block_causal_attention(q_BHLD, k_BHLD, v_BHLD, *, patch_nums: Sequence[int], interpret: bool):
  """Splash block-causal attention on one device's shard; inputs are (B, H, L, D), q pre-scaled."""
  _, num_heads, seq_len, _ = q_BHLD.shape
  padded_len = padded_seq_len(seq_len)
  pad = ((0, 0), (0, 0), (0, padded_len - seq_len), (0, 0))
  kernel = make_block_causal_kernel(patch_nums, num_heads, interpret=interpret)
  out_BHPD = jax.vmap(kernel)(jnp.pad(q_BHLD, pad), jnp.pad(k_BHLD, pad), jnp.pad(v_BHLD, pad))
  return out_BHPD[:, :, :seq_len]
