"""Models from training runs: a `var-jax train` workdir as a VARModel, a `var-jax train-tokenizer`
workdir as a Tokenizer, and the tokenizer a VAR training config names (`config.tokenizer`).

    model = load_pretrained("/runs/var_d16")             # the latest step's EMA weights
    model = model_from_run("/runs/var_d16", step=50_000, use_ema=False)

EMA weights are used when the run kept them (optim.ema_decay > 0), else the raw params. A VAR
run's tokenizer is rebuilt from its config exactly as the trainer built it: "random" (seed,
overrides), an official .pth, an exported or converted directory, or a tokenizer run's workdir.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
from etils import epath
from flax.core import meta as flax_meta

from var_jax.checkpoints import runs
from var_jax.errors import CheckpointError, ConfigError
from var_jax.inference.tokenizer import Tokenizer
from var_jax.inference.var_model import VARModel
from var_jax.models import var as var_model
from var_jax.models.var_config import VARConfig
from var_jax.models import vqvae
from var_jax.models.vqvae_config import VQVAEConfig


def vqvae_config_of(config: Mapping) -> VQVAEConfig:
  """The tokenizer architecture of a tokenizer run's config (its `vqvae` section)."""
  return VQVAEConfig.from_mapping({**dict(config["vqvae"]), "patch_nums": tuple(config["patch_nums"])})


def var_config_of(config: Mapping, vae_cfg: VQVAEConfig) -> VARConfig:
  """The VAR architecture of a VAR run's config (its `model` section) on tokenizer `vae_cfg`."""
  return VARConfig.from_mapping({**dict(config["model"]), "vocab_size": vae_cfg.vocab_size,
                                 "z_channels": vae_cfg.z_channels, "patch_nums": vae_cfg.patch_nums})


def _weights_key(step_path, use_ema: bool, workdir) -> str:
  if use_ema and runs.has_subtree(step_path, "ema_params"):
    return "ema_params"
  if use_ema:
    import logging
    logging.getLogger(__name__).info("%s kept no EMA weights: using its params.", workdir)
  return "params"


def _require_kind(workdir, kind: str) -> dict:
  config = runs.read_config(workdir)
  found = runs.run_kind(config)
  if found != kind:
    what = {runs.VAR_RUN: "`var-jax train` (VAR)", runs.TOKENIZER_RUN: "`var-jax train-tokenizer`"}
    raise CheckpointError(
        f"{workdir} is not a {what[kind]} run's workdir"
        + (f" (it is a {what[found]} run)." if found else
           " (no config.json with a 'model'/'tokenizer' or 'vqvae' section)."))
  return config


def tokenizer_from_run(workdir, *, step: int | None = None, use_ema: bool = True,
                       patch_nums=None) -> tuple[Tokenizer, int, str]:
  """(Tokenizer, step, weights key) of a tokenizer training run."""
  config = _require_kind(workdir, runs.TOKENIZER_RUN)
  vae_cfg = vqvae_config_of(config)
  if patch_nums is not None and tuple(patch_nums) != vae_cfg.patch_nums:
    raise ConfigError(f"the tokenizer in {workdir} was trained with patch_nums {vae_cfg.patch_nums}, "
                      f"not {tuple(patch_nums)}.")
  step, path = runs.step_dir(workdir, step)
  key = _weights_key(path, use_ema, workdir)
  abstract = vqvae.param_shapes(vae_cfg)
  return Tokenizer(vae_cfg, runs.restore_subtree(path, abstract, key)), step, key


def tokenizer_from_spec(spec: Mapping[str, Any], patch_nums) -> Tokenizer:
  """The tokenizer a VAR training config's `tokenizer` section names.

  spec: {"path": "random" | x.pth | exported/converted dir | tokenizer workdir,
         "seed": int (random), "overrides": {...}}.

  Raises:
    CheckpointError: the path names nothing readable (a deleted tokenizer run, say).
  """
  overrides = dict(spec.get("overrides", {}) or {})
  patch_nums = tuple(patch_nums)
  path = str(spec["path"])
  if path == "random":
    cfg = VQVAEConfig.from_mapping({**overrides, "patch_nums": patch_nums})
    # Jitted: 16 s instead of 26 s op by op for var_tiny's tokenizer on 2 cores, and the
    # commands' compilation cache keeps it; the weights are those of the op-by-op init bit for
    # bit (checked for var_tiny's), so earlier runs load as before.
    init = jax.jit(vqvae.init_params, static_argnums=0)
    return Tokenizer(cfg, init(cfg, jax.random.key(spec.get("seed", 0))))
  if path.endswith(".pth"):
    if not epath.Path(path).exists():
      raise CheckpointError(f"tokenizer.path {path!r}: no such file.")
    return Tokenizer.from_torch(path, patch_nums=patch_nums, **overrides)
  p = epath.Path(path)
  if not p.exists():
    raise CheckpointError(f"tokenizer.path {path!r}: no such file or directory. The tokenizer this "
                          "config names is gone: restore it, or point tokenizer.path at another.")
  if (p / "params").exists():
    from var_jax.inference.model_dirs import load_tokenizer_dir
    tok = load_tokenizer_dir(p)
    if tok.config.patch_nums != patch_nums:
      raise ConfigError(f"tokenizer at {p} uses patch_nums {tok.config.patch_nums}, "
                        f"but config.patch_nums is {patch_nums}.")
    return tok
  return tokenizer_from_run(p, patch_nums=patch_nums)[0]


def model_from_run(workdir, *, step: int | None = None, use_ema: bool = True,
                   **runtime) -> VARModel:
  """The VARModel of a `var-jax train` run: its (EMA) weights at `step` (default: the latest)
  and the tokenizer its config names.

  runtime: dtype / attention_impl / remat_policy overrides of the saved model config.

  Raises:
    CheckpointError: not a VAR run, no checkpoint, no such step, the tokenizer is gone, or the
      weights do not fit the config.
  """
  model, _, _ = model_and_origin_from_run(workdir, step=step, use_ema=use_ema, **runtime)
  return model


def model_and_origin_from_run(workdir, *, step: int | None = None, use_ema: bool = True,
                              **runtime) -> tuple[VARModel, int, str]:
  """(model, step, weights key) of a VAR run (see `model_from_run`)."""
  workdir = runs.as_absolute(workdir)
  config = _require_kind(workdir, runs.VAR_RUN)
  step, path = runs.step_dir(workdir, step)   # before the tokenizer: a missing step fails fast
  try:
    tokenizer = tokenizer_from_spec(config["tokenizer"], config["patch_nums"])
  except CheckpointError as e:
    raise CheckpointError(f"The tokenizer of the run {workdir} cannot be loaded: {e}") from None
  model_cfg = dict(config["model"])
  model_cfg.update(runtime)
  var_cfg = var_config_of({**config, "model": model_cfg}, tokenizer.config)
  abstract = flax_meta.unbox(var_model.param_shapes(var_cfg))
  key = _weights_key(path, use_ema, workdir)
  params = runs.restore_subtree(path, abstract, key, hint=" Check that the run's config.json is "
                                "the one it was trained with.")
  return VARModel(var_cfg, params, tokenizer), step, key
