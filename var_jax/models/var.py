"""The VAR transformer (VAR_SPEC §4) in Flax linen.

One module, two modes chosen by attributes:
  * teacher forcing (`decode_scale=None`): `VAR(cfg)(labels_B, x_BlCv)` -> logits (B, L, V) float32,
    with the block-causal mask over scales; `train=True` adds label dropout and drop path;
    `prog_si=si` (progressive training) runs on the first ed tokens only, scales 0..si, taking
    x_BlCv of length ed - first_l and returning (B, ed, V): the block-causal mask restricted to a
    prefix of scales, so these logits equal the first ed rows of the full forward;
  * KV-cached sampling of one scale (`decode_scale=si`): `VAR(cfg, decode_scale=si)(labels_2B, x)`,
    with `mutable=["cache"]`; scale 0 takes no input map, scale si > 0 takes the area-downsampled
    f_hat (2B, pn_si**2, Cvae). The cache is one key and one value array (depth, B, H, S, D) for
    all layers; each layer writes its scale's keys and values at the scale's static offset and
    attends up to its end;
  * KV-cached prefill of scales 0..si (`decode_scale=si, prefill=True`): one teacher-forcing pass
    over a known prefix (x_BlCv as in teacher forcing with `prog_si=si`) that also writes the cache
    rows [0, end of si), so decoding goes on at scale si + 1; returns the logits of all ed rows.
    Collaborative decoding hands a drafted prefix to a second model this way.
Both modes share one parameter tree; blocks are stacked with `nn.scan` (leading "layers" axis).
Given each block param as a tuple of per-layer arrays instead (the inference placement's layout
on CPU, `weights_per_layer`), the scan over blocks is unrolled and reads each layer's in place.
The cache travels through the layer scan as part of the carry, not as a scanned variable: a
carried buffer is updated in place, whereas scanned outputs are a fresh (depth, B, H, S, D) buffer
per scale (14 GiB of XLA temp for VAR-d16 at batch 8 on CPU, and two full copies per scale).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax import scales
from var_jax.models import precision
from var_jax.models.var_config import VARConfig
from var_jax.ops import attention as attention_ops
from var_jax.ops import float_bits

_MAX_LOG_SCALE_MUL = math.log(100.0)

# Logical axes of the sampling KV cache (depth, batch, heads, sequence, head_dim).
CACHE_AXES = ("layers", "cache_batch", "cache_heads", "cache_sequence", "cache_kv")


def stacks_as_uint16(cfg: VARConfig, platform: str | None = None) -> bool:
  """Whether the decode loop carries its bfloat16 stacks (the blocks' weights; on CPU also the KV
  cache, `cache_as_uint16`) as uint16 bit patterns: in bfloat16 on CPU and TPU.

  CPU: XLA:CPU's float normalization rewrites a bfloat16 dynamic-slice or dynamic-update-slice as
  a float32 one over the whole operand. In the layer loop that converted every stacked weight to
  float32 once per call and each layer's slice back to bfloat16 per step, and rewrote the whole
  cache per layer: 25% of the op time of a VAR-d16 bfloat16 sampling call at batch 1 (profiled).
  A uint16 stack is sliced and updated in place; the bitcasts to and from it are exact, and what
  remains is one copy of each step's weight slice (XLA fuses the bitcast with the slice). The
  call got 15% faster at batch 1 and 9% at batch 8, with identical tokens and images.
  TPU: the compiled program of the same call moves less (v5e:2x2, VAR-d16 at batch 8: 44.7 GB
  per chip against 54.6 in XLA's cost analysis, ahead of time; not yet timed on a TPU). With the
  KV cache in bfloat16 (`cache_as_uint16`), bfloat16 weight stacks instead of uint16 ones cost
  31.9 GB against 22.2 (batch 2 on one v5e chip, slim tokenizer), so the weights stay uint16.
  GPU keeps bfloat16 stacks until a GPU run shows the same.

  On TPU the inference placement stores these stacks as uint16 already (`placement.place`):
  bitcasting them inside the call was a copy of every stack on TPU (1.2 GB per call for VAR-d16).
  On CPU it holds the weights one array per layer instead (`weights_per_layer`), which this loop
  never slices; the uint16 weight stacks there serve stacked params applied directly (`VAR.apply`),
  and the cache stays a uint16 stack. `platform` defaults to where the traced computation runs
  (`attention_ops.computation_platform`).
  """
  platform = attention_ops.computation_platform() if platform is None else platform
  return jnp.dtype(cfg.dtype) == jnp.dtype(jnp.bfloat16) and platform in ("cpu", "tpu")


def cache_as_uint16(cfg: VARConfig) -> bool:
  """Whether the decode loop's KV cache is a uint16 stack too: on CPU only (`stacks_as_uint16`).

  On TPU the prefix kernel reads each layer's rows straight out of the bfloat16 cache stack
  (`attention_ops.prefix_attention(..., layer=)`); a uint16 cache would need a bfloat16 copy of
  the layer's slice for the kernel's operand, which is what this avoids. The sampler of VAR-d16
  at batch 2 per v5e chip (slim tokenizer) went from 29.3 to 22.2 GB per call in XLA's cost
  analysis, ahead of time.
  """
  return stacks_as_uint16(cfg) and attention_ops.computation_platform() == "cpu"


def weights_per_layer(platform: str | None = None) -> bool:
  """Whether the inference placement holds every block weight as one array per layer (a tuple of
  `depth` arrays, `placement.held_per_layer`) instead of one stack: on CPU.

  Given such tuples, VAR stacks them again in the program and unrolls its scan over the blocks;
  every layer then reads a constant slice of a stack XLA has just built from the layer arrays,
  which its simplifier folds back to the layer's own array: the matmuls read the weights where
  they lie. The loop over a stack (`nn.scan` as a while loop) copies each layer's slice out of it
  at every step instead: XLA:CPU hands its matmul libraries whole buffers only. Those copies,
  every weight once per scale (0.8 GB per scale for VAR-d16 in float32), were 13% of a VAR-d16
  float32 sampling call at batch 1 (`VAR/dynamic_slice` in a profile of the call) and 18% in
  bfloat16 (the slice fused with the uint16 -> bfloat16 bitcast, `stacks_as_uint16`). Without
  them the call is x1.04 faster in float32 at batch 1, x1.07 in bfloat16 at batch 1 and x1.05 at
  batch 8, identical images and tokens (`benchmarks/bench_weight_layout.py`); the cost is ten
  unrolled scans to compile instead of ten loops (lower + compile 15 -> 24 s in bfloat16).
  TPU and GPU keep the stacks: a TPU fuses the loop's dynamic slice into the matmul that reads it,
  and unrolling would only lengthen the compile.
  `platform` defaults to where the traced computation runs (`attention_ops.computation_platform`).
  """
  platform = attention_ops.computation_platform() if platform is None else platform
  return platform == "cpu"


def _is_layers(x) -> bool:
  """Whether a params leaf is a tuple of per-layer arrays (`weights_per_layer`)."""
  return isinstance(x, tuple)


def _stack_layers(tree):
  """Per-layer tuples of arrays stacked along a new leading axis; other leaves as they are."""
  return jax.tree.map(lambda x: jnp.stack(x) if _is_layers(x) else x, tree, is_leaf=_is_layers)


def _held_per_layer(blocks_params) -> bool:
  """Whether the blocks' params arrive as per-layer tuples (`weights_per_layer`)."""
  return any(map(_is_layers, jax.tree.leaves(blocks_params, is_leaf=_is_layers)))


def _as_bits(tree):
  """bfloat16 leaves as their uint16 bit patterns (exact); other leaves as they are."""
  return jax.tree.map(lambda x: float_bits.to_bits(x) if x.dtype == jnp.bfloat16 else x, tree)


def _from_bits(tree):
  """uint16 bit patterns back to the bfloat16 values they hold; other leaves as they are."""
  return jax.tree.map(lambda x: float_bits.from_bits(x, jnp.bfloat16) if x.dtype == jnp.uint16
                      else x, tree)


def _normal(std: float, names, multiplier=None):
  """normal(std) init (PyTorch's trunc_normal_ at +-2 absolute is a plain normal at these stds)."""
  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, dtype) * std
    return w if multiplier is None else w * multiplier(shape).astype(dtype)
  return nn.with_logical_partitioning(init, names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ada_multiplier(gamma: float, others: float, axis: int):
  """Per-chunk init multipliers of the 6 AdaLN chunks: (gamma1, gamma2) x gamma, the rest x others."""
  def mult(shape):
    n = shape[axis]
    chunk = n // 6
    m = np.concatenate([np.full(2 * chunk, gamma), np.full(n - 2 * chunk, others)])
    return jnp.asarray(m.reshape([n if i == axis else 1 for i in range(len(shape))]))
  return mult


class _LN(nn.Module):
  """LayerNorm without affine parameters, computed in float32."""
  eps: float

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=self.eps, use_bias=False, use_scale=False, use_fast_variance=False,
                     dtype=jnp.float32)(x.astype(jnp.float32))
    return y


