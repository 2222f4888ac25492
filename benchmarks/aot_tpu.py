"""Per-chip memory, FLOPs and roofline of the full-size VAR train step and sampler on TPU slices.

Compiles ahead of time on this CPU machine for a TPU topology (libtpu's compile-only client, no
TPU needed; `var_jax/aot/`), from abstract inputs only: no model is ever materialised here.

  python benchmarks/aot_tpu.py --case d16                 # v5e:4x4, batch 768, kernel vs XLA
  python benchmarks/aot_tpu.py --case d30                 # v5p-128, batch 1024, bf16, fsdp
  python benchmarks/aot_tpu.py --case d36                 # v5p-128, 512 px, batch 768
  python benchmarks/aot_tpu.py --case sample              # d16 sampler on one v5e chip, batch 8, 64
  python benchmarks/aot_tpu.py --case d30 --topology v5e-256 --mesh=-1,16,1 --remat nothing_saveable

Every case starts from the repository's training config (`config_lib.var_imagenet_config(depth)`,
i.e. configs/var_d{depth}.py: its mesh, remat policy, dtype, optimizer, batch), overridden only
by the flags given.

Printed per chip (XLA describes one device's partitioned program):
* memory (`memory_analysis()`): arguments, outputs, aliased (donated) bytes, temporaries,
  generated code, and their live sum argument + output - alias + temp + code against the HBM;
* cost (`cost_analysis()`): FLOPs, bytes accessed. XLA's TPU cost analysis charges a while loop's
  body once, so the per-block cost is counted once, not depth times; the figures are corrected
  by compiling the program a second time with the block scan unrolled by 2 (`aot.loop_corrected`;
  `--no-loop-correction` skips it and prints the raw figures). The splash training kernel
  declares no cost estimate, so on the kernel path the compiled FLOPs miss the attention
  matmuls: its roofline adds them analytically (`flops.kernel_attention_flops_per_example`: 14 C per
  visible (query, key) pair and layer, + 4 C under remat), and its bytes miss splash's q/k/v/o
  traffic;
* roofline: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip, peaks from `aot.CHIPS`
  (v5e 197 TFLOP/s & 819 GB/s, v4 275 & 1200, v5p 459 & 2765, v6e 918 & 1640), and for training
  the implied MFU ceiling = model FLOPs per chip / (roofline time x peak FLOP/s), model FLOPs
  = `var_jax.models.flops.flops_per_example` x batch, the figure the trainer logs its MFU with: 6 x the
  weights applied per token x L (4 for word_embed, whose input needs no gradient), 6 x the
  per-image AdaLN weights, 12 C per visible pair and layer (no remat recompute).
A JSON line per compiled program follows the table (lines starting with `{`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no TPU backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from var_jax import aot  # noqa: E402
from var_jax.train import config_lib
from var_jax.models import flops as var_flops  # noqa: E402
from var_jax.models.var_config import REMAT_POLICIES  # noqa: E402
from var_jax.train import train_var  # noqa: E402

CASES = {
    # case: (kind, depth, default topology, default batch(es), default attention impls)
    "d16": ("train", 16, "v5e:4x4", "768", "auto,xla"),
    "d20": ("train", 20, "v5e:4x4", "768", "auto"),
    "d24": ("train", 24, "v4-32", "768", "auto"),
    "d30": ("train", 30, "v5p-128", "1024", "auto"),
    "d36": ("train", 36, "v5p-128", "768", "auto"),
    "sample": ("sample", 16, "v5e:1x1", "8,64", "auto"),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--case", required=True, choices=sorted(CASES))
  parser.add_argument("--topology", help="TPU slice, e.g. v5e:4x4, v4-32, v5p-128, v5e-256 "
                      "(default per case)")
  parser.add_argument("--mesh", help="data,fsdp,tensor sizes, -1 = the rest (default: the "
                      "config's mesh for training, all chips on data for sampling)")
  parser.add_argument("--batch", help="global batches, comma-separated (default per case)")
  parser.add_argument("--impl", help="comma-separated attention impls, auto and/or xla "
                      "(default per case)")
  parser.add_argument("--remat", choices=REMAT_POLICIES,
                      help="remat policy (default: the config's)")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                      help="compute dtype (default: the config's)")
  parser.add_argument("--depth", type=int, help="VAR depth (default per case)")
  parser.add_argument("--pretokenized", action="store_true",
                      help="train on token maps (the config's :pretokenized variant) instead of "
                      "encoding images with the tokenizer inside the step")
  parser.add_argument("--mu-dtype", choices=("float32", "bfloat16"), help="Adam first-moment dtype")
  parser.add_argument("--allow-split-physical-axes", action="store_true",
                      help="let a mesh axis take part of a physical torus axis")
  parser.add_argument("--no-loop-correction", action="store_true",
                      help="skip the unroll-2 compile; print cost_analysis as compiled")
  return parser.parse_args(argv)


def _mesh_arg(text: str) -> list[tuple[str, int]]:
  sizes = [int(s) for s in text.split(",")]
  if len(sizes) != 3:
    raise SystemExit(f"--mesh takes data,fsdp,tensor, got {text!r}")
  return aot.mesh_config(*sizes)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _mib(n: float) -> str:
  return f"{n / 2**20:.1f} MiB"


def _ms(s: float) -> str:
  return f"{s * 1e3:.2f} ms"


def _kernels(a: aot.Analysis) -> str:
  """Mosaic call sites by kernel ("online-softmax" is XLA's own, e.g. in the tokenizer)."""
  return ", ".join(f"{name} x{count}" for name, count in a.kernels) or "none"


def _compiled_fields(program: aot.CompiledProgram, raw: aot.Analysis, chip: aot.ChipSpec,
                     unroll_s: float | None) -> dict:
  """The JSON fields every case reports about its compiled program: times, kernels, memory."""
  return dict(lower_s=program.lower_s, compile_s=program.compile_s, unroll2_compile_s=unroll_s,
              mosaic_calls=raw.mosaic_calls, kernels=dict(raw.kernels),
              argument_bytes=raw.argument_bytes, output_bytes=raw.output_bytes,
              alias_bytes=raw.alias_bytes, temp_bytes=raw.temp_bytes, code_bytes=raw.code_bytes,
              live_bytes=raw.peak_bytes, hbm_bytes=chip.hbm_bytes, fits=raw.fits,
              flops_compiled=raw.flops, bytes_compiled=raw.bytes_accessed)


def print_memory(a: aot.Analysis) -> None:
  print(f"  memory per chip: argument {_mib(a.argument_bytes)}, output {_mib(a.output_bytes)}, "
        f"alias {_mib(a.alias_bytes)}, temp {_mib(a.temp_bytes)}, generated code "
        f"{_mib(a.code_bytes)}")
  print(f"    live sum {_gib(a.peak_bytes)} of {_gib(a.hbm_bytes)} HBM "
        f"({100 * a.peak_bytes / a.hbm_bytes:.1f}%): {'fits' if a.fits else 'DOES NOT FIT'}")


def analyses(compile_fn, chip, depth: int, correct: bool):
  """(program, analysis as compiled, analysis for the roofline, unroll-2 compile seconds)."""
  t0 = time.perf_counter()
  program = compile_fn(1)
  print(f"  compiled in {time.perf_counter() - t0:.1f} s (trace+lower {program.lower_s:.1f} s, "
        f"XLA {program.compile_s:.1f} s); {aot.while_loops(program.compiled)} while loops",
        flush=True)
  raw = aot.analyze(program.compiled, chip)
  if not correct:
    return program, raw, raw, None
  t0 = time.perf_counter()
  unrolled = aot.analyze(compile_fn(2).compiled, chip)  # only its costs are needed
  seconds = time.perf_counter() - t0
  return program, raw, aot.loop_corrected(raw, unrolled, depth), seconds


def run_train(args, depth: int, topology: str, impl: str, batch: int) -> dict:
  chip = aot.chip_spec(topology)
  config = config_lib.var_imagenet_config(depth, pretokenized=args.pretokenized)
  config.model["attention_impl"] = impl
  if args.remat:
    config.model["remat_policy"] = args.remat
  if args.dtype:
    config.model["dtype"] = args.dtype
  if args.mu_dtype:
    config.optim.mu_dtype = args.mu_dtype
  mesh_cfg = _mesh_arg(args.mesh) if args.mesh else config.mesh
  mesh = aot.topology_mesh(topology, mesh_cfg,
                           allow_split_physical_axes=args.allow_split_physical_axes)
  chips = mesh.devices.size
  print(f"\n== VAR-d{depth} train step, {config.data.image_size} px: {topology} ({chips} x "
        f"{mesh.devices.flat[0].device_kind}), mesh {dict(mesh.shape)}, global batch {batch}, "
        f"{config.model['dtype']}, remat {config.model['remat_policy']}, attention {impl}, "
        f"input {'token maps' if args.pretokenized else 'images (tokenizer in the step)'} ==",
        flush=True)
  program, raw, cost, unroll_s = analyses(
      lambda unroll: aot.compile_train_step(config, mesh, global_batch=batch, unroll=unroll),
      chip, depth, not args.no_loop_correction)
  var_cfg = program.var_config
  print(f"  params {program.num_params / 1e6:.1f} M, L = {var_cfg.seq_len}, "
        f"{batch // chips} images per chip; Mosaic calls: {_kernels(raw)}")
  print_memory(raw)
  remat = config.model["remat_policy"] != "none"
  attention_flops = var_flops.kernel_attention_flops_per_example(var_cfg, remat) * batch / chips
  kernel = aot.uses_kernel(raw, "splash")
  flops = cost.flops + (attention_flops if kernel else 0.0)
  compute_s, memory_s = flops / chip.peak_flops, cost.bytes_accessed / chip.hbm_bandwidth
  roofline_s = max(compute_s, memory_s)
  model_flops_chip = program.model_flops / chips
  mfu = model_flops_chip / (roofline_s * chip.peak_flops)
  label = "loop-corrected" if unroll_s is not None else "as compiled"
  print(f"  cost per chip ({label}): {cost.flops / 1e12:.3f} TFLOP, "
        f"{cost.bytes_accessed / 1e9:.2f} GB accessed"
        + (f"  [as compiled: {raw.flops / 1e12:.3f} TFLOP, {raw.bytes_accessed / 1e9:.2f} GB; "
           f"unroll-2 compile {unroll_s:.1f} s]" if unroll_s is not None else ""))
  if kernel:
    rule = "14 + 4 (remat)" if remat else "14"
    print(f"    + splash attention (analytic, not in cost_analysis: {rule} C per visible pair and "
          f"layer): {attention_flops / 1e12:.3f} TFLOP -> {flops / 1e12:.3f} TFLOP")
  parts = var_flops.flops_breakdown(var_cfg)
  print(f"  model FLOPs per chip {model_flops_chip / 1e12:.3f} TFLOP (var_jax.models.flops per image: "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items() if k != "total")
        + f" GFLOP); compiled / model = {flops / model_flops_chip:.2f}")
  print(f"  roofline per chip: compute {_ms(compute_s)}, memory {_ms(memory_s)} -> "
        f"{_ms(roofline_s)} per step ({'compute' if compute_s >= memory_s else 'memory'}-bound); "
        f"MFU ceiling {100 * mfu:.1f}%; <= {batch / roofline_s:.0f} images/s, "
        f"{batch * var_cfg.seq_len / roofline_s / 1e6:.2f} M tokens/s")
  record = dict(case=f"d{depth}_train", topology=topology, chips=chips, mesh=dict(mesh.shape),
                batch=batch, attention=impl, dtype=config.model["dtype"],
                remat=config.model["remat_policy"], pretokenized=args.pretokenized,
                params=program.num_params,
                **_compiled_fields(program, raw, chip, unroll_s),
                flops=flops, bytes=cost.bytes_accessed,
                attention_flops_added=attention_flops if kernel else 0.0,
                model_flops_per_chip=model_flops_chip,
                roofline_s=roofline_s,
                compute_s=compute_s, memory_s=memory_s, mfu_ceiling=mfu)
  print(json.dumps(record), flush=True)
  return record


