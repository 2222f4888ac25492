"""VAR attention: the one entry point the transformer calls, for training and for sampling.

`block_causal_attention`: teacher forcing over all L = sum(pn²) tokens; token q sees token k iff
scale(k) <= scale(q) (spec §4.3).
`prefix_attention`: sampling with a KV cache; the queries of the current scale see the first
`kv_len` cache entries, unmasked (spec §6).

q is already scaled (attn_l2_norm's per-head scale is folded in), so the softmax scale is 1.
Inputs are float32 or bfloat16; the softmax is float32; the output has q's dtype.

`impl` picks the implementation:
* "xla": plain einsum + masked float32 softmax (`xla_attention`), the reference for the kernels;
* "pallas_tpu": training uses JAX's splash attention (`splash_block_causal`), sampling a small
  Pallas kernel (`kernels/tpu_prefix`);
* "pallas_gpu": a Pallas Triton flash kernel with VAR's masks (`gpu_attention`), only when asked
  for by name (see GPU_AUTO_IMPL);
* "auto": on TPU the Pallas kernels, with the size thresholds below; XLA on CPU and, for now, on
  GPU (the active mesh's devices decide, else jax.default_backend()).
Kernel paths run under shard_map over the active mesh (`mesh_sharding`). `interpret=True` runs
the Pallas kernels in interpret mode, on any backend (slow; for tests).

The GPU kernel is preferred to cuDNN (`jax.nn.dot_product_attention`) as VAR's GPU kernel: cuDNN
can only take VAR's mask as a dense (L, L) bias it reads for every head, cannot skip the fully
masked tiles, and refuses float32; the Pallas kernel computes the mask from a row-end vector,
skips masked tiles and takes both dtypes. Its numerics are checked in interpret mode and its
lowering to Triton on CPU (tests/test_attention.py), but it has never run on a GPU, so "auto" does
not pick it yet.
"""
from __future__ import annotations

import functools
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from var_jax import scales
from var_jax.errors import ConfigError, InputError
from var_jax.kernels import gpu_flash
from var_jax.kernels import mesh_sharding
from var_jax.kernels import splash_block_causal
from var_jax.kernels import tpu_prefix
from var_jax.kernels import xla_reference
from var_jax.ops import float_bits
from var_jax.ops import host_cpu

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# impl="auto" on GPU. Stays "xla" until benchmarks/gpu_check.py has shown on a real GPU that the
# kernel is correct (numerics of every path against XLA) and faster (sampler and train-step
# throughput per impl), its output committed under benchmarks/results/. On an H200 its numerics
# pass in float32 and bfloat16 (results/gpu_check_nvidia_h200.json), but only the attention alone
# was timed: bf16 training fwd+bwd 1.85x faster than XLA, sampling prefixes equal, float32 14x
# slower. The throughput sections have not run, so "pallas_gpu" runs only when a config names it.
GPU_AUTO_IMPL = "xla"

# impl="auto" on TPU, training: splash from this many tokens up (every VAR resolution: L >= 680);
# shorter toy sequences would be mostly padding, so they stay on XLA (STYLE.md §7).
TRAINING_KERNEL_MIN_LEN = 128

# impl="auto" on TPU, sampling: the Pallas kernel for scales with at least this many query rows
# (pn >= 3: scales 2..9 at 256 and 512 px), XLA for the 1x1 and 2x2 scales. Decided with the TPU
# cost model on AOT-compiled sampling steps (benchmarks/aot_tpu_attention.py: d16, v5e:2x2,
# mesh data=4, 16 sequences x 16 heads per chip, bf16, cache 768 / 2304), adding the ~0.35 us per
# Pallas grid step that the cost model does not charge (one step per sequence x head block x row
# block):
#   px   scale (rows, kv_len)   kernel: model + steps x 0.35 = total    XLA model
#   256  0 (1, 1)                  1.5 +   16 x 0.35 =    7.1 us           0.4 us
#   256  1 (4, 5)                  1.8 +   16 x 0.35 =    7.4 us           5.3 us
#   256  2 (9, 14)                 2.2 +   16 x 0.35 =    7.8 us          17.4 us
#   256  6 (64, 155)              19.9 +   16 x 0.35 =   25.5 us         102.7 us
#   256  9 (256, 680)             83.9 +   32 x 0.35 =   95.1 us         757.0 us
#   512  9 (1024, 2240)          763.1 + 1024 x 0.35 = 1121.5 us        7440.1 us
# XLA writes the float32 (rows x kv_len) logits to HBM (170 MiB at 256 px scale 9, 2.2 GiB at
# 512 px) and pads each head's tiny matrices of the small scales to whole (8, 128) tiles; the
# kernel keeps the logits in VMEM. At 1 and 4 rows both are a few microseconds and the kernel's
# grid steps tip it to XLA. 4x the batch, or float32 with 30 heads on data=2 x tensor=2, moves no
# boundary; with a tiny per-chip load (8 sequences x 4 heads) XLA would also win scales 2-3, by
# under 1 us per call.
PREFIX_KERNEL_MIN_ROWS = 9


