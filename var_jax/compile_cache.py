"""var-jax's cache folder, and JAX's persistent compilation cache for the var-jax commands in it.

The folder (`cache_root`: $VAR_JAX_CACHE, default ~/.cache/var_jax) holds the released models
(`load_pretrained`: hub/, torch/, converted/) and the compiled programs (SUBDIR).

A command's first sampling call compiles the whole sampler: ~11 s for the shipped model on a
2-core CPU, 67-129 s per batch size for VAR-d16 on an H200. With the cache on, a later process
that compiles the same program (same model shapes, batch, options, backend and JAX version)
loads it from disk instead. JAX keys and validates the entries itself; this module only picks the
directory. The library never turns it on by itself (it would write to disk behind the caller's
back); library users call `enable(directory)` or set JAX's own `jax_compilation_cache_dir`.
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping

from absl import logging

from var_jax import paths

ENV_VAR = "VAR_JAX_COMPILATION_CACHE"
SUBDIR = "jax_compilation_cache"  # inside `cache_root`
OFF = ("off", "none", "0", "false")


def cache_root(environ: Mapping[str, str] = os.environ) -> pathlib.Path:
  """var-jax's cache folder: $VAR_JAX_CACHE, else ~/.cache/var_jax."""
  return pathlib.Path(environ.get("VAR_JAX_CACHE", pathlib.Path.home() / ".cache" / "var_jax"))


def directory_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
  """Where the commands cache compiled programs: $VAR_JAX_COMPILATION_CACHE ("off": nowhere),
  else JAX's own $JAX_COMPILATION_CACHE_DIR, else SUBDIR of `cache_root` (where the released
  models go too)."""
  chosen = environ.get(ENV_VAR)
  if chosen is not None:
    chosen = chosen.strip()
    return None if not chosen or chosen.lower() in OFF else chosen
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  return str(cache_root(environ) / SUBDIR)


def enable(directory: str | os.PathLike | None) -> str | None:
  """Turns JAX's persistent compilation cache on at `directory` (created if missing; remote
  paths such as gs://... are passed to JAX as given) and returns it, or returns None when
  `directory` is None. A directory that cannot be created leaves the cache off with a warning: a
  cache never fails the command it would speed up."""
  if directory is None:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  path = os.fspath(directory)
  if not paths.is_url(path):
    path = os.path.abspath(os.path.expanduser(path))
    try:
      pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
      logging.warning("compilation cache off: cannot create %s (%s); set %s to a writable "
                      "directory, or to 'off'.", path, err, ENV_VAR)
      return None
    if not os.access(path, os.W_OK):
      logging.warning("compilation cache off: %s is not writable; set %s to a writable "
                      "directory, or to 'off'.", path, ENV_VAR)
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