def run_sample(args, depth: int, topology: str, impl: str, batch: int) -> dict:
  chip = aot.chip_spec(topology)
  config = config_lib.var_imagenet_config(depth)
  config.model["attention_impl"] = impl
  if args.dtype:
    config.model["dtype"] = args.dtype
  mesh = aot.topology_mesh(topology, _mesh_arg(args.mesh) if args.mesh else aot.mesh_config(),
                           allow_split_physical_axes=args.allow_split_physical_axes)
  chips = mesh.devices.size
  vae_cfg = aot.tokenizer_config(config)
  var_cfg = train_var.var_config_from(config, vae_cfg)
  print(f"\n== VAR-d{depth} sampler (var_jax.sample via aot.lower_sample, cfg guidance: "
        f"{2 * batch} sequences), {var_cfg.image_size} px: {topology} ({chips} x "
        f"{mesh.devices.flat[0].device_kind}), mesh {dict(mesh.shape)}, batch {batch}, "
        f"{var_cfg.dtype} compute and matmul weights, attention {impl} ==", flush=True)
  param_dtype = var_cfg.dtype  # the placement stores the matmul weights in the compute dtype
  program, raw, cost, unroll_s = analyses(
      lambda unroll: aot.compile_sampler(var_cfg, vae_cfg, mesh, batch, unroll=unroll),
      chip, depth, not args.no_loop_correction)
  print(f"  params {program.num_params / 1e6:.1f} M; Mosaic calls: {_kernels(raw)}")
  print_memory(raw)
  label = "loop-corrected" if unroll_s is not None else "as compiled"
  print(f"  cost per chip ({label}): {cost.flops / 1e12:.3f} TFLOP, "
        f"{cost.bytes_accessed / 1e9:.2f} GB accessed"
        + (f"  [as compiled: {raw.flops / 1e12:.3f} TFLOP, {raw.bytes_accessed / 1e9:.2f} GB; "
           f"unroll-2 compile {unroll_s:.1f} s]" if unroll_s is not None else ""))
  print(f"  roofline per chip: compute {_ms(cost.compute_s)}, memory {_ms(cost.memory_s)} -> "
        f"{_ms(cost.roofline_s)} per call ({cost.bound}-bound); <= {batch / cost.roofline_s:.0f} "
        f"images/s")
  ideal = ideal_sampler_roofline(var_cfg, vae_cfg, mesh, chip, batch, program.num_params,
                                 param_dtype)
  print(f"  ideal per chip: transformer {ideal['transformer_flops'] / 1e12:.3f} TFLOP (analytic) + "
        f"decode {ideal['decode_flops'] / 1e12:.3f} TFLOP (compiled alone); "
        f"{ideal['min_bytes'] / 1e9:.2f} GB (weights once per scale, cache and logits once, "
        f"decode as compiled) -> {_ms(ideal['roofline_s'])}; compiled roofline / ideal = "
        f"{cost.roofline_s / ideal['roofline_s']:.2f}")
  if cost.optimal_s > 0:
    print(f"  XLA TPU cost model estimate {_ms(cost.optimal_s)} per call = "
          f"{cost.optimal_s / cost.roofline_s:.2f} x the compiled roofline")
  record = dict(case=f"d{depth}_sample", topology=topology, chips=chips, mesh=dict(mesh.shape),
                batch=batch, attention=impl, dtype=var_cfg.dtype,
                param_dtype=param_dtype, params=program.num_params,
                **_compiled_fields(program, raw, chip, unroll_s),
                flops=cost.flops, bytes=cost.bytes_accessed,
                roofline_s=cost.roofline_s, compute_s=cost.compute_s, memory_s=cost.memory_s,
                cost_model_s=cost.optimal_s, ideal_roofline_s=ideal["roofline_s"],
                ideal_flops=ideal["transformer_flops"] + ideal["decode_flops"],
                ideal_bytes=ideal["min_bytes"])
  print(json.dumps(record), flush=True)
  return record