def kv_cache_len(patch_nums: Sequence[int]) -> int:
  """KV-cache length to allocate: L rounded up to 128, so every kernel reads the cache in place."""
  return splash_block_causal.padded_seq_len(scales.seq_len(_patch_nums(patch_nums)))


def _patch_nums(patch_nums) -> tuple[int, ...]:
  try:
    return scales.validate_patch_nums(patch_nums)
  except (TypeError, ValueError) as err:
    raise ConfigError(f"Bad patch_nums {patch_nums!r}: {err}") from err


def computation_platform(mesh: jax.sharding.Mesh | None = None) -> str:
  """Where the traced computation runs: "tpu", "gpu" or "cpu".

  `mesh`'s platform when given, else the active mesh's when there is one (e.g. compile-only TPU
  devices on a CPU host), else JAX's default backend.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh.abstract_mesh
  device = None if mesh.empty else mesh.abstract_device
  platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def _resolve_impl(impl: str, interpret: bool) -> str:
  """The concrete implementation ("xla", "pallas_tpu" or "pallas_gpu") a call will use."""
  if impl not in IMPLS:
    raise ConfigError(f"Unknown attention impl {impl!r}; valid choices are {IMPLS}.")
  if not isinstance(interpret, bool):
    raise ConfigError(f"interpret must be a bool, got {interpret!r}.")
  platform = computation_platform()
  if impl == "auto":
    return {"tpu": "pallas_tpu", "gpu": GPU_AUTO_IMPL}.get(platform, "xla")
  needed = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}.get(impl)
  if needed is not None and needed != platform and not interpret:
    raise ConfigError(
        f"impl={impl!r} needs a {needed.upper()} backend but this computation runs on "
        f"{platform!r}; use interpret=True to run the kernel in interpret mode, or one of "
        f"the valid choices {IMPLS} that fits (\"auto\" or \"xla\")."
    )
  return impl


def _check_arrays(names_arrays) -> jnp.dtype:
  """Checks q/k/v are 4-D float32/bfloat16 arrays of one dtype; returns the dtype."""
  for name, x in names_arrays:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise InputError(f"{name} must be an array, got {type(x).__name__}.")
    if x.ndim != 4:
      raise InputError(f"{name} must be 4-D (batch, heads, length, head_dim), got shape {x.shape}.")
    if jnp.dtype(x.dtype) not in DTYPES:
      raise InputError(f"{name} has dtype {x.dtype}; attention takes float32 or bfloat16.")
  dtypes = {jnp.dtype(x.dtype) for _, x in names_arrays}
  if len(dtypes) != 1:
    raise InputError(
        f"q, k and v must share one dtype, got {[str(x.dtype) for _, x in names_arrays]}.")
  return dtypes.pop()


def _check_gpu_head_dim(head_dim: int) -> None:
  """Triton tiles are powers of two, and tensor-core dots need >= 16 along each side."""
  if head_dim < gpu_flash.MIN_BLOCK_Q or head_dim & (head_dim - 1):
    raise InputError(
        f"impl='pallas_gpu' needs head_dim to be a power of two >= {gpu_flash.MIN_BLOCK_Q}, "
        f"got {head_dim}; use impl='xla'."
    )


def block_causal_attention(q_BHLD, k_BHLD, v_BHLD, *, patch_nums: Sequence[int], impl: str = "auto",
                           interpret: bool = False):
  """VAR teacher-forcing attention: token q sees token k iff scale(k) <= scale(q).

  Args:
    q_BHLD: queries (batch, heads, L, head_dim), already scaled; float32 or bfloat16.
    k_BHLD: keys, same shape and dtype.
    v_BHLD: values, same shape and dtype.
    patch_nums: the scales' sides; L must equal sum(pn²).
    impl: "auto", "xla", "pallas_tpu" or "pallas_gpu" (module docstring).
    interpret: run a Pallas kernel in interpret mode (any backend; slow).

  Returns:
    (batch, heads, L, head_dim) in q's dtype. Differentiable (the kernels' custom vjps).
  """
  pns = _patch_nums(patch_nums)
  _check_arrays((("q", q_BHLD), ("k", k_BHLD), ("v", v_BHLD)))
  if not q_BHLD.shape == k_BHLD.shape == v_BHLD.shape:
    raise InputError(f"q, k, v shapes differ: {q_BHLD.shape}, {k_BHLD.shape}, {v_BHLD.shape}.")
  seq_len = scales.seq_len(pns)
  if q_BHLD.shape[2] != seq_len:
    raise InputError(f"Sequence length {q_BHLD.shape[2]} != L={seq_len} of patch_nums {pns}.")
  chosen = _resolve_impl(impl, interpret)
  if chosen == "pallas_tpu" and impl == "auto" and seq_len < TRAINING_KERNEL_MIN_LEN:
    chosen = "xla"
  if chosen == "xla":
    return xla_reference.block_causal_attention(q_BHLD, k_BHLD, v_BHLD, patch_nums=pns)
  if chosen == "pallas_gpu":
    _check_gpu_head_dim(q_BHLD.shape[3])
  module = splash_block_causal if chosen == "pallas_tpu" else gpu_flash
  per_device = functools.partial(module.block_causal_attention, patch_nums=pns,
                                 interpret=interpret)
  return mesh_sharding.shard_map_over_batch_and_heads(per_device, q_BHLD, k_BHLD, v_BHLD,
                                                      kernel=chosen, interpret=interpret)


# On CPU the attention of a scale whose (sequence, head) pairs have large logits runs as a loop
# over blocks of pairs whose float32 logits stay under CPU_LOGITS_BLOCK_BYTES
# (`_cpu_prefix_attention`). As one batched call, XLA:CPU writes the logits of every pair to
# memory, reads them back for the softmax and again for P·V; a block's logits stay in the caches
# between its matmuls. Pairs with smaller logits than CPU_BLOCK_MIN_PAIR_LOGITS_BYTES run as one
# call however many there are: their batched matmuls are efficient as they are, and a loop's
# copies (q's transpose, the layer's cache prefix) and steps cost more than they save. Measured
# with benchmarks/bench_cpu_attention.py (one layer of VAR-d16, identical outputs, Intel Xeon with
# AMX, 2 cores), one call -> blocks of 6 MiB:
#   bf16 batch 8:    13x13 (287 KB per pair) 80.2 -> 29.3 ms, 16x16 (696 KB) 204.1 -> 73.4 ms;
#                    10x10 (102 KB) 9.6 -> 16.5 ms and 8x8 (40 KB) 4.7 -> 7.9 ms (so one call);
#   bf16 batch 1:    13x13 5.3 -> 4.0 ms, 16x16 14.9 -> 9.4 ms;
#   float32 batch 8: 13x13 105.3 -> 70.8 ms, 16x16 293.7 -> 143.7 ms; 8x8 17.0 -> 24.8 ms.
# Blocks of 12 or 24 MiB were slower for the large pairs (13x13 at bf16 batch 8: 63 / 78 ms);
# the small ones stay faster in one call at 64 sequences too (10x10: 46 ms, against 69 ms in
# blocks of 32 MiB).
CPU_LOGITS_BLOCK_BYTES = 6 * 2**20
CPU_BLOCK_MIN_PAIR_LOGITS_BYTES = 128 * 2**10


def _pairs_per_block(pairs: int, pair_logits_bytes: int) -> int:
  """The most (sequence, head) pairs, a divisor of `pairs` (all pairs of the shard), whose
  float32 logits fit in CPU_LOGITS_BLOCK_BYTES; at least 1."""
  per_block = max(1, min(pairs, CPU_LOGITS_BLOCK_BYTES // max(1, pair_logits_bytes)))
  while pairs % per_block:
    per_block -= 1
  return per_block


def _bits_codec(dtype):
  """(to, from): how the CPU path moves `dtype` values through XLA: 16-bit floats as their uint16
  bit patterns (`ops.float_bits`), other dtypes as they are."""
  if jnp.dtype(dtype).itemsize == 2:
    return float_bits.to_bits, lambda bits: float_bits.from_bits(bits, dtype)
  return (lambda x: x), (lambda x: x)


def _cpu_prefix_attention(q_BHlD, k_NBHSD, v_NBHSD, layer, *, kv_len: int, dtype):
  """One device's CPU attention of a sampling scale: q against rows [0, kv_len) of layer `layer`
  of the cache stacks. 16-bit q and stacks come as uint16 bit patterns (`ops.float_bits`) of
  `dtype`, so that XLA:CPU's float normalization does not carry float32 copies of them through
  the block loop; the output is `dtype` (its bit patterns for 16-bit dtypes).

  bf16 operands (float32 logits and softmax either way) only where the CPU has AMX: without it
  XLA's CPU backend runs these batched per-head matmuls several times slower from bf16 than from
  float32 operands (27 GFLOP/s for VAR-d16's last scale in a profile on an AMD host; a bf16
  VAR-d16 call at batch 1 went 6.9 -> 6.6 s in float32), with it about twice as fast (an Intel
  AMX host: 5.5 -> 3.0 s of attention in a batch-8 call; `host_cpu`).
  """
  to_bits, from_bits = _bits_codec(dtype)
  operand = jnp.dtype(dtype) if host_cpu.has_amx_bf16() else jnp.dtype(jnp.float32)
  cast = lambda x: from_bits(x).astype(operand)
  B, H, rows, D = q_BHlD.shape
  pairs = B * H
  pair_bytes = 4 * rows * kv_len
  small = pair_bytes < CPU_BLOCK_MIN_PAIR_LOGITS_BYTES
  per_block = pairs if small else _pairs_per_block(pairs, pair_bytes)
  if per_block == pairs:  # one call
    k, v = (cast(layer_prefix(c, layer, kv_len)) for c in (k_NBHSD, v_NBHSD))
    q, q_layout = cast(q_BHlD), "bhqd"
    if q.dtype == jnp.bfloat16:
      # Back to the projection's (B, l, H, D) layout (the caller's transpose and this one cancel):
      # XLA:CPU widens a bf16 QK matmul to float32 when its q is a transpose
      # (`xla_reference.masked_attention`). A float32 QK was slower so (16.7 -> 22.6 ms).
      q, q_layout = q.transpose(0, 2, 1, 3), "bqhd"
    out = xla_reference.prefix_attention(q, k, v, kv_len=kv_len, q_layout=q_layout)
    return to_bits(out.astype(dtype))
  # (sequence, head) pairs flattened, so that every block reads contiguous rows: one copy of q
  # (a transpose of the projection's layout) and of the layer's cache prefix. Given the whole
  # stacks, XLA copied them whole into the loop at every layer, since the next layer's cache
  # write updates them in place after it (10 s more in a VAR-d16 bf16 batch-8 call); carried
  # through the loop and handed back, they were copied all the same.
  q_PlD = q_BHlD.reshape(pairs, rows, D)
  k_PLD, v_PLD = (layer_prefix(c, layer, kv_len).reshape(pairs, kv_len, D)
                  for c in (k_NBHSD, v_NBHSD))

  def block(i, out_PlD):
    first = i * per_block
    q, k, v = (cast(jax.lax.dynamic_slice_in_dim(x, first, per_block, axis=0))
               for x in (q_PlD, k_PLD, v_PLD))
    o = xla_reference.masked_attention(q[None], k[None], v[None])[0]
    return jax.lax.dynamic_update_slice_in_dim(out_PlD, to_bits(o.astype(dtype)), first, axis=0)

  out_PlD = jax.lax.fori_loop(0, pairs // per_block, block,
                              jnp.zeros((pairs, rows, D), q_PlD.dtype))
  return out_PlD.reshape(B, H, rows, D)


def layer_prefix(cache_NBHSD, layer, kv_len: int):
  """Rows [0, kv_len) of one layer's cache out of the (layers, B, H, S, D) stack; `layer` may be
  traced, `kv_len` is static.

  XLA:TPU copies a dynamically indexed layer whole (all S rows, 768 for VAR-d16) before a slice
  of it is read, so elsewhere the prefix is sliced in one dynamic slice. XLA:CPU instead fuses
  the layer index with the [:kv_len] slice into the attention's reads, and the one dynamic slice
  of the prefix made a VAR-d16 float32 call at batch 1 slower (7.5 -> 8.6 s), so it indexes.
  """
  if computation_platform() == "cpu":
    return jax.lax.dynamic_index_in_dim(cache_NBHSD, layer, axis=0, keepdims=False)[:, :, :kv_len]
  _, B, H, _, D = cache_NBHSD.shape
  return jax.lax.dynamic_slice(cache_NBHSD, (layer, 0, 0, 0, 0), (1, B, H, kv_len, D))[0]


def prefix_attention(q_BHlD, k_BHSD, v_BHSD, *, kv_len: int, impl: str = "auto",
                     interpret: bool = False, layer=None):
  """Sampling attention: queries of one scale against the first `kv_len` KV-cache entries.

  Args:
    q_BHlD: queries of the current scale (batch, heads, pn², head_dim), already scaled.
    k_BHSD: the preallocated key cache (batch, heads, S, head_dim), S >= kv_len, same dtype; with
      `layer`, the stack of every layer's key cache (layers, batch, heads, S, head_dim).
    v_BHSD: the value cache, same shape as k_BHSD.
    kv_len: static int, the number of valid cache entries (end of the current scale).
    impl: "auto", "xla", "pallas_tpu" or "pallas_gpu" (module docstring).
    interpret: run a Pallas kernel in interpret mode (any backend; slow).
    layer: with stacked caches, the layer to attend to (an int or int32 scalar, may be traced).
      The TPU kernel reads that layer's rows out of the stack itself; the other paths index it.

  Returns:
    (batch, heads, pn², head_dim) in q's dtype.
  """
  if layer is not None:
    for name, c in (("k", k_BHSD), ("v", v_BHSD)):
      if getattr(c, "ndim", None) != 5:
        raise InputError(f"With layer=, {name} must be the stacked cache (layers, batch, heads, "
                         f"length, head_dim), got shape {getattr(c, 'shape', None)}.")
    _check_arrays((("q", q_BHlD), ("k", k_BHSD[0]), ("v", v_BHSD[0])))
  else:
    _check_arrays((("q", q_BHlD), ("k", k_BHSD), ("v", v_BHSD)))
  if k_BHSD.shape != v_BHSD.shape:
    raise InputError(f"k and v cache shapes differ: {k_BHSD.shape} vs {v_BHSD.shape}.")
  cache_BHSD = k_BHSD.shape[-4:]
  if q_BHlD.shape[:2] != cache_BHSD[:2] or q_BHlD.shape[3] != cache_BHSD[3]:
    raise InputError(
        f"q {q_BHlD.shape} and the cache {k_BHSD.shape} must agree on batch, heads and head_dim."
    )
  if isinstance(kv_len, bool) or not isinstance(kv_len, numbers.Integral):
    raise InputError(f"kv_len must be a static Python int, got {type(kv_len).__name__}.")
  kv_len = int(kv_len)
  if not 1 <= kv_len <= cache_BHSD[2]:
    raise InputError(f"kv_len={kv_len} must be in [1, cache length {cache_BHSD[2]}].")
  chosen = _resolve_impl(impl, interpret)
  if chosen == "pallas_tpu" and impl == "auto" and q_BHlD.shape[2] < PREFIX_KERNEL_MIN_ROWS:
    chosen = "xla"
  if chosen == "xla" and computation_platform() == "cpu":
    dtype = q_BHlD.dtype
    to_bits, from_bits = _bits_codec(dtype)
    if layer is None:
      k_BHSD, v_BHSD, layer = k_BHSD[None], v_BHSD[None], 0
    # Plain XLA: a jit without a mesh may partition it (`interpret=True` tells mesh_sharding so).
    out = mesh_sharding.shard_map_over_batch_and_heads(
        functools.partial(_cpu_prefix_attention, kv_len=kv_len, dtype=dtype),
        to_bits(q_BHlD), to_bits(k_BHSD), to_bits(v_BHSD), jnp.asarray(layer, jnp.int32),
        batch_dims=(0, 1, 1, None), kernel="CPU attention", interpret=True)
    return from_bits(out)
  if layer is not None and chosen != "pallas_tpu":
    # The layer's first kv_len rows only: XLA:TPU copies a dynamically indexed slice whole (all
    # S rows, 768 for VAR-d16) before the attention reads kv_len of them.
    k_BHSD, v_BHSD = (layer_prefix(c, layer, kv_len) for c in (k_BHSD, v_BHSD))
    layer = None
  if chosen == "xla":
    return xla_reference.prefix_attention(q_BHlD, k_BHSD, v_BHSD, kv_len=kv_len)
  if chosen == "pallas_gpu":
    _check_gpu_head_dim(q_BHlD.shape[3])
  module = tpu_prefix if chosen == "pallas_tpu" else gpu_flash
  per_device = functools.partial(module.prefix_attention, kv_len=kv_len, interpret=interpret)
  arrays, batch_dims = (q_BHlD, k_BHSD, v_BHSD), None
  if layer is not None:  # the TPU kernel's stacks (batch on axis 1) and the layer, replicated
    arrays, batch_dims = arrays + (jnp.asarray(layer, jnp.int32),), (0, 1, 1, None)
  return mesh_sharding.shard_map_over_batch_and_heads(per_device, *arrays, batch_dims=batch_dims,
                                                      kernel=chosen, interpret=interpret)
