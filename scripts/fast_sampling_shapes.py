"""Quality of the fast sampling modes on the shapes models (CPU, no download): README's table.

  python scripts/fast_sampling_shapes.py --workdir /tmp/fast_shapes \
      --ref shapes_ref.npz --fid-inception W.pth [--cca-steps 300 --refiner-steps 1000]

1. guidance-free: CCA fine-tune of the shipped `shapes-tiny` (`--config.objective=cca`);
2. a refiner: a smaller VAR (depth 2, width 128) trained on the shipped model's tokenizer;
3. `var-jax evaluate` of each mode on the same 500 class-balanced samples (seed 0): exact
   (shapes-tiny, cfg 1.5), shapes-tiny without guidance, the CCA model without guidance, and
   collaborative decoding (shapes-tiny drafts, the refiner samples the last two scales).
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


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--ref", required=True, help="shapes reference batch (var-jax fid-stats)")
  parser.add_argument("--fid-inception", required=True)
  parser.add_argument("--cca-steps", type=int, default=300)
  parser.add_argument("--cca-tblr", type=float, default=8e-4)
  parser.add_argument("--refiner-steps", type=int, default=1000)
  parser.add_argument("--num-samples", type=int, default=500)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  work = pathlib.Path(args.workdir).absolute()
  cca, refiner = work / "cca", work / "refiner"
  run(var_jax("train", f"--config={SHAPES}:steps={args.cca_steps},batch={args.batch}",
              f"--workdir={cca}", "--config.objective=cca", "--config.cca.reference=shapes-tiny",
              f"--config.optim.tblr={args.cca_tblr}", "--config.optim.warmup_steps=10",
              "--config.sample_cfg=0.0", "--config.checkpoint_every=100"))
  run(var_jax("train", f"--config={SHAPES}:steps={args.refiner_steps},batch={args.batch},"
                       "depth=2,width=128",
              f"--workdir={refiner}", f"--config.tokenizer.path={SHIPPED}"))
  modes = [
      ("exact: shapes-tiny, cfg 1.5", ["--model=shapes-tiny", "--cfg=1.5"]),
      ("shapes-tiny without guidance (cfg 0)", ["--model=shapes-tiny", "--cfg=0"]),
      ("guidance-free: CCA fine-tune, cfg 0", [f"--model={cca}", "--cfg=0"]),
      ("collaborative: shapes-tiny drafts 4 scales, d2 refiner 2, cfg 1.5",
       ["--model=shapes-tiny", f"--refiner={refiner}", "--draft-scales=4", "--cfg=1.5"]),
      ("refiner alone (d2), cfg 1.5", [f"--model={refiner}", "--cfg=1.5"]),
  ]
  rows = []
  for i, (name, flags) in enumerate(modes):
    out = work / f"eval_{i}.json"
    if not out.exists():
      run(var_jax("evaluate", *flags, f"--num-samples={args.num_samples}", f"--ref={args.ref}",
                  f"--fid-inception={args.fid_inception}", f"--out={out}", "--psnr-images=0"))
    rows.append((name, json.loads(out.read_text())))
  print(f"\n| {args.num_samples} samples | FID | sFID | precision | recall | class consistency |")
  print("|---|---|---|---|---|---|")
  for name, r in rows:
    print(f"| {name} | {r['fid']:.1f} | {r['sfid']:.1f} | {r['precision']:.3f} | "
          f"{r['recall']:.3f} | {100 * r['class_consistency']:.1f}% |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
