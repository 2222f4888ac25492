"""Faster than exact: images/s of exact, guidance-free and collaborative sampling (random weights).

  JAX_PLATFORMS=cpu python benchmarks/bench_fast.py                       # CPU, batch 1, 8, 32
  JAX_PLATFORMS=cpu python benchmarks/bench_fast.py --batch-sizes 8 --aot v5e:2x2,v5p:2x2x1

Modes, all through the public `var_jax.sample` (one jitted program each):
  exact          cfg 1.5: 2B sequences (classifier-free guidance);
  guidance-free  cfg 0: B sequences (what a CCA fine-tuned model samples with);
  collaborative  the large model drafts the first scales, the small one samples the last
                 (`refiner=`, `draft_scales=`; CoDe's d30 + d16, 8 + 2 scales), cfg 1.5;
  collab + free  the same without guidance.
Speed-ups are against exact sampling with the large model. With --aot, each mode is also compiled
for TPU slices (libtpu's compile-only devices, through `aot.lower_sample`: the public call's
placement) and its time per image estimated from XLA's cost analysis as max(FLOPs / peak,
bytes / HBM bandwidth), with every block of every model counted (the block scans compiled again
unrolled by 2, one model at a time). Random weights: speed only; quality is
scripts/fast_sampling_shapes.py's table.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

import _common
import var_jax
from var_jax import aot
from var_jax.aot import analysis

MODES = ("exact", "guidance-free", "collaborative", "collab + free")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser, batch_sizes="1,8,32", iters=1)
  parser.add_argument("--large", type=int, default=30, help="drafter depth (default 30)")
  parser.add_argument("--small", type=int, default=16, help="refiner depth (default 16)")
  parser.add_argument("--draft-scales", type=int, default=8, help="scales the large model drafts")
  parser.add_argument("--cfg", type=float, default=1.5)
  parser.add_argument("--dtype", default="float32", help="compute dtype of both models")
  parser.add_argument("--no-cpu", action="store_true", help="skip the CPU timings")
  parser.add_argument("--aot", type=lambda s: [t for t in s.split(",") if t], default=[],
                      help="TPU topologies to estimate on, e.g. v5e:2x2,v5p:2x2x1 (needs libtpu)")
  parser.add_argument("--aot-mesh", type=_common.int_list, default=[-1, 1, 1],
                      help="data,fsdp,tensor of the AOT mesh (default -1,1,1: batch over chips)")
  parser.add_argument("--aot-batch-sizes", type=_common.int_list, default=[8, 64])
  return parser.parse_args(argv)


def mode_kwargs(mode: str, small, args) -> dict:
  cfg = 0.0 if mode.endswith("free") else args.cfg
  if mode.startswith("collab"):
    return dict(cfg=cfg, refiner=small, draft_scales=args.draft_scales)
  return dict(cfg=cfg)


def cpu_rows(large, small, args) -> list[dict]:
  rows = []
  for batch in args.batch_sizes:
    labels = np.random.default_rng(args.seed + batch).integers(0, 1000, (batch,)).astype(np.int32)
    exact_s = None
    for mode in MODES:
      kwargs = mode_kwargs(mode, small, args)
      timing = _common.time_calls(
          lambda: var_jax.sample(large, labels, rng=jax.random.key(args.seed), **kwargs), args.iters)
      exact_s = timing.median_s if mode == "exact" else exact_s
      rows.append({"bench": "fast", "where": "cpu", "mode": mode, "batch": batch,
                   "images_per_s": batch / timing.median_s, "steady_s": timing.median_s,
                   "compile_s": timing.first_minus_steady_s,
                   "speedup": exact_s / timing.median_s})
      print(f"  cpu batch {batch} {mode}: {batch / timing.median_s:.3f} img/s "
            f"(x{exact_s / timing.median_s:.2f})", flush=True)
  return rows


def _corrected(looped: analysis.Analysis, unrolled: dict[int, analysis.Analysis]) -> analysis.Analysis:
  """`looped` plus (depth - 1) more blocks of each model's scans (one compile unrolled by 2 per
  model depth gives one block's cost: XLA's cost analysis counts a loop body once)."""
  extra = lambda name: sum((depth - 1) * (getattr(u, name) - getattr(looped, name))
                           for depth, u in unrolled.items())
  return dataclasses.replace(looped, flops=looped.flops + extra("flops"),
                             bytes_accessed=looped.bytes_accessed + extra("bytes_accessed"),
                             transcendentals=looped.transcendentals + extra("transcendentals"))


def aot_rows(large, small, args) -> list[dict]:
  rows = []
  # lower_sample places abstract views of both models: nothing is transferred.
  for topology in args.aot:
    chip = aot.chip_spec(topology)
    mesh = aot.topology_mesh(topology, aot.mesh_config(*args.aot_mesh))
    for batch in args.aot_batch_sizes:
      labels = jax.ShapeDtypeStruct((batch,), np.int32)
      exact_s = None
      for mode in MODES:
        kwargs = mode_kwargs(mode, small, args)
        depths = {large.config.depth}
        if mode.startswith("collab"):
          depths.add(small.config.depth)

        def compile_with(unroll=1, length=None):
          with aot.scan_unroll(unroll, length=length, slice_each_step=True):
            lowered = aot.lower_sample(large, labels, mesh=mesh, **kwargs)
          return analysis.analyze(lowered.compile(), chip)

        try:
          looped = compile_with()
          cost = _corrected(looped, {d: compile_with(2, d) for d in depths})
        except jax.errors.JaxRuntimeError as err:
          if "RESOURCE_EXHAUSTED" not in str(err):
            raise
          print(f"  {topology} batch {batch} {mode}: does not fit in HBM with mesh "
                f"{dict(mesh.shape)} ({str(err).strip().splitlines()[0][:160]})", flush=True)
          continue
        per_image = cost.roofline_s / batch
        exact_s = per_image if mode == "exact" else exact_s
        if exact_s is None:  # exact sampling did not fit: no speed-up to report
          exact_s = float("nan")
        rows.append({"bench": "fast", "where": topology, "mesh": dict(mesh.shape), "mode": mode,
                     "batch": batch, "estimated_s_per_image": per_image, "speedup": exact_s / per_image,
                     "fits": looped.fits, "peak_gib_per_chip": looped.peak_bytes / 2**30,
                     "bound": cost.bound, "tflops_per_image": cost.flops * mesh.size / batch / 1e12})
        print(f"  {topology} batch {batch} {mode}: {per_image * 1e3:.2f} ms/img estimated "
              f"(x{exact_s / per_image:.2f}), {rows[-1]['tflops_per_image']:.2f} TFLOP/img, "
              f"{cost.bound}-bound, {looped.peak_bytes / 2**30:.1f} GiB/chip", flush=True)
  return rows


def main(argv=None) -> None:
  args = parse_args(argv)
  env = _common.environment()
  _common.print_environment(env)
  tok = _common.random_tokenizer(args.seed)
  if args.no_cpu:  # AOT only: abstract weights (shapes and dtypes), nothing allocated
    large, small = (aot.abstract_model(_common.var_config_for(depth, tok.config, dtype=args.dtype),
                                       tok.config)
                    for depth in (args.large, args.small))
  else:
    large = _common.random_var_model(args.large, tok, args.seed, dtype=args.dtype)
    small = _common.random_var_model(args.small, tok, args.seed + 1, dtype=args.dtype)
  print(f"drafter VAR-d{args.large} ({large.num_params() / 1e6:.0f} M), refiner VAR-d{args.small} "
        f"({small.num_params() / 1e6:.0f} M), {args.draft_scales} of {large.config.num_scales} "
        f"scales drafted, cfg {args.cfg}, {args.dtype}")
  rows = []
  if not args.no_cpu:
    rows += cpu_rows(large, small, args)
  if args.aot:
    rows += aot_rows(large, small, args)
  for r in rows:
    _common.emit({**r, "large": args.large, "small": args.small, **env})
  _common.print_table(
      f"exact vs fast sampling, d{args.large} (+ d{args.small} refiner), {env['backend']}",
      [r for r in rows if r["where"] == "cpu"],
      [("batch", "batch", "d"), ("mode", "mode", ""), ("img/s", "images_per_s", ".3f"),
       ("s/call", "steady_s", ".2f"), ("x exact", "speedup", ".2f"), ("compile s", "compile_s", ".1f")])
  if args.aot:
    _common.print_table(
        "AOT estimate (XLA cost analysis roofline, every block counted)",
        [r for r in rows if r["where"] != "cpu"],
        [("slice", "where", ""), ("batch", "batch", "d"), ("mode", "mode", ""),
         ("ms/img", "estimated_s_per_image", ".3g"), ("x exact", "speedup", ".2f"),
         ("GiB/chip", "peak_gib_per_chip", ".1f"), ("bound", "bound", ""),
         ("TFLOP/img", "tflops_per_image", ".2f")])


if __name__ == "__main__":
  main()
