"""The least time one `var_jax.sample` call can take on a backend: the roofline of the necessary work.

A sampling call must at least do its matmuls and move its unavoidable bytes; whichever takes
longer at the backend's peak FLOP/s and memory bandwidth bounds the call from below (the
transformer's FLOPs at the peak of its dtype, the decoder's at the peak of the tokenizer's, when
it decodes in another dtype):

* FLOPs: the transformer's (`flops.sampler_flops_per_image`: linears, head, word embedding,
  AdaLN once, attention over the visible (query, key) pairs only) and the decoder's
  convolutions and attention (`flops.decoder_flops_per_image`), per image.
* bytes: the VAR weights once per scale (once per call when they fit in on-chip memory), except
  those a call needs once (the AdaLN projections of the label, which the sampler keeps for later
  scales, and the embeddings each scale slices, `var_once_param_bytes`); every
  key and value written once and each layer's visible cache prefix read once per scale; the
  float32 logits written and read once; every block's output written once (activations once);
  the decoder's weights once per call and each of its layers' outputs written once.

Nothing else is charged: the top-k/top-p filter, norms, softmax and elementwise work are free
here, so no program of these algorithms can beat the bound. The FLOPs are those of classical
matmuls and of the convolution algorithm the backend runs: with `platform` given, each of the
decoder's 3x3 convolutions is charged at the multiplies of the algorithm `ops.conv` picks for it
there (`ops.conv.conv3x3_multiplies`, the decision the traced model makes): on CPU Winograd
(`ops/conv_winograd.py`), 4 / 9 (F(2x2)) or 1 / 4 (F(4x4)) of a direct convolution's 2 k^2 Cin
Cout per output position, whose transforms (adds and constant scalings) are elementwise work,
or the bfloat16 row blocks (`ops/conv_rows.py`), (R + 2) / R of it for blocks of R rows; without
it (platform None) every convolution is direct, the model's math, which is the work of the
official PyTorch code and of the TPU and GPU paths. `SamplerBound.of(...)` is the per-device
bound for a batch (callers pass what runs on one device: the batch per chip on a sharded slice).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from var_jax import scales
from var_jax.models import flops as var_flops
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae_config import VQVAEConfig
from var_jax.ops import conv as conv_ops


def transformer_min_bytes(var_cfg: VARConfig, batch: int, param_bytes: int, *,
                          guidance: bool = True, weights_on_chip: bool = False,
                          once_bytes: int = 0) -> dict[str, float]:
  """Bytes the transformer part of sampling `batch` images must move, by part.

  "weights": `param_bytes` per scale, of which `once_bytes` only once (all once if
  `weights_on_chip`); "cache": keys and values of
  every token written once, each layer's visible prefix read once per scale; "logits": float32,
  written and read once; "activations": each block's output rows written once.
  """
  seqs = (2 if guidance else 1) * batch
  C, depth, L = var_cfg.embed_dim, var_cfg.depth, var_cfg.seq_len
  item = jnp.dtype(var_cfg.dtype).itemsize
  kv_row = 2 * depth * C * item  # keys and values of one token, all layers
  visible = sum(end for _, end in scales.begin_ends(var_cfg.patch_nums))
  return {
      "weights": float((1 if weights_on_chip else var_cfg.num_scales) * (param_bytes - once_bytes)
                       + once_bytes),
      "cache": float(seqs * kv_row * (L + visible)),
      "logits": float(2 * seqs * L * var_cfg.vocab_size * 4),
      "activations": float(seqs * L * C * depth * item),
  }


def decoder_min_bytes(vae_cfg: VQVAEConfig, batch: int, param_bytes: int) -> dict[str, float]:
  """Bytes decoding `batch` images must move: the weights once, every layer's output once."""
  item = jnp.dtype(vae_cfg.dtype).itemsize
  return {"decoder_weights": float(param_bytes),
          "decoder_activations": float(batch * var_flops.decoder_output_elements(vae_cfg) * item)}


def decoder_param_bytes(vae_params, dtype) -> int:
  """Bytes of the weights decoding reads (post_quant_conv and the decoder; the encoder and the
  quantizer's Phi convolutions are not used by the decode) stored in `dtype`."""
  item = jnp.dtype(dtype).itemsize
  return sum(math.prod(x.shape) * item for name in ("post_quant_conv", "decoder")
             for x in jax.tree.leaves(vae_params[name]))