class SelfAttention(nn.Module):
  config: VARConfig
  decode_range: tuple[int, int] | None = None
  patch_nums: tuple[int, ...] | None = None  # teacher forcing over these scales (None: all)

  @nn.compact
  def __call__(self, x_BLC, kv_cache=None, layer=None):
    """Returns the attention output, and with `decode_range` also the updated (k, v) cache.

    kv_cache: decode mode only, (k, v) of shape (depth, B, H, S, D) for all layers; this layer
      (traced int `layer`) writes its rows [begin, end) and attends to rows [0, end). With
      `patch_nums` too (prefill, begin = 0) the rows attend block-causally among themselves.
    """
    cfg = self.config
    H, D = cfg.num_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    sigma = cfg.init_sigma
    # Hand-rolled rather than nn.DenseGeneral: DenseGeneral initialises a flattened 2-D kernel and
    # reshapes it, which breaks 4-D logical partitioning under a mesh.
    w_qkv = self.param("mat_qkv", _normal(sigma, ("embed", None, "heads", "kv")), (cfg.embed_dim, 3, H, D))
    q_bias = self.param("q_bias", _zeros(("heads", "kv")), (H, D))
    v_bias = self.param("v_bias", _zeros(("heads", "kv")), (H, D))
    # The official's one linear with bias (q_bias, 0, v_bias).
    qkv_bias = jnp.stack([q_bias, jnp.zeros_like(q_bias), v_bias])
    qkv = precision.einsum("blc,cjhd->bljhd", x_BLC.astype(dtype), w_qkv.astype(dtype),
                           bias=qkv_bias)
    q = qkv[:, :, 0].astype(jnp.float32)
    k = qkv[:, :, 1].astype(jnp.float32)
    v = qkv[:, :, 2]
    if cfg.attn_l2_norm:
      scale_mul = self.param("scale_mul_1H11",
                             nn.with_logical_partitioning(nn.initializers.constant(math.log(4.0)), ("heads",)),
                             (H,))
      mult_H = jnp.exp(jnp.minimum(scale_mul, _MAX_LOG_SCALE_MUL))
      q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12) * mult_H[:, None]
      k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    else:
      q = q * (0.25 / math.sqrt(D))  # The official scale without l2 norm.
    q_BHLD = q.astype(dtype).transpose(0, 2, 1, 3)
    k_BHLD = k.astype(dtype).transpose(0, 2, 1, 3)
    v_BHLD = v.astype(dtype).transpose(0, 2, 1, 3)
    if self.decode_range is None:
      patch_nums = cfg.patch_nums if self.patch_nums is None else self.patch_nums
      o_BHLD = attention_ops.block_causal_attention(q_BHLD, k_BHLD, v_BHLD, patch_nums=patch_nums,
                                                    impl=cfg.attention_impl)
    else:
      begin, end = self.decode_range
      k_NBHSD, v_NBHSD = (
          nn.with_logical_constraint(
              jax.lax.dynamic_update_slice(c, _as_bits(new[None]) if c.dtype == jnp.uint16
                                           else new[None].astype(c.dtype), (layer, 0, 0, begin, 0)),
              CACHE_AXES)
          for c, new in zip(kv_cache, (k_BHLD, v_BHLD)))
      kv_cache = (k_NBHSD, v_NBHSD)
      if self.patch_nums is not None:  # prefill: the rows are the whole prefix [0, end)
        o_BHLD = attention_ops.block_causal_attention(q_BHLD, k_BHLD, v_BHLD,
                                                      patch_nums=self.patch_nums,
                                                      impl=cfg.attention_impl)
      else:
        # The stacks and the layer: the TPU kernel reads the layer's rows out of the stack (a
        # slice handed to a kernel would be copied per layer first); other paths slice it. CPU's
        # uint16 stack goes in as its bfloat16 view, whose bit patterns the CPU path takes again
        # (XLA cancels the two bitcasts).
        k, v = (_from_bits(c) if c.dtype == jnp.uint16 else c.astype(dtype) for c in kv_cache)
        o_BHLD = attention_ops.prefix_attention(q_BHLD, k, v, kv_len=end, impl=cfg.attention_impl,
                                                layer=layer)
    o_BLHD = o_BHLD.transpose(0, 2, 1, 3)
    w_proj = self.param("proj_kernel", _normal(sigma / math.sqrt(2 * cfg.depth), ("heads", "kv", "embed")),
                        (H, D, cfg.embed_dim))
    b_proj = self.param("proj_bias", _zeros(("embed",)), (cfg.embed_dim,))
    out = precision.einsum("blhd,hdc->blc", o_BLHD.astype(dtype), w_proj.astype(dtype), bias=b_proj)
    return out if self.decode_range is None else (out, kv_cache)


