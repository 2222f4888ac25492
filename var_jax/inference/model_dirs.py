"""Model directories: a VAR model with its tokenizer (`save_converted`, the format of
`var-jax convert`, `var-jax export` and the shipped model) or a tokenizer alone (`save_tokenizer`,
what `var-jax export` makes of a tokenizer run). Each holds `config.json` (format, version,
configs) and `params/` (an Orbax checkpoint); reading one needs neither torch nor the run.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import paths
from var_jax.errors import CheckpointError, InputError
from var_jax.inference.tokenizer import Tokenizer
from var_jax.inference.var_model import VARModel
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae_config import VQVAEConfig

FORMAT = "var-jax-converted"
FORMAT_VERSION = 1
# Numerics a user may change when loading; architecture comes from the checkpoint.
RUNTIME_FIELDS = ("dtype", "attention_impl", "remat_policy")


def as_path(path):
  """A model directory's path: gs:// and other URLs through etils (Orbax and the config reads
  take either), local paths absolute. (pathlib alone would turn gs://b/m into a local 'gs:/b/m'.)"""
  text = str(path)
  if paths.is_url(text):
    from etils import epath  # pylint: disable=import-outside-toplevel
    return epath.Path(text)
  return pathlib.Path(path).absolute()


def save_converted(model: VARModel, out_dir, *, storage_dtype: str = "float32") -> pathlib.Path:
  """Writes `config.json` and an Orbax checkpoint of both param trees to `out_dir`.

  storage_dtype="bfloat16" halves the files (the shipped model); loading casts back to float32.
  """
  import orbax.checkpoint as ocp
  out = as_path(out_dir)
  if (out / "params").exists():
    raise CheckpointError(f"{out} already holds a converted model; choose another --out or delete it.")
  out.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  tree = {"vae": model.tokenizer.params, "var": model.params}
  tree = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(storage_dtype)), tree)
  ckptr.save(out / "params", tree)
  ckptr.wait_until_finished()
  meta = {"format": FORMAT, "version": FORMAT_VERSION, "vae": model.tokenizer.config.to_dict(),
          "var": model.config.to_dict()}
  (out / "config.json").write_text(json.dumps(meta, indent=2))
  return out


TOKENIZER_FORMAT = "var-jax-tokenizer"


def save_tokenizer(tokenizer: Tokenizer, out_dir, *, storage_dtype: str = "float32") -> pathlib.Path:
  """Writes a tokenizer alone: `config.json` (format var-jax-tokenizer) and `params/` (Orbax).

  What `var-jax export` makes of a tokenizer run, and what `config.tokenizer.path` of a VAR
  training config (and `load_tokenizer_dir`) reads.
  """
  import orbax.checkpoint as ocp
  out = as_path(out_dir)
  if (out / "params").exists() or (out / "config.json").exists():
    raise CheckpointError(f"{out} already holds a model; choose another --out or delete it.")
  out.mkdir(parents=True, exist_ok=True)
  tree = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(storage_dtype)), tokenizer.params)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out / "params", tree)
  ckptr.wait_until_finished()
  meta = {"format": TOKENIZER_FORMAT, "version": FORMAT_VERSION, "vae": tokenizer.config.to_dict()}
  (out / "config.json").write_text(json.dumps(meta, indent=2))
  return out


def read_meta(d: pathlib.Path) -> dict | None:
  cfg_path = d / "config.json"
  if not cfg_path.is_file():
    return None
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path} is not valid JSON ({e}).") from None


def load_tokenizer_dir(directory) -> Tokenizer:
  """Reads a directory written by `save_tokenizer` (or the tokenizer of a converted model)."""
  import orbax.checkpoint as ocp
  from var_jax.models import vqvae
  d = as_path(directory)
  meta = read_meta(d)
  if meta is None or meta.get("format") not in (TOKENIZER_FORMAT, FORMAT) or not (d / "params").is_dir():
    raise CheckpointError(f"{d} is not an exported var-jax tokenizer (needs config.json of format "
                          f"'{TOKENIZER_FORMAT}' and params/); make one with `var-jax export`.")
  vae_cfg = VQVAEConfig.from_mapping(meta["vae"])
  abstract = vqvae.param_shapes(vae_cfg)
  if meta["format"] == FORMAT:
    return load_converted(d).tokenizer
  try:
    params = ocp.StandardCheckpointer().restore(d / "params", abstract)
  except Exception as e:  # Orbax raises several types for truncated or mismatched trees.
    raise CheckpointError(f"could not restore {d / 'params'}: {type(e).__name__}: {e}. "
                          "Export the tokenizer again.") from None
  return Tokenizer(vae_cfg, params)


def load_converted(directory, **overrides) -> VARModel:
  """Reads a directory written by `save_converted` (or `var-jax convert`)."""
  import orbax.checkpoint as ocp
  d = as_path(directory)
  cfg_path = d / "config.json"
  if not cfg_path.is_file() or not (d / "params").is_dir():
    raise CheckpointError(f"{d} is not a converted var-jax model (needs config.json and params/); "
                          "make one with `var-jax convert --vae ... --var ... --out DIR`.")
  try:
    meta = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path} is not valid JSON ({e}).") from None
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{cfg_path} is not a var-jax converted model config (format={meta.get('format')!r}).")
  unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
  if unknown:
    raise InputError(f"cannot override {unknown} when loading; allowed: {list(RUNTIME_FIELDS)}.")
  vae_cfg = VQVAEConfig.from_mapping(meta["vae"])
  var_cfg = VARConfig.from_mapping({**meta["var"], **overrides})
  from var_jax.models import var as var_model
  from var_jax.models import vqvae
  from flax.core import meta as flax_meta
  abstract = {
      "vae": vqvae.param_shapes(vae_cfg),
      "var": flax_meta.unbox(var_model.param_shapes(var_cfg)),
  }
  try:
    params = ocp.StandardCheckpointer().restore(d / "params", abstract)
  except Exception as e:  # Orbax raises several types for truncated or mismatched trees.
    raise CheckpointError(f"could not restore {d / 'params'}: {type(e).__name__}: {e}. "
                          "Re-run `var-jax convert` to rebuild it.") from None
  return VARModel(var_cfg, params["var"], Tokenizer(vae_cfg, params["vae"]))
