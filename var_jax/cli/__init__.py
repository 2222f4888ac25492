"""The `var-jax` command: one module per subcommand, each with `main(argv)` (argv[0] = its name)."""
from __future__ import annotations

import argparse
import importlib
import sys

from var_jax import compile_cache
from var_jax.errors import VarJaxError

# name -> (module, one-line help); `var-jax NAME --help` has the details.
COMMANDS = {
    "sample": ("var_jax.cli.sample", "class-conditional samples to a PNG grid / PNGs + npz"),
    "edit": ("var_jax.cli.edit", "zero-shot in/out-painting and class editing"),
    "convert": ("var_jax.cli.convert", "official .pth files -> a var-jax (Orbax) directory"),
    "export": ("var_jax.cli.export", "a training run's weights -> a model directory (or tokenizer)"),
    "train": ("var_jax.cli.train", "train VAR"),
    "train-tokenizer": ("var_jax.cli.train", "train the multi-scale VQVAE tokenizer"),
    "pretokenize": ("var_jax.cli.pretokenize", "encode a data set to token maps once"),
    "evaluate": ("var_jax.cli.evaluate", "FID, sFID, IS, precision, recall (ADM evaluator) of a model or batch"),
    "fid-stats": ("var_jax.cli.fid_stats", "a reference batch (ADM format) from images, for --ref"),
    "aot": ("var_jax.cli.aot", "will a training config fit a TPU slice: compile it ahead of time"),
}

# Commands whose programs JAX's persistent compilation cache keeps between runs
# (`var_jax.compile_cache`; VAR_JAX_COMPILATION_CACHE=off turns it off). Not `aot`: it compiles for
# TPU slices this host does not have, nothing a later run here could load.
CACHED_COMMANDS = ("sample", "edit", "evaluate", "fid-stats", "train", "train-tokenizer",
                   "pretokenize")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="var-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (_, what) in COMMANDS.items():
    sub.add_parser(name, help=what, add_help=False)
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in COMMANDS:
    build_parser().parse_args(argv[:1])  # prints help, or the usage and the error (exit 2)
  command, rest = argv[0], argv[1:]
  if command in CACHED_COMMANDS and not {"-h", "--help"} & set(rest):
    compile_cache.enable(compile_cache.directory_from_env())
  try:
    module = importlib.import_module(COMMANDS[command][0])
    run = module.main_tokenizer if command == "train-tokenizer" else module.main
    return run([f"var-jax {command}", *rest])
  except VarJaxError as e:  # bad input, a missing extra: one line, exit 2
    print(f"var-jax {command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
