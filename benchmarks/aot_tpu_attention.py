"""AOT-compile VAR attention for a TPU topology on a CPU machine and print XLA's analyses.

Needs the tpu extra (libtpu), no TPU hardware:

  python benchmarks/aot_tpu_attention.py --topology v5e:2x2 --mesh 4,1,1 --depth 16

For the kernel path ("pallas_tpu") and the reference path ("xla") it compiles, per device:
* training: block_causal_attention forward + backward at 256 and 512 px;
* sampling: prefix_attention for every scale (queries pn², cache prefix end_si);
and prints flops, bytes accessed and the TPU cost model's time estimate (`optimal_seconds`) from
`compiled.cost_analysis()`, plus temp/argument bytes from `compiled.memory_analysis()`.

The cost model charges a Pallas call what its CostEstimate declares (the sampling kernel declares
its flops, exps and HBM bytes; splash declares none, so its training figures cover only the XLA
ops around it). It does not charge the ~0.35 us fixed cost of each Pallas grid step, so the
sampling table adds it explicitly from the kernel's grid before deciding kernel vs XLA per scale.

Parameters use compiler-chosen layouts (Layout.AUTO), as a KV cache living inside the sampler's
jit would; with default entry layouts XLA would add a relayout copy of the whole cache in front
of the Mosaic call, an artefact of compiling one call on its own.

The helpers are importable (benchmarks/aot_tpu.py, tests/test_attention.py).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.experimental.layout import Format, Layout
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from var_jax import scales
from var_jax.ops import attention
from var_jax.kernels import splash_block_causal
from var_jax.kernels import splash_masks
from var_jax.kernels import tpu_prefix

PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}
HEAD_DIM = 64
GRID_STEP_SECONDS = 0.35e-6  # fixed cost of one Pallas TPU grid step (Pallas TPU docs)
MOSAIC_CALL = "tpu_custom_call"


def tpu_topology_mesh(topology: str = "v5e:2x2", mesh_shape: Sequence[int] = (2, 1, 2)) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over the devices of an AOT TPU topology (no hardware)."""
  chips = tuple(int(c) for c in topology.split(":")[1].split("x"))
  bounds = chips + (1,) * (3 - len(chips))
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topology, chip_config_name="default",
      chips_per_host_bounds=bounds, num_slices=1, wrap=(False, False, False))
  devices = np.array(desc.devices)
  if devices.size != int(np.prod(mesh_shape)):
    raise ValueError(f"Mesh {tuple(mesh_shape)} needs {int(np.prod(mesh_shape))} devices; "
                     f"topology {topology} has {devices.size}.")
  return Mesh(devices.reshape(tuple(mesh_shape)), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)


def _bh_format(mesh: Mesh) -> Format:
  """(B, H, ·, D) arrays: batch over ("data", "fsdp"), heads over "tensor", layout left to XLA."""
  return Format(Layout.AUTO, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor")))


def compile_block_causal(mesh: Mesh, *, batch: int, heads: int, patch_nums: Sequence[int],
                         dtype=jnp.bfloat16, impl: str = "pallas_tpu", backward: bool = True):
  """Compiled block_causal_attention (forward, plus backward when `backward`) for `mesh`."""
  shape = (batch, heads, scales.seq_len(patch_nums), HEAD_DIM)

  def forward(q, k, v):
    return attention.block_causal_attention(q, k, v, patch_nums=patch_nums, impl=impl)

  def loss(q, k, v):
    return jnp.sum(forward(q, k, v).astype(jnp.float32) ** 2)

  fn = jax.value_and_grad(loss, argnums=(0, 1, 2)) if backward else forward
  fmt = _bh_format(mesh)
  out = (Format(Layout.AUTO, NamedSharding(mesh, PartitionSpec())), (fmt,) * 3) if backward else fmt
  arg = jax.ShapeDtypeStruct(shape, dtype)
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn, in_shardings=(fmt,) * 3, out_shardings=out)
    return jitted.trace(arg, arg, arg).lower().compile()


def compile_prefix(mesh: Mesh, *, batch: int, heads: int, q_rows: int, cache_len: int, kv_len: int,
                   dtype=jnp.bfloat16, impl: str = "pallas_tpu"):
  """Compiled prefix_attention of one sampling scale for `mesh`."""
  fmt = _bh_format(mesh)

  def fn(q, k, v):
    return attention.prefix_attention(q, k, v, kv_len=kv_len, impl=impl)

  q = jax.ShapeDtypeStruct((batch, heads, q_rows, HEAD_DIM), dtype)
  cache = jax.ShapeDtypeStruct((batch, heads, cache_len, HEAD_DIM), dtype)
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn, in_shardings=(fmt,) * 3, out_shardings=fmt)
    return jitted.trace(q, cache, cache).lower().compile()


def summarize(compiled) -> dict:
  """Per-device figures of a compiled executable."""
  cost = compiled.cost_analysis() or {}
  memory = compiled.memory_analysis()
  optimal = cost.get("optimal_seconds", -1.0)
  return {
      "gflops": cost.get("flops", 0.0) / 1e9,
      "mbytes": cost.get("bytes accessed", 0.0) / 2**20,
      "mexp": cost.get("transcendentals", 0.0) / 1e6,
      "optimal_us": optimal * 1e6 if optimal >= 0 else float("nan"),
      "temp_mib": memory.temp_size_in_bytes / 2**20,
      "arg_mib": memory.argument_size_in_bytes / 2**20,
      "mosaic_calls": compiled.as_text().count(MOSAIC_CALL),
  }


