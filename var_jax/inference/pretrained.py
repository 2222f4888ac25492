"""Released checkpoints: convert once to an Orbax directory, load by name, path or files.

    model = var_jax.load_pretrained("d16")            # hub cache -> converted dir -> VARModel
    model = var_jax.load_pretrained("/ckpts/var_d16")  # a directory written by `var-jax convert`
    model = var_jax.load_pretrained(("vae_ch160v4096z32.pth", "var_d16.pth"))

A converted directory holds `config.json` (tokenizer and VAR configs) and `params/` (an Orbax
checkpoint of {"vae": ..., "var": ...}); loading it needs neither torch nor the .pth files.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import numpy as np

from var_jax import compile_cache, scales
from var_jax.errors import CheckpointError, ConfigError, InputError
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae_config import COMPUTE_DTYPES, PATCH_NUMS_256, PATCH_NUMS_512, VQVAEConfig
from var_jax.inference.tokenizer import Tokenizer
from var_jax.checkpoints.torch_pickle import load_torch_checkpoint
from var_jax.inference.var_model import VARModel
from var_jax.inference.model_dirs import (FORMAT, FORMAT_VERSION, RUNTIME_FIELDS as _RUNTIME_FIELDS,
                                          TOKENIZER_FORMAT, as_path, load_converted,
                                          read_meta as _read_meta, save_converted)

# save_converted / load_converted / FORMAT live in `model_dirs`; they are part of this module's
# face too (`var-jax convert` writes what load_pretrained reads).
__all__ = ["FORMAT", "FORMAT_VERSION", "HF_REPO", "RELEASED", "SHIPPED", "VAE_FILE", "convert_files",
           "default_cache_dir", "load_converted", "load_pretrained", "load_shipped", "save_converted"]

HF_REPO = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"
RELEASED = {f"d{d}": f"var_d{d}.pth" for d in (16, 20, 24, 30, 36)}
_SCHEDULES = {scales.seq_len(p): p for p in (PATCH_NUMS_256, PATCH_NUMS_512)}
# Models that ship inside the package, so sampling works offline right after install.
ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"shapes-tiny": ASSETS / "shapes-tiny"}
# Which weights of a training workdir to load (load_pretrained(WORKDIR, step=..., use_ema=...)).
_RUN_FIELDS = ("step", "use_ema")


def default_cache_dir() -> pathlib.Path:
  """var-jax's cache folder (`compile_cache.cache_root`: $VAR_JAX_CACHE, ~/.cache/var_jax)."""
  return compile_cache.cache_root()


def convert_files(vae_path, var_path, **overrides) -> VARModel:
  """Official .pth files -> VARModel. patch_nums: override, else read from the VAR's length."""
  var_sd = load_torch_checkpoint(var_path)
  patch_nums = overrides.pop("patch_nums", None)
  if patch_nums is None:
    length = int(np.asarray(var_sd.get("pos_1LC", np.zeros((1, 0, 1)))).shape[1])
    if length not in _SCHEDULES:
      raise CheckpointError(
          f"{var_path}: {length} token positions match neither released schedule (680 for 256 px, "
          "2240 for 512 px); pass patch_nums=... explicitly.")
    patch_nums = _SCHEDULES[length]
  vae_overrides = {k: overrides.pop(k) for k in list(overrides) if k.startswith("vae_")}
  tok = Tokenizer.from_torch(vae_path, patch_nums=tuple(patch_nums),
                             **{k[len("vae_"):]: v for k, v in vae_overrides.items()})
  return VARModel.from_torch(var_sd, tok, **overrides)


def _hub_file(filename: str, cache_dir: pathlib.Path, allow_download: bool) -> pathlib.Path | None:
  """A released file from the local hub cache, else (if allowed) downloaded into it."""
  manual = cache_dir / "torch" / filename
  if manual.is_file():
    return manual
  try:
    import huggingface_hub
  except ImportError:
    return None
  hub_cache = cache_dir / "hub"
  try:
    return pathlib.Path(huggingface_hub.hf_hub_download(HF_REPO, filename, cache_dir=hub_cache,
                                                        local_files_only=True))
  except Exception:  # Not cached yet (the hub raises several types).
    pass
  if not allow_download:
    return None
  try:
    return pathlib.Path(huggingface_hub.hf_hub_download(HF_REPO, filename, cache_dir=hub_cache))
  except Exception:  # Offline, or the hub is unreachable.
    return None