def ideal_sampler_roofline(var_cfg, vae_cfg, mesh, chip, batch: int, num_params: int,
                           param_dtype: str) -> dict:
  """The sampler's roofline per chip if it did only the necessary work.

  FLOPs: the analytic transformer matmuls (`flops.sampler_flops_per_image`) plus the decode as
  compiled on its own; bytes: the lower bound of `aot.sampler_min_bytes` plus the decode's. Batch
  and weights per chip as the sampler runs them (batch split over the data axes, weights
  replicated).
  """
  per_chip = -(-batch // (mesh.shape["data"] * mesh.shape["fsdp"]))  # padded to the shards
  transformer = var_flops.sampler_flops_per_image(var_cfg)["total"] * per_chip
  decode = aot.analyze(aot.compile_decoder(vae_cfg, mesh, batch).compiled, chip)
  param_bytes = num_params * jnp.dtype(param_dtype).itemsize
  min_bytes = aot.sampler_min_bytes(var_cfg, per_chip, param_bytes) + decode.bytes_accessed
  roofline_s = max((transformer + decode.flops) / chip.peak_flops, min_bytes / chip.hbm_bandwidth)
  return dict(transformer_flops=transformer, decode_flops=decode.flops, min_bytes=min_bytes,
              roofline_s=roofline_s)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not aot.libtpu_available():
    print("libtpu is not installed (pip install '.[tpu]'): AOT TPU compilation needs it.",
          file=sys.stderr)
    return 1
  kind, depth, topology, batches, impls = CASES[args.case]
  depth = args.depth or depth
  topology = args.topology or topology
  batches = [int(b) for b in (args.batch or batches).split(",")]
  impls = [i for i in (args.impl or impls).split(",") if i]
  chip = aot.chip_spec(topology)
  print(f"{topology}: {aot.parse_topology(topology)[0]}, {chip.generation} "
        f"{chip.hbm_bytes / 2**30:.0f} GiB HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{chip.hbm_bandwidth / 1e9:.0f} GB/s per chip")
  run = run_train if kind == "train" else run_sample
  records = []
  for impl in impls:
    for batch in batches:
      try:
        records.append(run(args, depth, topology, impl, batch))
      except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
          raise
        # XLA refuses to compile a program whose buffers exceed the chip's HBM.
        print(f"  DOES NOT FIT: {str(err).splitlines()[0]}")
        print(json.dumps(dict(case=f"d{depth}_{kind}", topology=topology, batch=batch,
                              attention=impl, fits=False, error=str(err).splitlines()[0])),
              flush=True)
  if kind == "train" and len(records) == 2 and {r["attention"] for r in records} == {"auto", "xla"}:
    k, x = records if records[0]["attention"] == "auto" else records[::-1]
    print(f"\nkernel vs XLA per chip: live memory {_gib(k['live_bytes'])} vs "
          f"{_gib(x['live_bytes'])} (temp {_gib(k['temp_bytes'])} vs {_gib(x['temp_bytes'])}); "
          f"roofline {_ms(k['roofline_s'])} vs {_ms(x['roofline_s'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