def splash_block_table(patch_nums: Sequence[int], padded_lens: Sequence[int],
                       blocks: Sequence[int] = (128, 256, 384, 512, 768)):
  """Rows (L_pad, block, grid steps, visible blocks, computed fraction) per head and batch row."""
  rows = []
  for padded_len in padded_lens:
    visible = splash_masks.dense_from_row_ends(
        splash_masks.block_causal_row_ends(patch_nums, padded_len), padded_len)
    for block in blocks:
      if padded_len % block:
        continue
      n = padded_len // block
      blocks_visible = visible.reshape(n, block, n, block).any(axis=(1, 3)).sum()
      rows.append((padded_len, block, n * n, int(blocks_visible),
                   blocks_visible * block * block / padded_len**2))
  return rows


def prefix_grid_steps(batch: int, heads: int, q_rows: int, cache_len: int, kv_len: int,
                      dtype) -> int:
  """Grid steps of one device's sampling-kernel call."""
  kv_block = tpu_prefix.kv_block_rows(kv_len, cache_len, dtype)
  head_block, row_block, padded_rows = tpu_prefix.plan_blocks(
      heads, q_rows, kv_block, HEAD_DIM, dtype)
  return batch * (heads // head_block) * (padded_rows // row_block)


def _fmt(summary: dict) -> str:
  optimal = summary["optimal_us"]
  optimal = "n/a" if np.isnan(optimal) else f"{optimal:.2f}"
  return (f"{summary['gflops']:8.3f} GF {summary['mbytes']:9.2f} MiB {optimal:>9s} us"
          f" temp {summary['temp_mib']:8.2f} MiB")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--mesh", default="4,1,1", help="data,fsdp,tensor sizes")
  parser.add_argument("--depth", type=int, default=16, help="VAR depth: heads = depth")
  parser.add_argument("--train_batch", type=int, default=32, help="global training batch")
  parser.add_argument("--sample_batch", type=int, default=64,
                      help="global sampling batch, already doubled for guidance")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  args = parser.parse_args()
  mesh = tpu_topology_mesh(args.topology, [int(s) for s in args.mesh.split(",")])
  dtype = jnp.dtype(args.dtype)
  heads = args.depth
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  head_shards = mesh.shape["tensor"]
  print(f"topology {args.topology}, mesh {dict(mesh.shape)}, depth {args.depth} ({heads} heads x "
        f"{HEAD_DIM}), {args.dtype}; all figures per device")

  print("\n== splash blocks per (head, batch row): grid steps vs logits computed ==")
  print("L_pad  block  steps  visible  computed/L_pad^2")
  for res, pns in PATCH_NUMS.items():
    seq_len = scales.seq_len(pns)
    pads = sorted({splash_block_causal.padded_seq_len(seq_len),
                   splash_masks.round_up(seq_len, 512)})
    for row in splash_block_table(pns, pads):
      print(f"{row[0]:5d} {row[1]:6d} {row[2]:6d} {row[3]:8d} {row[4]:10.3f}")
    chosen = splash_block_causal.training_block_sizes(splash_block_causal.padded_seq_len(seq_len))
    print(f"  {res}px: chosen block_q=block_kv={chosen.block_q}, "
          f"kv compute {chosen.block_kv_compute}, fused backward {chosen.use_fused_bwd_kernel}")

  print("\n== training: block_causal_attention forward + backward ==")
  for res, pns in PATCH_NUMS.items():
    for impl in ("pallas_tpu", "xla"):
      summary = summarize(compile_block_causal(
          mesh, batch=args.train_batch, heads=heads, patch_nums=pns, dtype=dtype, impl=impl))
      print(f"{res}px L={scales.seq_len(pns):5d} {impl:10s} {_fmt(summary)}"
            f"  mosaic calls {summary['mosaic_calls']}")
  print("(splash declares no cost estimate: its flops/bytes are not in the kernel rows, and the "
        "cost model gives no time (n/a) for a program it cannot fully cost)")

  print("\n== sampling: prefix_attention per scale ==")
  print("res  si  rows  kv_len | kernel: cost-model us + grid steps x 0.35 us = est us | xla us"
        " | xla temp MiB | faster")
  local_batch = args.sample_batch // batch_shards
  local_heads = heads // head_shards
  for res, pns in PATCH_NUMS.items():
    cache_len = attention.kv_cache_len(pns)
    for si, (pn, (_, end)) in enumerate(zip(pns, scales.begin_ends(pns))):
      rows = pn * pn
      kernel = summarize(compile_prefix(mesh, batch=args.sample_batch, heads=heads, q_rows=rows,
                                        cache_len=cache_len, kv_len=end, dtype=dtype,
                                        impl="pallas_tpu"))
      xla = summarize(compile_prefix(mesh, batch=args.sample_batch, heads=heads, q_rows=rows,
                                     cache_len=cache_len, kv_len=end, dtype=dtype, impl="xla"))
      steps = prefix_grid_steps(local_batch, local_heads, rows, cache_len, end, dtype)
      estimate = kernel["optimal_us"] + steps * GRID_STEP_SECONDS * 1e6
      faster = "kernel" if estimate < xla["optimal_us"] else "xla"
      auto_kernel = rows >= attention.PREFIX_KERNEL_MIN_ROWS
      note = "" if (faster == "kernel") == auto_kernel else "  (auto differs)"
      print(f"{res:4d} {si:3d} {rows:5d} {end:6d} | {kernel['optimal_us']:8.2f} + {steps:5d} steps"
            f" = {estimate:8.2f} | {xla['optimal_us']:8.2f} | {xla['temp_mib']:8.2f} | {faster}"
            f"{note}")
  print("auto uses the kernel for rows >= PREFIX_KERNEL_MIN_ROWS = "
        f"{attention.PREFIX_KERNEL_MIN_ROWS}")


if __name__ == "__main__":
  main()
