"""What config files share: `:k=v` variant parsing, the base training config, the official recipes;
and how a command that takes a training config file loads one (`load_config_file`).

Config files in configs/ are loaded by path (and copied alone to TPU workers), so they import
this module rather than each other.
"""
from __future__ import annotations

import importlib.resources
import os
import pathlib
import re
from typing import Sequence

import ml_collections

from var_jax import paths
from var_jax.data.config import default_data_config
from var_jax.errors import ConfigError
from var_jax.models.vqvae_config import PATCH_NUMS_256, PATCH_NUMS_512
from var_jax.train import fid_hook, guidance_free, optim, progressive


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"depth=20,tiny" -> ConfigDict over `defaults`; unknown keys are an error (typos fail early)."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, raw = item.partition("=")
    if key not in defaults:
      raise KeyError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    current = defaults[key]
    if isinstance(current, bool):
      values[key] = raw.lower() in ("", "1", "true", "yes")
    else:
      values[key] = type(current)(raw)
  return ml_collections.ConfigDict(values)


def base_train_config() -> ml_collections.ConfigDict:
  """Loop, mesh, data and optimizer fields with their defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.global_batch_size = 768
  c.total_steps = 1000
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.init_from = ""
  c.distributed = "auto"
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.dcn_mesh = ml_collections.config_dict.placeholder(list)
  c.rules = ml_collections.config_dict.placeholder(list)
  # Checked at start-up, before anything is allocated (train/loop.py, validate_run_config): the
  # most parameter GB per chip left unsplit over fsdp/tensor, and the opt-out.
  c.max_replicated_param_gb = 3.0
  c.allow_replicated_params = False
  # A periodic hook (sample grids, evaluations) that raises is logged and skipped; True stops.
  c.stop_on_hook_error = False
  c.data = default_data_config()
  c.optim = optim.default_config()
  return c


def progressive_config() -> ml_collections.ConfigDict:
  """VAR's `progressive` block (VAR_SPEC §5.4), off by default (pg = 0).

  Fields, mirroring the official flags: pg (progressive over the first pg of the run, in [0, 1]),
  pg0 (the first stage trains scales 0..pg0), pgwp (loss warm-up of each new scale, in steps;
  0 = 1/300 of the run), lin_schedule (pg > 0 switches optim.schedule to 'lin<pg>', as the
  official). E.g. `--config.progressive.pg=0.8 --config.progressive.pg0=1`.
  """
  return progressive.default_config()


def add_objective_fields(c: ml_collections.ConfigDict, cca_lambda: float = 50.0) -> None:
  """`objective` ("cross_entropy", or "cca" for guidance-free fine-tuning) and its `cca` block
  (var_jax/train/guidance_free.py), e.g. `--config.objective=cca --config.cca.reference=d16`."""
  c.objective = "cross_entropy"
  c.cca = guidance_free.default_config()
  c.cca.lambda_ = cca_lambda


# CCA's lambda per depth in the paper's VAR runs (thu-ml/CCA README; d36 was not run: d30's).
CCA_LAMBDA = {16: 50.0, 20: 50.0, 24: 100.0, 30: 1000.0, 36: 1000.0}

# depth: (global batch, epochs, tblr, init_adaln_gamma, wpe, twde)
RECIPES = {
    16: (768, 200, 1e-4, 1e-3, 0.1, None),
    20: (768, 250, 1e-4, 1e-3, 0.1, None),
    24: (768, 350, 8e-5, 1e-4, 0.01, None),
    30: (1024, 350, 8e-5, 1e-5, 0.01, 0.08),
    36: (768, 350, 8e-5, 5e-6, 0.01, 0.08),
}
IMAGENET_TRAIN_IMAGES = 1_281_167


def var_imagenet_config(depth: int = 16, tiny: bool = False, pretokenized: bool = False) -> ml_collections.ConfigDict:
  """The official ImageNet recipe for `depth`; `tiny` shrinks it to a 2-step CPU smoke run."""
  args = ml_collections.ConfigDict(dict(depth=depth, tiny=tiny, pretokenized=pretokenized))
  if args.depth not in RECIPES:
    raise ValueError(f"no official recipe for depth {args.depth}; choose one of {sorted(RECIPES)}.")
  bs, epochs, tblr, alng, wpe, twde = RECIPES[args.depth]
  c = base_train_config()
  c.patch_nums = PATCH_NUMS_512 if args.depth == 36 else PATCH_NUMS_256
  c.model = dict(depth=args.depth, shared_aln=args.depth == 36, dtype="bfloat16",
                 remat_policy="nothing_saveable" if args.depth >= 24 else "none",
                 attention_impl="auto", cond_drop_rate=0.1, init_adaln=0.5, init_adaln_gamma=alng,
                 init_head=0.02)
  c.tokenizer = dict(path="vae_ch160v4096z32.pth", overrides={})
  c.global_batch_size = bs
  steps_per_epoch = -(-IMAGENET_TRAIN_IMAGES // bs)
  c.total_steps = epochs * steps_per_epoch
  c.log_every = 100
  c.checkpoint_every = 2000
  c.sample_every = 10_000
  c.sample_classes = [207, 360, 387, 974, 88, 979, 417, 279]
  c.sample_cfg, c.sample_top_k, c.sample_top_p = 1.5, 900, 0.96
  # Periodic FID/IS/precision/recall (var_jax/train/fid_hook.py): set every, ref, inception_path.
  c.fid_eval = fid_hook.default_fid_eval_config()
  c.label_smoothing = 0.0
  c.progressive = progressive_config()
  add_objective_fields(c, CCA_LAMBDA[args.depth])
  c.data.image_size = 16 * c.patch_nums[-1]
  c.data.source = "pretokenized" if args.pretokenized else "tfds"
  # d16/d20: pure data parallelism, as the official recipe. d24 and up shard their weights and
  # optimizer state over the whole slice (fsdp = every chip): a product of all the physical torus
  # axes, so the mesh lays out on any slice (a fixed fsdp=8 does not map onto v5p's 4x4x4 torus
  # or v5e-256's 16x16 without splitting a physical axis).
  c.mesh = ([("data", -1), ("fsdp", 1), ("tensor", 1)] if args.depth < 24
            else [("data", 1), ("fsdp", -1), ("tensor", 1)])
  c.optim.tblr, c.optim.wpe = tblr, wpe
  c.optim.twde = twde
  c.optim.warmup_steps = round(epochs / 50 * steps_per_epoch)
  if args.tiny:
    c.model.update(depth=2, dtype="float32", remat_policy="none")
    c.tokenizer = dict(path="random", overrides=dict(ch=32, vocab_size=64, z_channels=8))
    c.patch_nums = (1, 2, 3, 4)
    c.data.image_size = 64
    c.data.source = "shapes"
    c.data.num_workers = 2
    c.global_batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 2, 1, 1
    c.sample_every = 0
    c.optim.warmup_steps = 1
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  return c


# `--config.a.b=v` / `--noconfig.a.b` overrides of a config file's fields.
_OVERRIDE = re.compile(r"^--?(no)?config\.")


def split_config_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the `--config.FIELD=VALUE` / `--noconfig.FIELD` overrides in `args`, the other args)."""
  overrides = [a for a in args if _OVERRIDE.match(a)]
  return overrides, [a for a in args if not _OVERRIDE.match(a)]


