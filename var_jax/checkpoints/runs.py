"""Reading a training run's workdir: its saved config, its checkpoint steps, and any subtree
(params, ema_params) of a step, without the trainer.

Layout written by `var_jax.train`: `WORKDIR/config.json` (the run's config) and
`WORKDIR/checkpoints/<step>/{state, meta}` (`state` the train-state pytree, Orbax). A VAR run's
config has a `model` section, a tokenizer run's a `vqvae` section. Arrays are restored into the
shardings of the abstract tree given (host memory when it has none).
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from var_jax.errors import CheckpointError

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
CONFIG_FILE = "config.json"
VAR_RUN = "var"
TOKENIZER_RUN = "tokenizer"


def as_absolute(path: epath.PathLike) -> epath.Path:
  """Orbax's tensorstore writer needs absolute paths; gs:// paths already are."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def short_error(error: Exception, limit: int = 400) -> str:
  """The error's type and the start of its message (tensorstore appends whole JSON specs)."""
  text = f"{type(error).__name__}: {error}"
  return text if len(text) <= limit else text[:limit] + " ..."


def shapes_by_path(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/dense/kernel': (shape, dtype name)} for every leaf of `tree` (or its metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    out[jax.tree_util.keystr(tuple(path), simple=True, separator="/")] = (
        tuple(np.shape(leaf) if getattr(leaf, "shape", None) is None else leaf.shape),
        str(np.dtype(dtype)) if dtype is not None else type(leaf).__name__)
  return out


def describe_mismatch(saved: Any, expected: Any) -> list[str]:
  """Human-readable differences in structure and shape between saved metadata and a target.

  Dtypes may differ (orbax casts on restore); shapes and the set of leaves may not.
  """
  have, want = shapes_by_path(saved), shapes_by_path(expected)
  problems = []
  for name in sorted(want.keys() - have.keys()):
    problems.append(f"{name}: expected {want[name][0]}, missing from the checkpoint")
  for name in sorted(have.keys() - want.keys()):
    problems.append(f"{name}: saved {have[name][0]}, not in the model's state")
  for name in sorted(have.keys() & want.keys()):
    if have[name][0] != want[name][0]:
      problems.append(f"{name}: saved shape {have[name][0]}, model expects {want[name][0]}")
  return problems


def restore_args(abstract: Any) -> Any:
  return ocp.checkpoint_utils.construct_restore_args(abstract)


# -- a run ------------------------------------------------------------------------------------------

def read_config(workdir: epath.PathLike) -> dict | None:
  """The run's saved config as a dict, or None when `workdir` has no config.json.

  Raises:
    CheckpointError: config.json exists but is not valid JSON.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


def run_kind(config: dict | None) -> str | None:
  """VAR_RUN, TOKENIZER_RUN, or None for a config that is neither run's."""
  if not isinstance(config, dict):
    return None
  if "vqvae" in config:
    return TOKENIZER_RUN
  if "model" in config and "tokenizer" in config:
    return VAR_RUN
  return None


def steps(workdir: epath.PathLike) -> list[int]:
  """The run's checkpointed steps, ascending (complete ones: with a state item)."""
  root = epath.Path(workdir) / CHECKPOINT_SUBDIR
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / STATE_ITEM).exists())


def step_dir(workdir: epath.PathLike, step: int | None = None) -> tuple[int, epath.Path]:
  """(step, its directory): `step`, or the latest one.

  Raises:
    CheckpointError: the run has no checkpoint, or not that step (the message lists those it has).
  """
  workdir = as_absolute(workdir)
  available = steps(workdir)
  if not available:
    raise CheckpointError(f"{workdir} holds no checkpoint (no {CHECKPOINT_SUBDIR}/<step>/"
                          f"{STATE_ITEM}): train first, or point at the run's workdir.")
  if step is None:
    step = available[-1]
  elif step not in available:
    raise CheckpointError(f"{workdir} has no checkpoint of step {step}; it has steps "
                          f"{', '.join(map(str, available))}.")
  return step, workdir / CHECKPOINT_SUBDIR / str(step)


def saved_tree(step_path: epath.Path) -> dict:
  """The metadata tree of a step's state (its top-level keys: params, ema_params, ...)."""
  state_dir = step_path / STATE_ITEM
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      saved = checkpointer.metadata(state_dir).item_metadata
  except Exception as e:  # unreadable metadata
    raise CheckpointError(f"Cannot read checkpoint metadata in {state_dir} "
                          f"({short_error(e)}).") from e
  saved = saved.tree if hasattr(saved, "tree") else saved
  return saved if isinstance(saved, dict) else dict(saved)


def has_subtree(step_path: epath.Path, key: str) -> bool:
  return bool(saved_tree(step_path).get(key))


def restore_subtree(step_path: epath.Path, abstract: Any, key: str, *, hint: str = "") -> Any:
  """The `key` subtree (e.g. "params", "ema_params") of a step's state, into `abstract`'s
  shapes and shardings.

  Raises:
    CheckpointError: the step has no such entry, its arrays do not fit `abstract` (listing the
      differences), or they cannot be read.
  """
  state_dir = step_path / STATE_ITEM
  saved = saved_tree(step_path)
  if not saved.get(key):
    raise CheckpointError(f"Checkpoint {state_dir} has no '{key}' entry.{hint}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
  problems = describe_mismatch(saved[key], abstract)
  if problems:
    raise CheckpointError(
        f"Parameters in {state_dir} do not fit the model ({len(problems)} differences): "
        + "; ".join(problems[:20]) + f".{hint}")
  item = {key: abstract}
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args(item), partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"Cannot restore '{key}' from {state_dir} ({short_error(e)}).{hint}") from e
  return restored[key]