def load_pretrained(name_or_path: str | os.PathLike | Sequence, *, cache_dir=None, allow_download=True,
                    tokenizer_dtype: str | None = None, **overrides) -> VARModel:
  """Loads a VAR model by name ("shapes-tiny" ships with the package; "d16" ... "d36" are the
  released ImageNet models), converted or exported directory, `var-jax train` workdir, or a
  (vae.pth, var.pth) pair.

  Names resolve in this order: a converted copy in the cache, the .pth files in the cache (the
  Hugging Face hub cache under `<cache>/hub`, or files placed by hand in `<cache>/torch/`), a
  download from the hub (converted once and kept). `overrides` set dtype / attention_impl.

  A training workdir gives its latest step's EMA weights (its params when it kept no EMA), with
  the tokenizer its config names; for a workdir only, `step=N` picks another checkpoint and
  `use_ema=False` the raw params.

  `tokenizer_dtype` ("float32" or "bfloat16") sets the tokenizer's compute dtype, which `dtype`
  leaves at its saved value (float32 for every released and shipped model); a bf16 decoder is
  2.5-3.6x faster on CPUs with AMX (README, sampling speed) and moves decoded pixels by ~1/255.
  """
  if tokenizer_dtype is not None and tokenizer_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"tokenizer_dtype must be one of {COMPUTE_DTYPES}, got {tokenizer_dtype!r}.")
  model = _load(name_or_path, cache_dir, allow_download, **overrides)
  if tokenizer_dtype is None or tokenizer_dtype == model.tokenizer.config.dtype:
    return model
  tok = model.tokenizer
  tokenizer = Tokenizer(dataclasses.replace(tok.config, dtype=tokenizer_dtype), tok.params)
  return VARModel(model.config, model.params, tokenizer)


def _load(name_or_path, cache_dir, allow_download, **overrides) -> VARModel:
  if isinstance(name_or_path, (list, tuple)):
    if len(name_or_path) != 2:
      raise InputError("give the released files as (vae.pth, var.pth).")
    return convert_files(name_or_path[0], name_or_path[1], **overrides)
  cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  name = str(name_or_path)
  if name in SHIPPED:
    return load_shipped(name, **overrides)
  if name in RELEASED:
    converted = cache / "converted" / name
    if (converted / "config.json").is_file():
      _check_conversion_overrides(converted, {k: v for k, v in overrides.items()
                                              if k not in _RUNTIME_FIELDS})
      return load_converted(converted, **{k: v for k, v in overrides.items() if k in _RUNTIME_FIELDS})
    vae = _hub_file(VAE_FILE, cache, allow_download)
    var = _hub_file(RELEASED[name], cache, allow_download)
    if vae is None or var is None:
      missing = [f for f, p in ((VAE_FILE, vae), (RELEASED[name], var)) if p is None]
      raise CheckpointError(
          f"The released '{name}' model is not cached and could not be downloaded (offline?). "
          f"Fetch {', '.join(missing)} from https://huggingface.co/{HF_REPO} and put them in "
          f"{cache / 'torch'}/, or call load_pretrained(('{VAE_FILE}', '{RELEASED[name]}')).")
    model = convert_files(vae, var, **overrides)
    save_converted(model, converted)
    return model
  path = as_path(name)
  if path.is_dir():
    meta = _read_meta(path)
    if isinstance(meta, dict) and meta.get("format") == TOKENIZER_FORMAT:
      raise InputError(f"{path} holds a tokenizer alone (exported from a tokenizer run), not a VAR "
                       "model: use it as config.tokenizer.path of a VAR training config.")
    from var_jax.checkpoints import runs
    kind = runs.run_kind(meta)
    if kind == runs.VAR_RUN:
      from var_jax.inference.training_runs import model_from_run
      _check_overrides(overrides, (*_RUNTIME_FIELDS, *_RUN_FIELDS), f"{path} (a training run)")
      return model_from_run(path, **overrides)
    if kind == runs.TOKENIZER_RUN:
      raise InputError(f"{path} is a tokenizer training run, not a VAR model: `var-jax export` it "
                       "and use it as config.tokenizer.path of a VAR training config.")
    _check_overrides(overrides, _RUNTIME_FIELDS, f"{path} (a model directory)")
    return load_converted(path, **overrides)
  if path.suffix == ".pth":
    raise InputError(f"{path} is a single .pth file: pass (vae.pth, var.pth) as a pair.")
  raise InputError(f"'{name}' is neither a shipped model ({', '.join(SHIPPED)}), a released "
                   f"model ({', '.join(RELEASED)}) nor a directory.")