@jax.checkpoint
def _gelu_in_float32(h):
  """tanh-GELU computed in float32 and rounded once to h's dtype (a no-op change in float32).

  In bfloat16, XLA would round after every op of the formula, its constants too (0.044715 ->
  0.04468, sqrt(2/pi) -> 0.7969): less exact than torch's bf16 GELU (float32 inside, one rounding)
  and, on CPU, 2x slower. `jax.checkpoint`: a backward pass keeps h alone and recomputes the
  float32 intermediates, instead of saving five float32 copies of the (B, L, mlp) activation.
  """
  return jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(h.dtype)


class FFN(nn.Module):
  config: VARConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    sigma = cfg.init_sigma
    h = precision.Dense(cfg.mlp_dim, dtype=dtype, name="fc1",
                        kernel_init=_normal(sigma, ("embed", "mlp")),
                        bias_init=_zeros(("mlp",)))(x)
    h = nn.with_logical_constraint(_gelu_in_float32(h), ("batch", "length", "mlp"))
    return precision.Dense(cfg.embed_dim, dtype=dtype, name="fc2",
                           kernel_init=_normal(sigma / math.sqrt(2 * cfg.depth), ("mlp", "embed")),
                           bias_init=_zeros(("embed",)))(h)


class AdaLNBlock(nn.Module):
  """x + gamma1 * Attn(LN(x)(1 + s1) + b1), then x + gamma2 * FFN(LN(x)(1 + s2) + b2)."""
  config: VARConfig
  train: bool = False
  decode_range: tuple[int, int] | None = None
  patch_nums: tuple[int, ...] | None = None  # teacher forcing over these scales (None: all)

  @nn.compact
  def __call__(self, carry, cond, drop_rate, layer, cached_ada_B6C=None):
    """One block; returns (carry, ada) as `nn.scan` wants.

    carry: x_BLC, or in decode mode (x_BLC, (k, v) cache of all layers).
    cond: (B, C) class condition, or (B, 6, C) shared AdaLN output (None with `cached_ada_B6C`).
    drop_rate: this block's drop-path rate; layer: this block's index (traced int).
    cached_ada_B6C: this block's AdaLN output (B, 6, C) float32 from the call's first decode
      pass, used instead of projecting `cond` again (None: project it).
    ada: in decode mode without `cached_ada_B6C`, the AdaLN output computed here, for the cache;
      else None.
    """
    cfg = self.config
    x_BLC, kv_cache = carry if self.decode_range is not None else (carry, None)
    C = cfg.embed_dim
    dtype = jnp.dtype(cfg.dtype)
    if cached_ada_B6C is not None:
      ada_B6C = cached_ada_B6C
    elif cfg.shared_aln:
      ada_gss = self.param(
          "ada_gss", _normal(1.0 / math.sqrt(C), (None, "embed"),
                             _ada_multiplier(cfg.init_adaln_gamma, cfg.init_adaln, axis=0)), (6, C))
      ada_B6C = ada_gss[None].astype(jnp.float32) + cond.astype(jnp.float32)
    else:
      ada = precision.Dense(6 * C, dtype=dtype, name="ada_lin",
                            kernel_init=_normal(
                                cfg.init_sigma, ("embed", "mlp"),
                                _ada_multiplier(cfg.init_adaln_gamma, cfg.init_adaln, axis=1)),
                            bias_init=_zeros(("mlp",)))(nn.silu(cond))
      ada_B6C = ada.reshape(-1, 6, C).astype(jnp.float32)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada_B6C[:, None, i] for i in range(6))
    ln = _LN(cfg.norm_eps)

    def drop_path(y):
      if not self.train or cfg.drop_path_rate == 0.0:
        return y
      keep = 1.0 - drop_rate
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1))
      return jnp.where(mask, y / keep, 0.0).astype(y.dtype)

    h = (ln(x_BLC) * (1.0 + scale1) + shift1).astype(dtype)
    a = SelfAttention(cfg, self.decode_range, self.patch_nums, name="attn")(h, kv_cache, layer)
    if self.decode_range is not None:
      a, kv_cache = a
    # gamma * y in float32, rounded once: gammas of a bf16 ada_lin hold bf16 values, so this is
    # their bf16 product, and the shared AdaLN's float32 gammas go unrounded as the official's do;
    # gamma's gradient then sums over the tokens in float32 (see models/precision.py).
    x_BLC = x_BLC + drop_path((a.astype(jnp.float32) * gamma1).astype(dtype))
    h = (ln(x_BLC) * (1.0 + scale2) + shift2).astype(dtype)
    f = FFN(cfg, name="ffn")(h)
    x_BLC = x_BLC + drop_path((f.astype(jnp.float32) * gamma2).astype(dtype))
    x_BLC = nn.with_logical_constraint(x_BLC.astype(dtype), ("batch", "length", "embed"))
    fresh_ada = self.decode_range is not None and cached_ada_B6C is None
    return (x_BLC if kv_cache is None else (x_BLC, kv_cache)), (ada_B6C if fresh_ada else None)


