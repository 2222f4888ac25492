r"""`var-jax aot`: will a training config fit a TPU slice? Answered on this machine, before renting it.

    var-jax aot --config configs/var_d30.py --topology v5p-128
    var-jax aot --config configs/var_d16.py --topology v5e-16 --batch 512 --sample
    var-jax aot --config configs/var_d30.py --topology v5litepod-256 --mesh=-1,16,1 \
        --config.model.remat_policy=nothing_saveable

Compiles the config's train step ahead of time for the slice (libtpu's compile-only client: the
`tpu` extra, no TPU) from abstract inputs, so nothing is allocated here, and prints per chip: the
memory (arguments, outputs, temporaries, code, their total against the chip's HBM), the FLOPs of
one step, the model FLOPs (the trainer's MFU count) and the roofline: compute- or memory-bound, and
the MFU ceiling it allows. With --sample, the same for `var_jax.sample` of --sample-batch images on
the same mesh, through the public call's placement (`var_jax.aot.lower_sample`).

The slice is a Cloud TPU name (v5p-128, v4-32: TensorCores, two per chip; v5litepod-16, v5e-4,
v6e-8: chips) or generation:chip grid (v5e:4x4, v4:2x2x4). The mesh is the config's unless --mesh
is given. `--config.x=y` overrides fields as for `var-jax train`. The tokenizer's architecture is
the config's `tokenizer.overrides` over the released one; no file is read.

Exact FLOPs take a second compile (XLA counts a scanned block once; for the train step the second
compile unrolls the block scan by 2 to correct it, for the sampler it unrolls the block scans
fully); --no-loop-correction skips it. A program that does not fit,
a bad topology or config, or a missing libtpu is a one-line error and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from var_jax.cli import common
from var_jax.errors import ConfigError, VarJaxError

PROG = "var-jax aot"
# Images per chip of the sampler when --sample-batch is not given: `var-jax sample`'s default on TPU.
SAMPLE_BATCH_PER_CHIP = 16


def build_parser() -> argparse.ArgumentParser:
  """The command's flags; config overrides (`--config.x=y`) are parsed separately."""
  parser = common.new_parser(PROG, __doc__)
  common.add_config_flags(parser, "VAR training",
                          example="--config.model.dtype=float32 or --config.optim.mu_dtype=bfloat16")
  parser.add_argument("--topology", required=True,
                      help="TPU slice: v5p-128, v4-32, v5litepod-16, v5e-4, v6e-8, or v5e:4x4, "
                           "v4:2x2x4")
  parser.add_argument("--mesh", type=common.mesh_sizes, default=None, metavar="DATA,FSDP,TENSOR",
                      help="mesh sizes, -1 = the rest (default: the config's mesh; write "
                           "--mesh=-1,8,1)")
  parser.add_argument("--batch", type=common.positive_int, default=None,
                      help="global batch of the train step (default: the config's "
                           "global_batch_size)")
  parser.add_argument("--sample", action="store_true",
                      help="also compile var_jax.sample of the config's model on the same mesh")
  parser.add_argument("--sample-batch", type=common.positive_int, default=None,
                      help=f"images per sampling call (default {SAMPLE_BATCH_PER_CHIP} per chip of "
                           "the mesh's data x fsdp axes, as var-jax sample on TPU)")
  parser.add_argument("--no-loop-correction", action="store_true",
                      help="one compile per program; FLOPs as XLA counts them (each scanned block "
                           "once)")
  parser.add_argument("--allow-split-physical-axes", action="store_true",
                      help="let a mesh axis take part of a physical torus axis")
  parser.add_argument("--json", action="store_true",
                      help="also print each program's figures as one JSON line (starting with {)")
  return parser


def _check_var_config(config, config_arg: str) -> None:
  model = config.get("model") or {}
  if config.get("patch_nums") is None or "depth" not in model or config.get("tokenizer") is None:
    raise ConfigError(f"--config {config_arg} is not a VAR training config (it needs patch_nums, "
                      "model.depth and tokenizer; e.g. configs/var_d16.py).")


def _progress(line: str) -> None:
  print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _print_report(report, as_json: bool) -> None:
  print("\n".join(report.lines()), flush=True)
  if as_json:
    print(json.dumps(report.record()), flush=True)


def _require_fit(report, topology: str) -> None:
  if not report.fits:
    from var_jax.aot.report import DoesNotFitError, format_bytes
    a = report.as_compiled
    raise DoesNotFitError(f"the {report.kind} needs {format_bytes(a.peak_bytes)} per chip, more "
                          f"than the {format_bytes(a.hbm_bytes)} of HBM of a {topology} chip; a "
                          "smaller --batch, an fsdp or tensor axis in --mesh, or "
                          "--config.model.remat_policy=nothing_saveable needs less.")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
  """Compiles and prints; raises VarJaxError on bad input or a program that does not fit."""
  if "JAX_PLATFORMS" not in os.environ:
    import jax
    # The compile-only TPU client needs no TPU backend; leave a TPU on this host alone.
    jax.config.update("jax_platforms", "cpu")
  from var_jax import aot
  from var_jax.aot import report as aot_report
  from var_jax.inference import placement
  from var_jax.train import config_lib, train_var

  if not aot.libtpu_available():
    raise VarJaxError("libtpu is not installed: ahead-of-time TPU compiles need it, no TPU "
                      "(pip install 'var-jax[tpu]', or '.[tpu]' in a clone).")
  canonical, chip = aot.parse_topology(args.topology)
  config = config_lib.load_config_file(args.config, overrides, prog=PROG)
  _check_var_config(config, args.config)
  mesh_config = aot.mesh_config(*args.mesh) if args.mesh else config.mesh
  mesh = aot.topology_mesh(args.topology, mesh_config,
                           allow_split_physical_axes=args.allow_split_physical_axes)
  print(f"{args.topology} ({canonical}): {mesh.devices.size} x "
        f"{mesh.devices.flat[0].device_kind}, per chip {chip.hbm_bytes / 2**30:.0f} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bfloat16, {chip.hbm_bandwidth / 1e9:.0f} GB/s; "
        f"config {args.config}", flush=True)
  loop_correction = not args.no_loop_correction
  train = aot_report.train_step_report(config, mesh, chip, global_batch=args.batch,
                                       loop_correction=loop_correction, log=_progress)
  _print_report(train, args.json)
  _require_fit(train, args.topology)
  if args.sample:
    vae_cfg = aot.tokenizer_config(config)
    var_cfg = train_var.var_config_from(config, vae_cfg)
    batch = args.sample_batch or SAMPLE_BATCH_PER_CHIP * placement.batch_shards(mesh)
    sampler = aot_report.sampler_report(var_cfg, vae_cfg, mesh, chip, batch,
                                        loop_correction=loop_correction, log=_progress)
    _print_report(sampler, args.json)
    _require_fit(sampler, args.topology)
  print(f"fits: {' and '.join(['the train step'] + (['the sampler'] if args.sample else []))} "
        f"on {args.topology} with mesh {dict(mesh.shape)}")
  return 0


def main(argv=None) -> int:
  """`var-jax aot ...`; argv[0] is the program name. Returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  parser = build_parser()
  args, overrides = common.parse_config_args(parser, argv[1:])
  try:
    return run(args, overrides)
  except VarJaxError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
