"""Trains and packages `shapes-tiny`, the model that ships inside var-jax (CPU, no download).

  python scripts/train_shapes_tiny.py --workdir /tmp/shapes_tiny [--tokenizer-steps 1000 --var-steps 1000]

1. a small multi-scale VQVAE on the generated shapes set (configs/vqvae_shapes.py);
2. a small VAR on its tokens (configs/var_shapes.py);
3. both exported (EMA weights, bfloat16 storage) to var_jax/assets/shapes-tiny as a converted
   directory, which `var-jax sample` loads by default;
4. `var-jax evaluate` on the result: class consistency and reconstruction PSNR.
Each stage resumes from its workdir if interrupted. Deterministic given the seeds, up to
float reduction order.
"""
from __future__ import annotations

import argparse
import json
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
  export(tok_dir, var_dir, pathlib.Path(args.out))
  print(f"tokenizer {t1 - t0:.0f} s, VAR {t2 - t1:.0f} s, total {t2 - t0:.0f} s")
  if not args.skip_evaluate:
    run([sys.executable, "-m", "var_jax.cli", "evaluate", f"--model={args.out}",
         "--num-samples=500", f"--out={work / 'evaluation.json'}"])
  return 0


def export(tok_dir: pathlib.Path, var_dir: pathlib.Path, out: pathlib.Path) -> None:
  """EMA params of both runs -> a converted directory with bfloat16 storage."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax.core import meta

  from var_jax.models.var import VAR
  from var_jax.inference.pretrained import save_converted
  from var_jax.inference.tokenizer import Tokenizer
  from var_jax.train import checkpointing, train_var, train_vqvae
  from var_jax.inference.var_model import VARModel

  vae_cfg, vae_params = train_vqvae.load_trained_tokenizer(tok_dir)
  config = ml_collections.ConfigDict(json.loads((var_dir / "config.json").read_text()))
  var_cfg = train_var.var_config_from(config, vae_cfg)
  abstract = meta.unbox(jax.eval_shape(lambda: VAR(var_cfg).init(
      jax.random.key(0), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, var_cfg.seq_len - var_cfg.first_l, var_cfg.z_channels))))["params"])
  _, var_params = checkpointing.restore_params(var_dir, abstract, key="ema_params")
  model = VARModel(var_cfg, var_params, Tokenizer(vae_cfg, vae_params))
  if out.exists():
    shutil.rmtree(out)
  save_converted(model, out, storage_dtype="bfloat16")
  size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
  print(f"exported shapes-tiny ({model.num_params():,} VAR params) to {out}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
  sys.exit(main())
