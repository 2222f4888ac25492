"""The VAR transformer (VAR_SPEC §4) in Flax linen.

One module, two modes chosen by attributes:
  * teacher forcing (`decode_scale=None`): `VAR(cfg)(labels_B, x_BlCv)` -> logits (B, L, V) float32,
    with the block-causal mask over scales; `train=True` adds label dropout and drop path;
  * KV-cached sampling of one scale (`decode_scale=si`): `VAR(cfg, decode_scale=si)(labels_2B, x)`,
    with `mutable=["cache"]`; scale 0 takes no input map, scale si > 0 takes the area-downsampled
    f_hat (2B, pn_si**2, Cvae). The cache (one (B, H, L, D) key and value per layer) is written at
    the scale's static offset and attended up to its end.
Both modes share one parameter tree; blocks are stacked with `nn.scan` (leading "layers" axis).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax import scales
from var_jax.models.var_config import VARConfig
from var_jax.ops import attention as attention_ops

_MAX_LOG_SCALE_MUL = math.log(100.0)


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

  @nn.compact
  def __call__(self, x_BLC):
    cfg = self.config
    H, D = cfg.num_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    sigma = cfg.init_sigma
    # Hand-rolled rather than nn.DenseGeneral: DenseGeneral initialises a flattened 2-D kernel and
    # reshapes it, which breaks 4-D logical partitioning under a mesh.
    w_qkv = self.param("mat_qkv", _normal(sigma, ("embed", None, "heads", "kv")), (cfg.embed_dim, 3, H, D))
    qkv = jnp.einsum("blc,cjhd->bljhd", x_BLC.astype(dtype), w_qkv.astype(dtype))
    q_bias = self.param("q_bias", _zeros(("heads", "kv")), (H, D))
    v_bias = self.param("v_bias", _zeros(("heads", "kv")), (H, D))
    q = (qkv[:, :, 0] + q_bias.astype(dtype)).astype(jnp.float32)
    k = qkv[:, :, 1].astype(jnp.float32)
    v = (qkv[:, :, 2] + v_bias.astype(dtype))
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
      o_BHLD = attention_ops.block_causal_attention(q_BHLD, k_BHLD, v_BHLD, patch_nums=cfg.patch_nums,
                                                    impl=cfg.attention_impl)
    else:
      begin, end = self.decode_range
      B = x_BLC.shape[0]
      cache_shape = (B, H, attention_ops.kv_cache_len(cfg.patch_nums), D)
      names = ("cache_batch", "cache_heads", "cache_sequence", "cache_kv")
      cached_k = self.variable("cache", "cached_key", jnp.zeros, cache_shape, dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, cache_shape, dtype)
      cached_k.value = nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(cached_k.value, k_BHLD, (0, 0, begin, 0)), names)
      cached_v.value = nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(cached_v.value, v_BHLD, (0, 0, begin, 0)), names)
      o_BHLD = attention_ops.prefix_attention(q_BHLD, cached_k.value, cached_v.value, kv_len=end,
                                              impl=cfg.attention_impl)
    o_BLHD = o_BHLD.transpose(0, 2, 1, 3)
    w_proj = self.param("proj_kernel", _normal(sigma / math.sqrt(2 * cfg.depth), ("heads", "kv", "embed")),
                        (H, D, cfg.embed_dim))
    b_proj = self.param("proj_bias", _zeros(("embed",)), (cfg.embed_dim,))
    return jnp.einsum("blhd,hdc->blc", o_BLHD.astype(dtype), w_proj.astype(dtype)) + b_proj.astype(dtype)


class FFN(nn.Module):
  config: VARConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    sigma = cfg.init_sigma
    h = nn.Dense(cfg.mlp_dim, dtype=dtype, name="fc1", kernel_init=_normal(sigma, ("embed", "mlp")),
                 bias_init=_zeros(("mlp",)))(x)
    h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
    return nn.Dense(cfg.embed_dim, dtype=dtype, name="fc2",
                    kernel_init=_normal(sigma / math.sqrt(2 * cfg.depth), ("mlp", "embed")),
                    bias_init=_zeros(("embed",)))(h)


class AdaLNBlock(nn.Module):
  """x + gamma1 * Attn(LN(x)(1 + s1) + b1), then x + gamma2 * FFN(LN(x)(1 + s2) + b2)."""
  config: VARConfig
  train: bool = False
  decode_range: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, x_BLC, cond, drop_rate):
    """cond: (B, C) class condition, or (B, 6, C) shared AdaLN output; drop_rate: this block's."""
    cfg = self.config
    C = cfg.embed_dim
    dtype = jnp.dtype(cfg.dtype)
    if cfg.shared_aln:
      ada_gss = self.param(
          "ada_gss", _normal(1.0 / math.sqrt(C), (None, "embed"),
                             _ada_multiplier(cfg.init_adaln_gamma, cfg.init_adaln, axis=0)), (6, C))
      ada_B6C = ada_gss[None].astype(jnp.float32) + cond.astype(jnp.float32)
    else:
      ada = nn.Dense(6 * C, dtype=dtype, name="ada_lin",
                     kernel_init=_normal(cfg.init_sigma, ("embed", "mlp"),
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
    a = SelfAttention(cfg, self.decode_range, name="attn")(h)
    x_BLC = x_BLC + drop_path(a * gamma1.astype(dtype))
    h = (ln(x_BLC) * (1.0 + scale2) + shift2).astype(dtype)
    f = FFN(cfg, name="ffn")(h)
    x_BLC = x_BLC + drop_path(f * gamma2.astype(dtype))
    x_BLC = nn.with_logical_constraint(x_BLC.astype(dtype), ("batch", "length", "embed"))
    return x_BLC, None


def _remat_policy(name: str):
  if name in ("none", "everything_saveable"):
    return None
  return getattr(jax.checkpoint_policies, name)


class AdaLNBeforeHead(nn.Module):
  config: VARConfig

  @nn.compact
  def __call__(self, x_BLC, cond_BD):
    cfg = self.config
    C = cfg.embed_dim
    ada = nn.Dense(2 * C, name="ada_lin", dtype=jnp.dtype(cfg.dtype),
                   kernel_init=_normal(cfg.init_sigma * cfg.init_adaln, ("embed", "mlp")),
                   bias_init=_zeros(("mlp",)))(nn.silu(cond_BD)).astype(jnp.float32)
    # Reshape, then index: on jax 0.10.2 XLA mis-partitions the backward of a slice along a
    # tensor-sharded axis (ada[:, :C] with 2C split over "tensor" gave wrong gradients on a
    # 2x2x2 mesh; tests/test_train_var.py::test_sharded_step_equals_unsharded guards this).
    ada = ada.reshape(-1, 2, C)
    scale, shift = ada[:, None, 0], ada[:, None, 1]
    return _LN(cfg.norm_eps)(x_BLC) * (1.0 + scale) + shift


class VAR(nn.Module):
  """VAR transformer. See the module docstring for the two modes."""
  config: VARConfig
  train: bool = False
  decode_scale: int | None = None

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
    word_embed = nn.Dense(C, name="word_embed", kernel_init=_normal(sigma, (None, "embed")),
                          bias_init=_zeros(("embed",)))
    lvl_pos_LC = lvl_embed(jnp.asarray(scales.scale_ids(cfg.patch_nums))) + pos_1LC[0]

    labels_B = jnp.asarray(labels_B, jnp.int32)
    if self.train and cfg.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), labels_B.shape) < cfg.cond_drop_rate
      labels_B = jnp.where(drop, cfg.num_classes, labels_B)
    cond_BD = class_emb(labels_B)
    B = cond_BD.shape[0]
    sos_BlC = cond_BD[:, None, :] + pos_start

    if self.decode_scale is None:
      if x_BlCv is None or x_BlCv.shape[1] != L - cfg.first_l:
        raise ValueError(f"teacher forcing needs x_BlCv of shape (B, {L - cfg.first_l}, {cfg.z_channels}), "
                         f"got {None if x_BlCv is None else x_BlCv.shape}.")
      x_BLC = jnp.concatenate([sos_BlC, word_embed(x_BlCv.astype(jnp.float32))], axis=1) + lvl_pos_LC
      decode_range = None
    else:
      si = self.decode_scale
      begin, end = begin_ends[si]
      if si == 0:
        x_BLC = sos_BlC + lvl_pos_LC[:end]
      else:
        x_BLC = word_embed(x_BlCv.astype(jnp.float32)) + lvl_pos_LC[begin:end]
      decode_range = (begin, end)

    if cfg.shared_aln:
      shared = nn.Dense(6 * C, name="shared_ada_lin", dtype=dtype,
                        kernel_init=_normal(sigma, ("embed", "mlp")), bias_init=_zeros(("mlp",)))
      block_cond = shared(nn.silu(cond_BD)).reshape(B, 6, C)
    else:
      block_cond = cond_BD

    block = AdaLNBlock
    policy = _remat_policy(cfg.remat_policy)
    if cfg.remat_policy != "none":
      block = nn.remat(AdaLNBlock, policy=policy, prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                     split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, 0), length=cfg.depth,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    drop_rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.depth, dtype=jnp.float32)
    x_BLC = nn.with_logical_constraint(x_BLC.astype(dtype), ("batch", "length", "embed"))
    x_BLC, _ = blocks(cfg, self.train, decode_range, name="blocks")(x_BLC, block_cond, drop_rates)

    h = AdaLNBeforeHead(cfg, name="head_nm")(x_BLC.astype(jnp.float32), cond_BD)
    logits = nn.Dense(cfg.vocab_size, name="head", dtype=dtype,
                      kernel_init=_normal(sigma * cfg.init_head, ("embed", "vocab")),
                      bias_init=_zeros(("vocab",)))(h.astype(dtype))
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
