"""Models that ship inside the package, so sampling works offline right after install."""
from __future__ import annotations

import pathlib

from var_jax.errors import CheckpointError

ASSETS = pathlib.Path(__file__).parent.parent / "assets"
SHIPPED = {"shapes-tiny": ASSETS / "shapes-tiny"}


def load_shipped(name: str, **overrides):
  """Loads a shipped model by name ("shapes-tiny": 10 synthetic shape classes at 64 px)."""
  from var_jax.inference.pretrained import load_converted
  if name not in SHIPPED:
    raise CheckpointError(f"no shipped model '{name}'; shipped: {sorted(SHIPPED)}.")
  path = SHIPPED[name]
  if not (path / "config.json").is_file():
    raise CheckpointError(f"the shipped model files are missing from {path}: reinstall var-jax, or "
                          "rebuild them with `python scripts/train_shapes_tiny.py`.")
  return load_converted(path, **overrides)
