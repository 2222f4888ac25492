"""Quality of the fast sampling modes on the shapes models (CPU, no download): README's table.

  python scripts/fast_sampling_shapes.py --workdir /tmp/fast_shapes \
      --ref shapes_ref.npz --fid-inception W.pth [--cca-steps 600 --refiner-steps 2000]

1. guidance-free: CCA fine-tune of the shipped `shapes-tiny` (`--config.objective=cca`);
2. a refiner: a smaller VAR (depth 3, width 128; shapes-tiny is depth 4, width 192) trained on
   the shipped model's tokenizer;
3. `var-jax evaluate` of each mode on the same class-balanced samples (seed 0): exact
   (shapes-tiny, cfg 1.5), shapes-tiny without guidance, the CCA model without guidance, and
   collaborative decoding (shapes-tiny drafts, the refiner samples the last two scales), with each
   mode's sampler FLOPs per image (XLA cost analysis of the public call's program).
The reference and Inception weights are the README's (Evaluation: the shapes-tiny table). Every
stage resumes from its workdir. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = REPO / "configs" / "var_shapes.py"
SHIPPED = REPO / "var_jax" / "assets" / "shapes-tiny"


def run(cmd: list[str]) -> None:
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def var_jax(*args: str) -> list[str]:
  return [sys.executable, "-m", "var_jax.cli", *args]


def sampler_mflop_per_image(model_spec: str, kwargs: dict) -> float:
  """FLOPs of one image's `var_jax.sample` call (the public call's placement, `aot.lower_sample`)
  from XLA's cost analysis, every block unrolled so each is counted; batch 1, so the decoder runs
  once, outside any loop."""
  import jax
  import numpy as np

  import var_jax
  from var_jax import aot

  model = var_jax.load_pretrained(model_spec)
  if "refiner" in kwargs:
    kwargs = {**kwargs, "refiner": var_jax.load_pretrained(kwargs["refiner"])}
  depth = max(m.config.depth for m in (model, kwargs.get("refiner", model)))
  mesh = var_jax.sampling_mesh(devices=jax.devices()[:1])
  with aot.scan_unroll(depth):
    lowered = aot.lower_sample(model, np.array([0], np.int32), mesh=mesh, **kwargs)
  return lowered.compile().cost_analysis()["flops"] / 1e6


def evaluate_flags(model_spec: str, kwargs: dict) -> list[str]:
  """The `var-jax evaluate` flags that sample as `var_jax.sample(model, ..., **kwargs)` does."""
  names = {"cfg": "--cfg", "refiner": "--refiner", "draft_scales": "--draft-scales"}
  unknown = set(kwargs) - set(names)
  if unknown:
    raise ValueError(f"no `var-jax evaluate` flag for {sorted(unknown)}")
  return [f"--model={model_spec}"] + [f"{names[k]}={v}" for k, v in kwargs.items()]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--ref", required=True, help="shapes reference batch (var-jax fid-stats)")
  parser.add_argument("--fid-inception", required=True)
  parser.add_argument("--cca-steps", type=int, default=600)
  parser.add_argument("--cca-tblr", type=float, default=8e-4)
  parser.add_argument("--cca-lambda", type=float, default=50.0)
  parser.add_argument("--refiner-steps", type=int, default=2000)
  parser.add_argument("--refiner-depth", type=int, default=3)
  parser.add_argument("--refiner-width", type=int, default=128)
  parser.add_argument("--num-samples", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  work = pathlib.Path(args.workdir).absolute()
  # Runs are named by what makes them differ, so a second call with other flags trains anew
  # instead of resuming (or reusing the evaluation of) a different run.
  cca = work / f"cca_l{args.cca_lambda:g}_{args.cca_steps}steps"
  refiner = work / f"refiner_d{args.refiner_depth}_w{args.refiner_width}_{args.refiner_steps}steps"
  run(var_jax("train", f"--config={SHAPES}:steps={args.cca_steps},batch={args.batch}",
              f"--workdir={cca}", "--config.objective=cca", "--config.cca.reference=shapes-tiny",
              f"--config.cca.lambda_={args.cca_lambda}", f"--config.optim.tblr={args.cca_tblr}",
              "--config.optim.warmup_steps=10",
              "--config.sample_cfg=0.0", "--config.checkpoint_every=100"))
  run(var_jax("train", f"--config={SHAPES}:steps={args.refiner_steps},batch={args.batch},"
                       f"depth={args.refiner_depth},width={args.refiner_width}",
              f"--workdir={refiner}", f"--config.tokenizer.path={SHIPPED}"))
  refiner_name = f"d{args.refiner_depth} w{args.refiner_width} refiner"
  # (row, file key, the model and its `var_jax.sample` arguments); the `var-jax evaluate` flags
  # are derived from the same call, so the evaluated and the FLOP-counted programs are one.
  modes = [
      ("exact: shapes-tiny, cfg 1.5", "exact", "shapes-tiny", dict(cfg=1.5)),
      ("shapes-tiny without guidance (cfg 0)", "free", "shapes-tiny", dict(cfg=0.0)),
      (f"guidance-free: CCA fine-tune ({args.cca_steps} steps), cfg 0", cca.name, str(cca),
       dict(cfg=0.0)),
      (f"collaborative: shapes-tiny drafts 4 of 6 scales, the {refiner_name} samples 2, cfg 1.5",
       f"collab_{refiner.name}", "shapes-tiny",
       dict(cfg=1.5, refiner=str(refiner), draft_scales=4)),
      (f"the {refiner_name} alone, cfg 1.5", refiner.name, str(refiner), dict(cfg=1.5)),
  ]
  rows = []
  for name, key, model, kwargs in modes:
    out = work / f"eval_{key}_{args.num_samples}.json"
    if not out.exists():
      run(var_jax("evaluate", *evaluate_flags(model, kwargs), f"--num-samples={args.num_samples}",
                  f"--ref={args.ref}", f"--fid-inception={args.fid_inception}", f"--out={out}", "--psnr-images=0"))
    rows.append((name, json.loads(out.read_text()), sampler_mflop_per_image(model, kwargs)))
  print(f"\n| {args.num_samples} samples | FID | sFID | precision | recall | class consistency "
        "| sampler MFLOP/img |")
  print("|---|---|---|---|---|---|---|")
  for name, r, mflop in rows:
    print(f"| {name} | {r['fid']:.2f} | {r['sfid']:.1f} | {r['precision']:.3f} | "
          f"{r['recall']:.3f} | {100 * r['class_consistency']:.2f}% | {mflop:.0f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
