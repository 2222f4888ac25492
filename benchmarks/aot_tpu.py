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

The figures of each compiled program are `var-jax aot`'s, from the same code
(`var_jax.aot.report.train_step_report` / `sampler_report`; see that module for what they count):
per-chip memory against the HBM; FLOPs and bytes per chip from XLA's cost analysis, corrected for
the scanned blocks XLA counts once by a second compile with the block scan unrolled by 2
(`--no-loop-correction` skips it), plus splash attention counted analytically
(`flops.kernel_attention_flops_per_example`, 14 C per visible pair and layer, + 4 C under remat;
splash's q/k/v/o traffic stays missing from the bytes); the roofline against `aot.CHIPS`'s peaks
(v5e 197 TFLOP/s & 819 GB/s, v4 275 & 1200, v5p 459 & 2765, v6e 918 & 1640) and the MFU ceiling of
the model FLOPs (`var_jax.models.flops.flops_per_example` x batch, what the trainer logs its MFU
with). This benchmark adds the model FLOPs by part and compiled / model for training, the
sampler's true bound (`var_jax.inference.bound`: analytic FLOPs, the least bytes) and the TPU
cost model's estimate, and the kernel-vs-XLA comparison of the d16 case.
A JSON line per compiled program follows the table (lines starting with `{`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no TPU backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from var_jax import aot  # noqa: E402
from var_jax.models import flops as var_flops  # noqa: E402
from var_jax.models.var_config import REMAT_POLICIES  # noqa: E402
from var_jax.train import config_lib, train_var  # noqa: E402

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


def _ms(s: float) -> str:
  return f"{s * 1e3:.2f} ms"


def _log(line: str) -> None:
  print(f"  {line}", flush=True)


def _print_report(report: aot.ProgramReport) -> None:
  """`var-jax aot`'s lines for the program, then how the costs were corrected."""
  print("\n".join("  " + line for line in report.lines()))
  raw = report.as_compiled
  if report.loop_corrected:
    print(f"    [as compiled: {raw.flops / 1e12:.3f} TFLOP, {raw.bytes_accessed / 1e9:.2f} GB; "
          f"{aot.while_loops(report.program.compiled)} while loops; unrolled compile "
          f"{report.unroll_compile_s:.1f} s]")


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
  report = aot.train_step_report(config, mesh, chip, global_batch=batch,
                                 loop_correction=not args.no_loop_correction, log=_log)
  _print_report(report)
  var_cfg, cost = report.program.var_config, report.cost
  parts = var_flops.flops_breakdown(var_cfg)
  print("  model FLOPs per image by part (var_jax.models.flops): "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items() if k != "total")
        + f" GFLOP; compiled / model = {cost.flops / report.model_flops_per_chip:.2f}; "
        f"L = {var_cfg.seq_len}; <= {batch * var_cfg.seq_len / cost.roofline_s / 1e6:.2f} M "
        "tokens/s")
  record = dict(case=f"d{depth}_train", topology=topology, attention=impl,
                remat=config.model["remat_policy"], pretokenized=args.pretokenized,
                **report.record())
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
  report = aot.sampler_report(var_cfg, vae_cfg, mesh, chip, batch,
                              loop_correction=not args.no_loop_correction, log=_log)
  _print_report(report)
  cost = report.cost
  bound = aot.sampler_bound(aot.abstract_model(var_cfg, vae_cfg), mesh, chip, batch)
  print(f"  true bound per chip: transformer {bound.flops['transformer'] / 1e12:.3f} TFLOP + "
        f"decode {bound.flops['decoder'] / 1e12:.3f} TFLOP (analytic); "
        f"{bound.total_bytes / 1e9:.2f} GB (weights once per scale, the AdaLN projections and "
        f"embeddings once per call, cache, logits and activations once) -> {_ms(bound.seconds)}; "
        f"compiled roofline / bound = {cost.roofline_s / bound.seconds:.2f}")
  if cost.optimal_s > 0:
    print(f"  XLA TPU cost model estimate {_ms(cost.optimal_s)} per call = "
          f"{cost.optimal_s / cost.roofline_s:.2f} x the compiled roofline")
  record = dict(case=f"d{depth}_sample", topology=topology, attention=impl,
                param_dtype=param_dtype, **report.record(),
                bound_s=bound.seconds,
                bound_flops=bound.total_flops,
                bound_bytes=bound.total_bytes)
  print(json.dumps(record), flush=True)
  return record


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
      except aot.DoesNotFitError as err:  # XLA refused the program for the chip's HBM
        print(f"  DOES NOT FIT: {err}")
        print(json.dumps(dict(case=f"d{depth}_{kind}", topology=topology, batch=batch,
                              attention=impl, fits=False, error=str(err))), flush=True)
  if kind == "train" and len(records) == 2 and {r["attention"] for r in records} == {"auto", "xla"}:
    k, x = records if records[0]["attention"] == "auto" else records[::-1]
    print(f"\nkernel vs XLA per chip: live memory {_gib(k['live_bytes'])} vs "
          f"{_gib(x['live_bytes'])} (temp {_gib(k['temp_bytes'])} vs {_gib(x['temp_bytes'])}); "
          f"roofline {_ms(k['roofline_s'])} vs {_ms(x['roofline_s'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
