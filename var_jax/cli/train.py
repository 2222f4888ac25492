"""`var-jax train` (VAR) and `var-jax train-tokenizer` (the multi-scale VQVAE): train per a config
file in a workdir, resuming from its latest checkpoint.

    var-jax train --config var_tiny --workdir /tmp/var_tiny              # CPU, generated data
    var-jax train --config configs/var_d16.py --workdir gs://BUCKET/var_d16 \\
        --config.tokenizer.path=vae_ch160v4096z32.pth --config.data.data_dir=gs://BUCKET/tfds
"""
from __future__ import annotations

import sys

from var_jax.cli import common


def build_parser(prog: str, what: str):
  p = common.new_parser(prog, __doc__)
  common.add_config_flags(p, what)
  p.add_argument("--workdir", required=True,
                 help="checkpoints, metrics and sample grids go here (gs:// ok); an existing run resumes")
  common.add_verbose_flag(p)
  return p


def _run(argv, prog: str, what: str, module: str) -> int:
  args, config = common.parse_with_config(build_parser(prog, what), argv[1:])
  common.check_output_dir(args.workdir, "--workdir", remote_ok=True)
  common.set_up_logging(args.verbose)
  import importlib
  trainer = importlib.import_module(module)
  trainer.train(config, args.workdir)
  return 0


def main(argv=None) -> int:
  """`var-jax train`: VAR."""
  argv = list(sys.argv if argv is None else argv)
  return _run(argv, argv[0] if argv else "var-jax train", "VAR training", "var_jax.train.train_var")


def main_tokenizer(argv=None) -> int:
  """`var-jax train-tokenizer`: the tokenizer."""
  argv = list(sys.argv if argv is None else argv)
  return _run(argv, argv[0] if argv else "var-jax train-tokenizer", "tokenizer training",
              "var_jax.train.train_vqvae")