def _remat_policy(name: str):
  if name in ("none", "everything_saveable"):
    return None
  return getattr(jax.checkpoint_policies, name)


class AdaLNBeforeHead(nn.Module):
  """LN(x)(1 + scale) + shift, (scale, shift) projected from the class condition."""
  config: VARConfig

  @nn.compact
  def __call__(self, x_BLC, cond_BD, cached_ada_B2C=None):
    """Returns (output, ada): ada the (B, 2, C) float32 projection, projected here or
    `cached_ada_B2C` (a decode pass after the first, see `VAR`), which then skips the projection."""
    cfg = self.config
    C = cfg.embed_dim
    if cached_ada_B2C is not None:
      ada_B2C = cached_ada_B2C
    else:
      ada = precision.Dense(2 * C, name="ada_lin", dtype=jnp.dtype(cfg.dtype),
                            kernel_init=_normal(cfg.init_sigma * cfg.init_adaln, ("embed", "mlp")),
                            bias_init=_zeros(("mlp",)))(nn.silu(cond_BD)).astype(jnp.float32)
      # Reshape, then index: on jax 0.10.2 XLA mis-partitions the backward of a slice along a
      # tensor-sharded axis (ada[:, :C] with 2C split over "tensor" gave wrong gradients on a
      # 2x2x2 mesh; tests/test_train_var.py::test_sharded_step_equals_unsharded guards this).
      ada_B2C = ada.reshape(-1, 2, C)
    scale, shift = ada_B2C[:, None, 0], ada_B2C[:, None, 1]
    return _LN(cfg.norm_eps)(x_BLC) * (1.0 + scale) + shift, ada_B2C


