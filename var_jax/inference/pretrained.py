"""Released checkpoints: convert once to an Orbax directory, load by name, path or files.

    model = var_jax.load_pretrained("d16")            # hub cache -> converted dir -> VARModel
    model = var_jax.load_pretrained("/ckpts/var_d16")  # a directory written by `var-jax convert`
    model = var_jax.load_pretrained(("vae_ch160v4096z32.pth", "var_d16.pth"))

A converted directory holds `config.json` (tokenizer and VAR configs) and `params/` (an Orbax
checkpoint of {"vae": ..., "var": ...}); loading it needs neither torch nor the .pth files.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import scales
from var_jax.errors import CheckpointError, InputError
from var_jax.models.var_config import VARConfig
from var_jax.models.vqvae_config import PATCH_NUMS_256, PATCH_NUMS_512, VQVAEConfig
from var_jax.inference.tokenizer import Tokenizer
from var_jax.checkpoints.torch_pickle import load_torch_checkpoint
from var_jax.inference.var_model import VARModel

HF_REPO = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"
RELEASED = {f"d{d}": f"var_d{d}.pth" for d in (16, 20, 24, 30, 36)}
FORMAT = "var-jax-converted"
FORMAT_VERSION = 1
_SCHEDULES = {scales.seq_len(p): p for p in (PATCH_NUMS_256, PATCH_NUMS_512)}
# Models that ship inside the package, so sampling works offline right after install.
ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"shapes-tiny": ASSETS / "shapes-tiny"}
# Numerics a user may change when loading; architecture comes from the checkpoint.
_RUNTIME_FIELDS = ("dtype", "attention_impl", "remat_policy")


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("VAR_JAX_CACHE", pathlib.Path.home() / ".cache" / "var_jax"))


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


def save_converted(model: VARModel, out_dir, *, storage_dtype: str = "float32") -> pathlib.Path:
  """Writes `config.json` and an Orbax checkpoint of both param trees to `out_dir`.

  storage_dtype="bfloat16" halves the files (the shipped model); loading casts back to float32.
  """
  import orbax.checkpoint as ocp
  out = pathlib.Path(out_dir).absolute()
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


def load_converted(directory, **overrides) -> VARModel:
  """Reads a directory written by `save_converted` (or `var-jax convert`)."""
  import orbax.checkpoint as ocp
  d = pathlib.Path(directory).absolute()
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
  unknown = sorted(set(overrides) - set(_RUNTIME_FIELDS))
  if unknown:
    raise InputError(f"cannot override {unknown} when loading; allowed: {list(_RUNTIME_FIELDS)}.")
  vae_cfg = VQVAEConfig.from_mapping(meta["vae"])
  var_cfg = VARConfig.from_mapping({**meta["var"], **overrides})
  from var_jax.models.vqvae import VQVAE
  from var_jax.models.var import VAR
  import jax.numpy as jnp
  from flax.core import meta as flax_meta
  size = vae_cfg.image_size
  abstract = {
      "vae": jax.eval_shape(lambda: VQVAE(vae_cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"],
      "var": flax_meta.unbox(jax.eval_shape(lambda: VAR(var_cfg).init(
          jax.random.key(0), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, var_cfg.seq_len - var_cfg.first_l, var_cfg.z_channels))))["params"]),
  }
  try:
    params = ocp.StandardCheckpointer().restore(d / "params", abstract)
  except Exception as e:  # Orbax raises several types for truncated or mismatched trees.
    raise CheckpointError(f"could not restore {d / 'params'}: {type(e).__name__}: {e}. "
                          "Re-run `var-jax convert` to rebuild it.") from None
  return VARModel(var_cfg, params["var"], Tokenizer(vae_cfg, params["vae"]))


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
                    **overrides) -> VARModel:
  """Loads a VAR model by name ("shapes-tiny" ships with the package; "d16" ... "d36" are the
  released ImageNet models), converted directory, or a (vae.pth, var.pth) pair.

  Names resolve in this order: a converted copy in the cache, the .pth files in the cache (the
  Hugging Face hub cache under `<cache>/hub`, or files placed by hand in `<cache>/torch/`), a
  download from the hub (converted once and kept). `overrides` set dtype / attention_impl.
  """
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
  path = pathlib.Path(name)
  if path.is_dir():
    return load_converted(path, **overrides)
  if path.suffix == ".pth":
    raise InputError(f"{path} is a single .pth file: pass (vae.pth, var.pth) as a pair.")
  raise InputError(f"'{name}' is neither a shipped model ({', '.join(SHIPPED)}), a released "
                   f"model ({', '.join(RELEASED)}) nor a directory.")


def load_shipped(name: str, **overrides) -> VARModel:
  """Loads a model shipped with the package ("shapes-tiny": 10 synthetic shape classes at 64 px)."""
  if name not in SHIPPED:
    raise CheckpointError(f"no shipped model '{name}'; shipped: {sorted(SHIPPED)}.")
  path = SHIPPED[name]
  if not (path / "config.json").is_file():
    raise CheckpointError(f"the shipped model files are missing from {path}: reinstall var-jax, or "
                          "rebuild them with `python scripts/train_shapes_tiny.py`.")
  return load_converted(path, **overrides)
