"""Trains and packages `shapes-tiny`, the model that ships inside var-jax (CPU, no download).

  python scripts/train_shapes_tiny.py --workdir /tmp/shapes_tiny [--tokenizer-steps 1000 --var-steps 1000]

1. a small multi-scale VQVAE on the generated shapes set (configs/vqvae_shapes.py);
2. a small VAR on its tokens (configs/var_shapes.py);
3. both exported by `var-jax export` (EMA weights, bfloat16 storage) to
   var_jax/assets/shapes-tiny, which `var-jax sample` loads by default;
4. `var-jax evaluate` on the result: class consistency and reconstruction PSNR.
Each stage resumes from its workdir if interrupted. Deterministic given the seeds, up to
float reduction order.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSET = REPO / "var_jax" / "assets" / "shapes-tiny"


def run(cmd: list[str]) -> None:
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tokenizer-steps", type=int, default=1000)
  parser.add_argument("--var-steps", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--out", default=str(ASSET))
  parser.add_argument("--skip-evaluate", action="store_true")
  args = parser.parse_args()
  work = pathlib.Path(args.workdir).absolute()
  tok_dir, var_dir = work / "tokenizer", work / "var"
  t0 = time.time()
  run([sys.executable, "-m", "var_jax.cli", "train-tokenizer",
       f"--config={REPO / 'configs' / 'vqvae_shapes.py'}:steps={args.tokenizer_steps},batch={args.batch}",
       f"--workdir={tok_dir}"])
  t1 = time.time()
  run([sys.executable, "-m", "var_jax.cli", "train",
       f"--config={REPO / 'configs' / 'var_shapes.py'}:steps={args.var_steps},batch={args.batch}",
       f"--workdir={var_dir}", f"--config.tokenizer.path={tok_dir}"])
  t2 = time.time()
  out = pathlib.Path(args.out)
  if out.exists():
    shutil.rmtree(out)  # the asset is rebuilt; `var-jax export` never overwrites
  run([sys.executable, "-m", "var_jax.cli", "export", f"--workdir={var_dir}", f"--out={out}",
       "--storage-dtype=bfloat16"])
  print(f"tokenizer {t1 - t0:.0f} s, VAR {t2 - t1:.0f} s, total {t2 - t0:.0f} s")
  if not args.skip_evaluate:
    run([sys.executable, "-m", "var_jax.cli", "evaluate", f"--model={args.out}",
         "--num-samples=500", f"--out={work / 'evaluation.json'}"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