class VAR(nn.Module):
  """VAR transformer. See the module docstring for the two modes."""
  config: VARConfig
  train: bool = False
  decode_scale: int | None = None
  prog_si: int | None = None  # teacher forcing on scales 0..prog_si only; None: all scales
  prefill: bool = False  # with decode_scale=si: fill the cache with scales 0..si in one pass

  @nn.compact
  def __call__(self, labels_B: jax.Array, x_BlCv: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    C, L = cfg.embed_dim, cfg.seq_len
    dtype = jnp.dtype(cfg.dtype)
    sigma = cfg.init_sigma
    begin_ends = scales.begin_ends(cfg.patch_nums)

    class_emb = nn.Embed(cfg.num_classes + 1, C, name="class_emb",
                         embedding_init=_normal(sigma, ("classes", "embed")))
    lvl_embed = nn.Embed(cfg.num_scales, C, name="lvl_embed", embedding_init=_normal(sigma, ("scales", "embed")))
    pos_start = self.param("pos_start", _normal(sigma, (None, None, "embed")), (1, cfg.first_l, C))
    pos_1LC = self.param("pos_1LC", _normal(sigma, (None, "length", "embed")), (1, L, C))
    word_embed = precision.Dense(C, name="word_embed", kernel_init=_normal(sigma, (None, "embed")),
                                 bias_init=_zeros(("embed",)))
    lvl_pos_LC = lvl_embed(jnp.asarray(scales.scale_ids(cfg.patch_nums))) + pos_1LC[0]

    labels_B = jnp.asarray(labels_B, jnp.int32)
    if self.train and cfg.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), labels_B.shape) < cfg.cond_drop_rate
      labels_B = jnp.where(drop, cfg.num_classes, labels_B)
    cond_BD = class_emb(labels_B)
    B = cond_BD.shape[0]
    sos_BlC = cond_BD[:, None, :] + pos_start

    attn_patch_nums = None
    if self.prefill and self.decode_scale is None:
      raise ValueError("prefill=True needs decode_scale (the last scale of the prefix).")
    if self.prefill:
      si = self.decode_scale
      end = begin_ends[si][1]
      if x_BlCv is None or x_BlCv.shape[1] != end - cfg.first_l:
        raise ValueError(f"prefill of scales 0..{si} needs x_BlCv of shape (B, {end - cfg.first_l}, "
                         f"{cfg.z_channels}), got {None if x_BlCv is None else x_BlCv.shape}.")
      x_BLC = jnp.concatenate([sos_BlC, word_embed(x_BlCv.astype(jnp.float32))], axis=1)
      x_BLC = x_BLC + lvl_pos_LC[:end]
      decode_range = (0, end)
      attn_patch_nums = cfg.patch_nums[:si + 1]
    elif self.decode_scale is None:
      end = self._teacher_forcing_end()
      if x_BlCv is None or x_BlCv.shape[1] != end - cfg.first_l:
        raise ValueError(f"teacher forcing needs x_BlCv of shape (B, {end - cfg.first_l}, "
                         f"{cfg.z_channels}), got {None if x_BlCv is None else x_BlCv.shape}.")
      x_BLC = jnp.concatenate([sos_BlC, word_embed(x_BlCv.astype(jnp.float32))], axis=1)
      x_BLC = x_BLC + lvl_pos_LC[:end]
      decode_range = None
      if end != L:
        attn_patch_nums = cfg.patch_nums[:self.prog_si + 1]
    else:
      si = self.decode_scale
      begin, end = begin_ends[si]
      if si == 0:
        x_BLC = sos_BlC + lvl_pos_LC[:end]
      else:
        x_BLC = word_embed(x_BlCv.astype(jnp.float32)) + lvl_pos_LC[begin:end]
      decode_range = (begin, end)

    # Decoding, the AdaLN projections depend on the label only: the call's first pass (scale 0, or
    # the prefill) keeps them in the cache and later scales read them back instead of reading
    # their weights (a third of VAR-d16's block weights) once more per scale.
    reuse_adaln = decode_range is not None and not self.prefill and self.decode_scale > 0
    cached_ada_NB6C = cached_ada_B2C = None
    if reuse_adaln:
      if not self.has_variable("cache", "block_adaln"):
        raise ValueError(f"decode_scale={self.decode_scale} needs the cache that scale 0 (or a "
                         "prefill) filled: pass the 'cache' collection it returned.")
      cached_ada_NB6C = self.get_variable("cache", "block_adaln")
      cached_ada_B2C = self.get_variable("cache", "head_adaln")
      block_cond = None
    elif cfg.shared_aln:
      shared = precision.Dense(6 * C, name="shared_ada_lin", dtype=dtype,
                               kernel_init=_normal(sigma, ("embed", "mlp")), bias_init=_zeros(("mlp",)))
      block_cond = shared(nn.silu(cond_BD)).reshape(B, 6, C)
    else:
      block_cond = cond_BD

    block = AdaLNBlock
    policy = _remat_policy(cfg.remat_policy)
    if cfg.remat_policy != "none":
      block = nn.remat(AdaLNBlock, policy=policy, prevent_cse=False)
    # Not while initialising: the params are being created, not sliced.
    applying = not self.is_initializing()
    per_layer = (applying and self.has_variable("params", "blocks")
                 and _held_per_layer(self.get_variable("params", "blocks")))
    bits = decode_range is not None and applying and not per_layer and stacks_as_uint16(cfg)
    if bits:  # each block reads its weights back from the uint16 slices the loop hands it
      block = nn.map_variables(block, "params", trans_in_fn=_from_bits)
    # unroll only when per layer: otherwise nn.scan's default, which `aot.scan_unroll` sets
    unrolled = {"unroll": True} if per_layer else {}
    blocks = nn.scan(block, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, 0, 0, 0), length=cfg.depth,
                     metadata_params={nn.PARTITION_NAME: "layers"}, **unrolled)
    if per_layer:  # one array per layer: unrolled, each block reads its own (weights_per_layer)
      blocks = nn.map_variables(blocks, "params", trans_in_fn=_stack_layers)
    elif bits:  # the loop slices the stacks as uint16 (see stacks_as_uint16)
      blocks = nn.map_variables(blocks, "params", trans_in_fn=_as_bits)
    elif applying:  # stacks the placement holds as uint16, whole as bfloat16
      blocks = nn.map_variables(blocks, "params", trans_in_fn=_from_bits)
    drop_rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.depth, dtype=jnp.float32)
    layers = jnp.arange(cfg.depth, dtype=jnp.int32)
    x_BLC = nn.with_logical_constraint(x_BLC.astype(dtype), ("batch", "length", "embed"))
    scanned = blocks(cfg, self.train, decode_range, attn_patch_nums, name="blocks")
    if decode_range is None:
      x_BLC, _ = scanned(x_BLC, block_cond, drop_rates, layers, None)
    else:
      cache_shape = (cfg.depth, B, cfg.num_heads, attention_ops.kv_cache_len(cfg.patch_nums),
                     cfg.head_dim)
      # uint16: bfloat16 bit patterns (0 is +0.0)
      cache_dtype = jnp.uint16 if applying and cache_as_uint16(cfg) else dtype
      cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, cache_dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, cache_dtype)
      (x_BLC, (cached_k.value, cached_v.value)), ada_NB6C = scanned(
          (x_BLC, (cached_k.value, cached_v.value)), block_cond, drop_rates, layers,
          cached_ada_NB6C)
      if not reuse_adaln:
        self.put_variable("cache", "block_adaln",
                          nn.with_logical_constraint(ada_NB6C, ("layers", "cache_batch", None, None)))

    h, head_ada_B2C = AdaLNBeforeHead(cfg, name="head_nm")(x_BLC.astype(jnp.float32), cond_BD,
                                                           cached_ada_B2C)
    if decode_range is not None and not reuse_adaln:
      self.put_variable("cache", "head_adaln",
                        nn.with_logical_constraint(head_ada_B2C, ("cache_batch", None, None)))
    logits = precision.Dense(cfg.vocab_size, name="head", dtype=dtype,
                             kernel_init=_normal(sigma * cfg.init_head, ("embed", "vocab")),
                             bias_init=_zeros(("vocab",)))(h.astype(dtype))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def _teacher_forcing_end(self) -> int:
    """ed: the teacher-forcing length, L or the end of scale prog_si."""
    cfg = self.config
    if self.prog_si is None:
      return cfg.seq_len
    if isinstance(self.prog_si, bool) or not 0 <= self.prog_si < cfg.num_scales:
      raise ValueError(f"prog_si must be in [0, {cfg.num_scales - 1}] or None, "
                       f"got {self.prog_si!r}.")
    return scales.begin_ends(cfg.patch_nums)[self.prog_si][1]


def init_params(config: VARConfig, key: jax.Array):
  """Fresh VAR params for `config` (the official init), boxed with their logical axis names
  (`flax.core.meta.unbox` gives the arrays, `nn.get_partition_spec` the names). Under `jax.jit` one
  program computes them; under `jax.eval_shape` it gives their shapes, the target a loaded
  checkpoint is checked against. The attention implementation creates no params, so the init
  traces the XLA path whatever `config.attention_impl` says (a kernel for another backend would
  not trace here)."""
  config = dataclasses.replace(config, attention_impl="xla")
  labels = jnp.zeros((1,), jnp.int32)
  x = jnp.zeros((1, config.seq_len - config.first_l, config.z_channels), jnp.float32)
  return VAR(config).init(key, labels, x)["params"]


def param_shapes(config: VARConfig):
  """`init_params(config, key)` as ShapeDtypeStructs, boxed likewise (nothing is computed): the
  target a loaded checkpoint is checked against, and the logical axes the placement reads."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