def var_param_bytes(var_params, dtype) -> int:
  """Bytes of the VAR weights stored in `dtype` (the placement stores them in the compute dtype)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(var_params)) * jnp.dtype(dtype).itemsize


# VAR weights one sampling call needs once: the label's AdaLN projections (computed at the first
# scale and kept, `models.var`), the class embedding, and the position and level embeddings,
# of which each scale reads its own rows.
_ONCE_TOP_LEVEL = ("class_emb", "pos_start", "pos_1LC", "lvl_embed", "shared_ada_lin")
_ONCE_IN_BLOCKS = ("ada_lin", "ada_gss")


def var_once_param_bytes(var_params, dtype) -> int:
  """Bytes of the VAR weights (of `var_param_bytes`) a sampling call reads once, not per scale."""
  once = [var_params[k] for k in _ONCE_TOP_LEVEL if k in var_params]
  once += [var_params[m][k] for m in ("blocks", "head_nm") for k in _ONCE_IN_BLOCKS
           if k in var_params.get(m, {})]
  return var_param_bytes(once, dtype)


def decoder_conv3x3_multiplies(vae_cfg: VQVAEConfig, platform: str | None, batch: int):
  """(output side, Cin, Cout) -> multiplies per output pixel and channel pair of the algorithm a
  decoder of `vae_cfg` decoding `batch` images per device on `platform` runs that 3x3 conv by, as
  the traced model decides (`ops.conv.conv3x3_multiplies`); None for platform None (all direct)."""
  if platform is None:
    return None

  def multiplies(side: int, cin: int, cout: int) -> float:
    return conv_ops.conv3x3_multiplies(vae_cfg.conv_impl, out_hw=(side, side), batch=batch,
                                       dtype=vae_cfg.dtype, channels=(cin, cout),
                                       platform=platform)
  return multiplies


@dataclasses.dataclass(frozen=True)
class SamplerBound:
  """FLOPs and bytes of one sampling call on one device, and its roofline at given peaks.

  `peak_flops` is the matmul rate of the transformer's dtype; `decoder_peak_flops` that of the
  decoder's, when the tokenizer runs in another dtype (None: the same rate)."""
  flops: dict[str, float]
  bytes: dict[str, float]
  peak_flops: float
  bandwidth: float
  decoder_peak_flops: float | None = None

  @property
  def total_flops(self) -> float:
    return sum(self.flops.values())

  @property
  def total_bytes(self) -> float:
    return sum(self.bytes.values())

  @property
  def compute_s(self) -> float:
    """The FLOPs at their peaks: the decoder's at its own rate, the rest at the transformer's."""
    decoder = self.flops.get("decoder", 0.0)
    return ((self.total_flops - decoder) / self.peak_flops
            + decoder / (self.decoder_peak_flops or self.peak_flops))

  @property
  def memory_s(self) -> float:
    return self.total_bytes / self.bandwidth

  @property
  def seconds(self) -> float:
    """max(FLOPs / peak FLOP/s, bytes / bandwidth): no call can be faster."""
    return max(self.compute_s, self.memory_s)

  @property
  def bound(self) -> str:
    return "compute" if self.compute_s >= self.memory_s else "memory"

  @classmethod
  def of(cls, var_cfg: VARConfig, vae_cfg: VQVAEConfig, batch: int, *, var_param_bytes: int,
         vae_param_bytes: int, peak_flops: float, bandwidth: float, guidance: bool = True,
         weights_on_chip: bool = False, decoder_peak_flops: float | None = None,
         var_once_bytes: int = 0, platform: str | None = None) -> "SamplerBound":
    """The bound of sampling `batch` images (on one device) with these weights and peaks;
    `var_once_bytes` of the VAR weights are read once per call, the rest once per scale. The
    decoder's convolutions are charged as they run on `platform` ("cpu", "tpu", "gpu"; None:
    all direct; module docstring)."""
    if (batch < 1 or peak_flops <= 0 or bandwidth <= 0
        or (decoder_peak_flops is not None and decoder_peak_flops <= 0)):
      raise ValueError(f"batch, peak_flops, bandwidth and decoder_peak_flops must be positive, got "
                       f"{batch}, {peak_flops}, {bandwidth}, {decoder_peak_flops}.")
    if not 0 <= var_once_bytes <= var_param_bytes:
      raise ValueError(f"var_once_bytes must lie in [0, var_param_bytes={var_param_bytes}], got "
                       f"{var_once_bytes}.")
    flops = {"transformer": batch * var_flops.sampler_flops_per_image(var_cfg, guidance)["total"],
             "decoder": batch * var_flops.decoder_flops_per_image(
                 vae_cfg, decoder_conv3x3_multiplies(vae_cfg, platform, batch))["total"]}
    moved = {**transformer_min_bytes(var_cfg, batch, var_param_bytes, guidance=guidance,
                                     weights_on_chip=weights_on_chip, once_bytes=var_once_bytes),
             **decoder_min_bytes(vae_cfg, batch, vae_param_bytes)}
    return cls(flops, moved, float(peak_flops), float(bandwidth),
               None if decoder_peak_flops is None else float(decoder_peak_flops))

  @classmethod
  def for_model(cls, model, batch: int, *, peak_flops: float, bandwidth: float,
                guidance: bool = True, weights_on_chip: bool = False,
                decoder_peak_flops: float | None = None,
                platform: str | None = None) -> "SamplerBound":
    """`of` for a VARModel: its weights counted in the dtypes the placement stores them in."""
    return cls.of(model.config, model.tokenizer.config, batch,
                  var_param_bytes=var_param_bytes(model.params, model.config.dtype),
                  var_once_bytes=var_once_param_bytes(model.params, model.config.dtype),
                  vae_param_bytes=decoder_param_bytes(model.tokenizer.params,
                                                      model.tokenizer.config.dtype),
                  peak_flops=peak_flops, bandwidth=bandwidth, guidance=guidance,
                  weights_on_chip=weights_on_chip, decoder_peak_flops=decoder_peak_flops,
                  platform=platform)