def tokenizer_spec_of(name_or_path: str) -> dict:
  """A VAR training config's `tokenizer` section for the tokenizer of the model `load_pretrained`
  loads by this name (after it has loaded it once): the shipped or converted directory, or a
  training run's own tokenizer section."""
  name = str(name_or_path)
  if name in SHIPPED:
    return {"path": str(SHIPPED[name]), "overrides": {}}
  if name in RELEASED:
    return {"path": str(default_cache_dir() / "converted" / name), "overrides": {}}
  path = as_path(name)
  meta = _read_meta(path) if path.is_dir() else None
  from var_jax.checkpoints import runs
  if isinstance(meta, dict) and runs.run_kind(meta) == runs.VAR_RUN:
    return dict(meta["tokenizer"])
  return {"path": str(path), "overrides": {}}


def _check_conversion_overrides(converted: pathlib.Path, overrides: dict) -> None:
  """The conversion overrides of a released name (patch_nums, vae_FIELD, VARConfig fields) against
  the configs of the cached converted copy, which was converted once with them (before its
  weights are read): equal values pass; an unknown field or a different value raises, rather than
  being dropped unseen."""
  if not overrides:
    return
  meta = _read_meta(converted) or {}
  var_config = VARConfig.from_mapping(meta.get("var", {}))
  vae_config = VQVAEConfig.from_mapping(meta.get("vae", {}))
  for key, value in sorted(overrides.items()):
    config, field = ((vae_config, key[len("vae_"):]) if key.startswith("vae_") else (var_config, key))
    fields = {f.name for f in dataclasses.fields(config)}
    if field not in fields:
      raise InputError(f"unknown override {key}={value!r} for a released model: not a field of "
                       f"{type(config).__name__} ({', '.join(sorted(fields))}).")
    cached = getattr(config, field)
    same = (tuple(cached) == tuple(value) if isinstance(cached, (list, tuple))
            and isinstance(value, (list, tuple)) else cached == value)
    if not same:
      raise InputError(f"{key}={value!r} differs from the cached converted copy at {converted} "
                       f"({key}={cached!r}), converted earlier; delete that directory to convert "
                       "the released files again with the new value.")


def _check_overrides(overrides, allowed, what: str) -> None:
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    hint = (" (step / use_ema choose the weights of a training workdir only)"
            if set(unknown) & set(_RUN_FIELDS) else "")
    raise InputError(f"cannot override {unknown} when loading {what}; allowed: {list(allowed)}{hint}.")


def load_shipped(name: str, **overrides) -> VARModel:
  """Loads a model shipped with the package ("shapes-tiny": 10 synthetic shape classes at 64 px)."""
  if name not in SHIPPED:
    raise CheckpointError(f"no shipped model '{name}'; shipped: {sorted(SHIPPED)}.")
  path = SHIPPED[name]
  if not (path / "config.json").is_file():
    raise CheckpointError(f"the shipped model files are missing from {path}: reinstall var-jax, or "
                          "rebuild them with `python scripts/train_shapes_tiny.py`.")
  return load_converted(path, **overrides)