def shipped_config_dirs() -> list[pathlib.Path]:
  """Where the shipped config files are: installed with the package (`var_jax.configs`, mapped from
  the repository's configs/ by setup.py), or configs/ beside the package in a source tree."""
  dirs = []
  try:
    dirs.append(pathlib.Path(str(importlib.resources.files("var_jax.configs"))))
  except ModuleNotFoundError:  # a source tree used without installing
    pass
  source_tree = pathlib.Path(__file__).resolve().parents[2] / "configs"
  if source_tree.is_dir() and source_tree not in dirs:
    dirs.append(source_tree)
  return dirs


def resolve_config_path(path: str) -> str:
  """A config file by path, or a shipped config by name from anywhere: "var_tiny", "var_tiny.py"
  and "configs/var_tiny.py" (when no such file is under the current directory) all name the
  shipped configs/var_tiny.py.

  Raises:
    ConfigError: neither a file nor a shipped config; the message lists the shipped ones.
  """
  if os.path.isfile(path) or paths.is_url(path):
    return path
  name = pathlib.PurePath(path).name
  name = name if name.endswith(".py") else name + ".py"
  dirs = shipped_config_dirs()
  for d in dirs:
    if (d / name).is_file():
      return str(d / name)
  shipped = sorted({f.stem for d in dirs for f in d.glob("*.py") if f.stem != "__init__"})
  raise ConfigError(f"--config {path}: no such config file, and no shipped config of that name "
                    f"(shipped: {', '.join(shipped) or 'none found'}).")


def load_config_file(config_arg: str, overrides: Sequence[str] = (), *,
                     prog: str = "var-jax") -> ml_collections.ConfigDict:
  """A config file with its overrides, through ml_collections' config flag (as `var-jax train`).

  Args:
    config_arg: "configs/var_d16.py", "var_d16" (a shipped config, from anywhere) or
      "configs/var_d16.py:tiny" (the part after ':' goes to the file's get_config).
    overrides: ["--config.global_batch_size=64", "--noconfig.async_checkpointing", ...].
    prog: the command's name, for absl's flag parsing.

  Raises:
    ConfigError: no such file, an override of a field the config lacks or of the wrong type, or a
      file whose get_config() failed or returned something else than a ConfigDict.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  path, sep, variant = config_arg.partition(":")
  config_arg = resolve_config_path(path) + sep + variant
  argv = [prog, f"--config={config_arg}", *overrides]
  # A private FlagValues per call: repeated calls (tests) and other commands never collide.
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                           flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    raise ConfigError(f"cannot load --config {config_arg} with overrides {list(overrides)}: "
                      f"{e}") from None
  if not isinstance(holder.value, ml_collections.ConfigDict):
    raise ConfigError(f"--config {config_arg} did not give a ConfigDict (its get_config() failed "
                      "to load or returned something else).")
  return holder.value
