"""What the var-jax commands share: one argparse style, list/mesh flag types, output-path checks
before any work, model loading, config files with `--config.x=y` overrides, and log set-up."""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
from typing import Sequence

from var_jax import paths
from var_jax.errors import ConfigError, InputError

DEFAULT_MODEL = "shapes-tiny"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """--help shows every flag's default and keeps the description's own line breaks. A flag whose
  help already says its default ("default: ...") or whose default is None (its help says what
  happens without it) gets no second "(default: ...)"."""

  def _get_help_string(self, action):
    help_text = action.help or ""
    if action.default is None or "default" in help_text:
      return help_text
    return super()._get_help_string(action)


def new_parser(prog: str, description: str | None, **kwargs) -> argparse.ArgumentParser:
  return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                 formatter_class=_HelpFormatter, **kwargs)


def int_list(flag: str, example: str = "1,2,3,4"):
  """An argparse type: comma-separated ints, at least one."""
  def parse(text: str) -> tuple[int, ...]:
    try:
      values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
      values = ()
    if not values:
      raise argparse.ArgumentTypeError(f"{flag} takes comma-separated ints, e.g. {example}; got {text!r}")
    return values
  return parse


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
  return value


def mesh_sizes(text: str) -> tuple[int, int, int]:
  """An argparse type: DATA,FSDP,TENSOR sizes, -1 = the rest."""
  try:
    sizes = tuple(int(s) for s in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes):
    raise argparse.ArgumentTypeError(f"--mesh takes DATA,FSDP,TENSOR sizes (-1 = the rest), e.g. "
                                     f"-1,1,4; got {text!r}")
  return sizes


def shown(path) -> str:
  """A path as printed to the user: absolute and normalised (remote URLs as given)."""
  text = os.fspath(path)
  return text if paths.is_url(text) else os.path.normpath(os.path.abspath(text))


def _check_remote(path, flag: str, remote_ok: bool) -> bool:
  """Whether `path` is a URL (gs://...); raises InputError for one where the command writes local
  files only (pathlib would make a local folder named 'gs:' of it)."""
  if not paths.is_url(path):
    return False
  if not remote_ok:
    raise InputError(f"{flag} {path}: this command writes to local disk only; write to a local "
                     f"path, then copy it there (e.g. gsutil -m cp -r LOCAL_PATH {path}).")
  return True


def check_output_file(path, flag: str, *, remote_ok: bool) -> None:
  """Raises InputError, before any work, if `path` cannot be written as a file (or is a URL
  where `remote_ok` is False: every caller says whether it writes through etils/Orbax, which take
  gs://..., or to local disk)."""
  if not path or _check_remote(path, flag, remote_ok):
    return
  p = pathlib.Path(path)
  if p.is_dir():
    raise InputError(f"{flag} {shown(p)} is a directory; give a file path.")
  parent = next((a for a in [p.parent, *p.parent.parents] if a.exists()), None)
  if parent is not None and not parent.is_dir():
    raise InputError(f"{flag} {shown(p)}: {shown(parent)} is a file, not a directory.")


def check_output_dir(path, flag: str, *, remote_ok: bool) -> None:
  """Raises InputError, before any work, if `path` exists and is not a directory (or is a URL
  where `remote_ok` is False, as in `check_output_file`)."""
  if not path or _check_remote(path, flag, remote_ok):
    return
  p = pathlib.Path(path)
  for a in [p, *p.parents]:
    if a.exists():
      if not a.is_dir():
        what = "is a file" if a == p else f"is inside {shown(a)}, which is a file"
        raise InputError(f"{flag} {shown(p)} {what}; give a directory.")
      return


def load_model(name: str, dtype: str | None = None, tokenizer_dtype: str | None = None):
  """A VARModel by shipped/released name or converted directory (`load_pretrained`)."""
  from var_jax.inference.pretrained import load_pretrained
  return load_pretrained(name, tokenizer_dtype=tokenizer_dtype,
                         **({"dtype": dtype} if dtype else {}))


