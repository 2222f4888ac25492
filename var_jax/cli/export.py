"""`var-jax export`: a training run's weights as a model the rest of var-jax loads.

  var-jax export --workdir /runs/var_d16 --out models/var_d16 [--step N] [--no-ema]
  var-jax sample --model models/var_d16 ...        # load_pretrained("models/var_d16") in Python
  var-jax export --workdir /runs/vqvae --out models/vqvae    # a tokenizer run
  var-jax train --config var_d16 --config.tokenizer.path=models/vqvae ...

A VAR run (`var-jax train`) becomes a converted-format directory (config.json + params/, the
format of `var-jax convert` and the shipped model) holding its weights and the tokenizer its
config names; a tokenizer run (`var-jax train-tokenizer`) becomes a tokenizer directory that
`config.tokenizer.path` takes. EMA weights by default where the run kept them. Nothing is
overwritten: --out must not hold a model. `load_pretrained(WORKDIR)` also reads a VAR run directly.
"""
from __future__ import annotations

import sys

from var_jax.cli import common
from var_jax.errors import InputError

PROG = "var-jax export"


def build_parser():
  p = common.new_parser(PROG, __doc__)
  p.add_argument("--workdir", required=True, help="the training run's workdir")
  p.add_argument("--out", required=True, help="directory to write (must not hold a model)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--no-ema", action="store_true", help="the raw params, not the EMA weights")
  p.add_argument("--storage-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="dtype of the stored weights (bfloat16 halves the files; loading casts back)")
  return p


def _size_mb(path) -> float:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main(argv=None) -> int:
  import pathlib
  argv = list(sys.argv if argv is None else argv)
  args = build_parser().parse_args(argv[1:])
  common.check_output_dir(args.out, "--out", remote_ok=False)
  out = pathlib.Path(args.out)
  if (out / "config.json").exists() or (out / "params").exists():
    raise InputError(f"--out {common.shown(out)} already holds a model; nothing was written. "
                     "Choose another --out or delete it.")
  from etils import epath
  from var_jax.checkpoints import runs
  from var_jax.inference import model_dirs, training_runs
  workdir = epath.Path(args.workdir)  # gs:// runs too
  if not workdir.is_dir():
    raise InputError(f"--workdir {common.shown(args.workdir)} is not a directory.")
  kind = runs.run_kind(runs.read_config(workdir))
  use_ema = not args.no_ema
  if kind == runs.VAR_RUN:
    model, step, key = training_runs.model_and_origin_from_run(workdir, step=args.step,
                                                               use_ema=use_ema)
    path = model_dirs.save_converted(model, out, storage_dtype=args.storage_dtype)
    what = f"VAR ({model.num_params():,} params) with its tokenizer"
  elif kind == runs.TOKENIZER_RUN:
    tokenizer, step, key = training_runs.tokenizer_from_run(workdir, step=args.step,
                                                            use_ema=use_ema)
    path = model_dirs.save_tokenizer(tokenizer, out, storage_dtype=args.storage_dtype)
    what = "tokenizer"
  else:
    raise InputError(f"--workdir {common.shown(args.workdir)} is not a training run: it needs the "
                     "config.json that `var-jax train` / `train-tokenizer` write there.")
  if use_ema and key != "ema_params":
    print("note: the run kept no EMA weights (optim.ema_decay 0); exported its params.")
  print(f"exported the {what} of step {step} ({key}) to {common.shown(path)}: "
        f"{_size_mb(path):.1f} MB, {args.storage_dtype}")
  return 0