def load_refiner(name: str | None, draft_scales: int | None, model, dtype: str | None = None,
                 tokenizer_dtype: str | None = None):
  """(refiner VARModel or None, checked draft_scales) from --refiner / --draft-scales.

  A refiner whose tokenizer equals the drafter's is rebuilt on the drafter's Tokenizer object,
  so `var_jax.sample` does not compare the two tokenizers' weights on every call.
  """
  from var_jax.inference.sampler import check_refiner, same_tokenizer
  from var_jax.inference.var_model import VARModel
  refiner = None
  if name:
    refiner = load_model(name, dtype, tokenizer_dtype)
    if same_tokenizer(model.tokenizer, refiner.tokenizer):
      refiner = VARModel(refiner.config, refiner.params, model.tokenizer)
  elif draft_scales is not None:
    raise InputError("--draft-scales needs --refiner MODEL (the model that samples the last scales).")
  return refiner, check_refiner(model, refiner, draft_scales)


def add_sampler_flags(p) -> None:
  """The sampler's options, as `sample`, `edit` and `evaluate` take them (p: a parser or group)."""
  p.add_argument("--seed", type=int, default=0, help="the random seed")
  p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (>= 0)")
  p.add_argument("--top-k", type=int, default=900,
                 help="keep the k largest logits (0, or any k >= the vocabulary size: all)")
  p.add_argument("--top-p", type=float, default=0.96, help="nucleus filtering (0 = off)")
  p.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (visualisation)")
  p.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
  p.add_argument("--tokenizer-dtype", default=None,
                 help="the tokenizer's compute dtype (float32 or bfloat16; default: as saved, "
                 "float32 for the released models); bfloat16 decodes several times faster on CPUs "
                 "with AMX")
  p.add_argument("--mesh", type=mesh_sizes, default=(-1, 1, 1), metavar="DATA,FSDP,TENSOR",
                 help="local devices as data,fsdp,tensor (-1 = the rest); tensor > 1 splits the "
                 "weights of models too large for one chip (write --mesh=-1,1,4)")


def add_refiner_flags(p) -> None:
  """Collaborative decoding's options, as `sample` and `evaluate` take them."""
  p.add_argument("--refiner", default=None, metavar="MODEL",
                 help="collaborative decoding: a second model on the same tokenizer (as --model) "
                 "that samples the last scales after --model drafted the first ones")
  p.add_argument("--draft-scales", type=int, default=None, metavar="N",
                 help="scales --model drafts before --refiner takes over (default: all but the "
                 "last two)")


def add_config_flags(parser: argparse.ArgumentParser, what: str,
                     example: str = "--config.seed=1") -> None:
  parser.add_argument("--config", required=True,
                      help=f"{what} config: a file (configs/var_d16.py), or a shipped config by name "
                           "from anywhere (var_d16); ':args' after it go to its get_config")
  parser.epilog = ("Any --config.FIELD=VALUE overrides a field of the config (--noconfig.FIELD for "
                   f"False), e.g. {example}.")


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str]):
  """(args, overrides): the command's flags by argparse and the `--config.x=y` overrides left for
  ml_collections' config flag (`config_lib.load_config_file`). Anything else exits 2 with usage."""
  from var_jax.train import config_lib
  args, rest = parser.parse_known_args(list(argv))
  overrides, unknown = config_lib.split_config_overrides(rest)
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (write config overrides as "
                 "--config.FIELD=VALUE)")
  return args, overrides


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str]):
  """(args, config): `parse_config_args`, then the config file with its overrides. Errors exit 2
  with usage."""
  from var_jax.train import config_lib
  args, overrides = parse_config_args(parser, argv)
  try:
    return args, config_lib.load_config_file(args.config, overrides, prog=parser.prog)
  except ConfigError as e:
    parser.error(str(e))


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbose", action="store_true",
                      help="also show third-party INFO logs (Orbax, TensorFlow, JAX)")


def set_up_logging(verbose: bool = False) -> None:
  """var-jax's own log lines (and clu's one metrics line per log interval) as `HH:MM:SS message` on
  stderr; third-party INFO (Orbax writes ~40 lines per checkpoint) only with --verbose.

  Library code logs through absl, whose records go to the Python logger "absl": it gets one
  handler here, so the output does not depend on whether absl.app or someone's basicConfig ran.
  """
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  if not verbose:
    handler.addFilter(_OwnInfoOnly())
  logger = logging.getLogger("absl")
  logger.handlers = [handler]
  logger.propagate = False


class _OwnInfoOnly(logging.Filter):
  """Keeps warnings and errors, and INFO logged from var_jax's or clu's code (the metrics line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return any(f"{os.sep}{pkg}{os.sep}" in record.pathname for pkg in ("var_jax", "clu"))
